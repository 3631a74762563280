#!/usr/bin/env bash
# Starts the local stack on loopback: PostgreSQL 15 with pgvector on
# $CASEBOOK_PG_PORT (54329) and the tansu broker on $CASEBOOK_KAFKA_PORT
# (19092), all state under .casebook/. Installs what is missing first.
# Re-running while everything is up takes well under a second.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$REPO_ROOT/deploy/local/install.sh"

# --- PostgreSQL ------------------------------------------------------------
if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    note "initialising PostgreSQL cluster in $PG_DATA"
    mkdir -p "$PG_DATA"
    [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$CASEBOOK_HOME/pg"
    chmod 700 "$PG_DATA"
    step "initdb" as_pg_user "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8
    cat >>"$PG_DATA/postgresql.conf" <<CONF
# casebook local stack
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$CASEBOOK_HOME/pg'
max_connections = 400
shared_buffers = 512MB
work_mem = 16MB
maintenance_work_mem = 256MB
wal_buffers = 16MB
max_wal_size = 2GB
checkpoint_timeout = 15min
commit_delay = 200
commit_siblings = 4
fsync = on
synchronous_commit = on
jit = off
log_min_duration_statement = 2000
CONF
fi
if [ "$(id -u)" -eq 0 ]; then
    touch "$PG_LOG" && chown postgres:postgres "$PG_LOG"
fi
if ! pg_ready; then
    step "start PostgreSQL on 127.0.0.1:$PG_PORT" as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start
fi
psql_admin() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"
}
if ! psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'casebook'" | grep -q 1; then
    # Local stack only: the role owns its databases, creates the per-test
    # ones and may install extensions.
    step "create role casebook" psql_admin -c "CREATE ROLE casebook LOGIN SUPERUSER"
fi
if ! psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = 'casebook'" | grep -q 1; then
    step "create database casebook" psql_admin -c "CREATE DATABASE casebook OWNER casebook"
fi

# --- tansu (Kafka protocol) --------------------------------------------------
if ! kafka_ready; then
    tansu="$(tansu_bin)" || fail "tansu $TANSU_VERSION is not installed (deploy/local/install.sh)"
    if ! psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = 'tansu'" | grep -q 1; then
        step "create database tansu" psql_admin -c "CREATE DATABASE tansu OWNER casebook"
    fi
    storage="${CASEBOOK_TANSU_STORAGE:-memory://tansu/}"
    nohup "$tansu" broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine "$storage" >>"$TANSU_LOG" 2>&1 &
    echo $! >"$TANSU_PID"
    for _ in $(seq 1 100); do
        kafka_ready && break
        kill -0 "$(cat "$TANSU_PID")" 2>/dev/null || fail "tansu exited at start; see $TANSU_LOG"
        sleep 0.1
    done
    kafka_ready || fail "tansu did not listen on 127.0.0.1:$KAFKA_PORT within 10 s; see $TANSU_LOG"
fi

# --- topics for the default prefix ---------------------------------------------
prefix="${KAFKA_TOPIC_PREFIX:-fte}"
tansu="$(tansu_bin)"
existing="$("$tansu" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" 2>/dev/null || true)"
for topic in tickets.incoming events escalations metrics dlq \
             channels.email.inbound channels.whatsapp.inbound channels.webform.inbound \
             channels.email.outbound channels.whatsapp.outbound channels.webform.outbound; do
    name="$prefix.$topic"
    if ! grep -q "\"$name\"" <<<"$existing"; then
        step "create topic $name" "$tansu" topic create "$name" --partitions "$TOPIC_PARTITIONS" \
            --broker "tcp://127.0.0.1:$KAFKA_PORT"
    fi
done
