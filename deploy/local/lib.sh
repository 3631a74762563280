# Shared helpers for the local stack scripts. Sourced, not run.
# Everything lives under $CASEBOOK_HOME (default: <repo>/.casebook).

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CASEBOOK_HOME="${CASEBOOK_HOME:-$REPO_ROOT/.casebook}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_PORT="${CASEBOOK_PG_PORT:-54329}"
PG_DATA="$CASEBOOK_HOME/pg/data"
PG_LOG="$CASEBOOK_HOME/logs/postgres.log"
KAFKA_PORT="${CASEBOOK_KAFKA_PORT:-19092}"
TANSU_VERSION="0.6.0"
TANSU_LOG="$CASEBOOK_HOME/logs/tansu.log"
TANSU_PID="$CASEBOOK_HOME/tansu.pid"
TOPIC_PARTITIONS="${CASEBOOK_TOPIC_PARTITIONS:-3}"
export PATH="$CASEBOOK_HOME/bin:$HOME/.cargo/bin:$PATH"

mkdir -p "$CASEBOOK_HOME/logs" "$CASEBOOK_HOME/bin"

# step "what" cmd...: runs cmd quietly; on failure says which step failed,
# why (the command's last output lines) and where the full log is.
step() {
    local what="$1"
    shift
    local log="$CASEBOOK_HOME/logs/step.log"
    if ! "$@" >"$log" 2>&1; then
        echo "casebook local stack: FAILED: $what" >&2
        echo "--- last lines of $log ---" >&2
        tail -n 25 "$log" >&2
        exit 1
    fi
}

fail() {
    echo "casebook local stack: FAILED: $*" >&2
    exit 1
}

note() {
    # Progress for slow first-time steps only; quiet when nothing is to do.
    echo "casebook local stack: $*" >&2
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || fail "'$*' needs root; run as root or with passwordless sudo"
    else
        fail "'$*' needs root and sudo is not installed"
    fi
}

# Postgres refuses to run as root; as root we run it as the 'postgres' user.
as_pg_user() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

tansu_bin() {
    for candidate in "$CASEBOOK_HOME/bin/tansu" "$HOME/.cargo/bin/tansu" "$(command -v tansu 2>/dev/null || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] \
            && "$candidate" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

pg_ready() {
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
}

kafka_ready() {
    (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null
}
