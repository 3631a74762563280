#!/usr/bin/env bash
# Prints the local stack's Ed25519 audit signing key (the 32-byte seed as 64
# hex digits), creating it under $CASEBOOK_HOME on first use. Only `make run`
# uses it: `serve` signs a checkpoint of the whole log with it every
# CASEBOOK_CHECKPOINT_SECS, and `casebook audit verify` trusts the key's
# public half when given the same variable. Outside the local stack, supply
# your own (`casebook audit keygen`) from a secret store.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

key_file="$CASEBOOK_HOME/audit_signing_key"
if [ ! -s "$key_file" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$key_file")
fi
if ! grep -Eq '^[0-9a-f]{64}$' "$key_file"; then
    echo "audit-key.sh: $key_file is not 64 hex digits; remove it to make a new key" >&2
    exit 1
fi
cat "$key_file"
