#!/usr/bin/env bash
# Stops the local stack (broker, then PostgreSQL). Data stays in .casebook/.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ -f "$TANSU_PID" ]; then
    pid="$(cat "$TANSU_PID")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$TANSU_PID"
fi
if [ -f "$PG_DATA/postmaster.pid" ]; then
    step "stop PostgreSQL" as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop
fi
