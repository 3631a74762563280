#!/usr/bin/env bash
# Prints the environment for the local stack as shell assignments, creating
# the local JWT secret on first use. Used by the Makefile:
#   eval "$(deploy/local/env.sh)"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

secret_file="$CASEBOOK_HOME/jwt_secret"
if [ ! -s "$secret_file" ]; then
    (umask 077 && head -c 48 /dev/urandom | base64 | tr -d '\n' >"$secret_file")
fi
cat <<ENV
export DATABASE_URL="\${DATABASE_URL:-postgres://casebook@127.0.0.1:$PG_PORT/casebook}"
export KAFKA_BROKERS="\${KAFKA_BROKERS:-127.0.0.1:$KAFKA_PORT}"
export CASEBOOK_JWT_SECRET="\${CASEBOOK_JWT_SECRET:-$(cat "$secret_file")}"
export CASEBOOK_LOCAL_STACK=1
export CASEBOOK_TANSU_BIN="\${CASEBOOK_TANSU_BIN:-$(tansu_bin || true)}"
ENV
