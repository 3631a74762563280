#!/usr/bin/env bash
# Checks the container image's runtime assumptions without a container
# engine: the binary runs as an unprivileged user (uid 10001, no
# capabilities, no_new_privs) from a read-only bind of its files, with every
# other mount read-only and a fresh tmpfs on /tmp as the only writable path,
# exactly what the Dockerfile and the Helm chart give it. It runs
# `casebook --help`, `casebook migrate` against a scratch database of the
# local stack, and `casebook serve --role api` (or SMOKE_ROLE), probes /health with the
# image's own health check script, and stops it with SIGTERM.
#
#   deploy/docker/smoke-nonroot.sh [path/to/casebook]   (default target/release/casebook)
#
# Needs root (a private mount namespace), util-linux (unshare, setpriv,
# findmnt) and the local stack (make stack-up). Environment:
#   CASEBOOK_HOME      the local stack's home (default <repo>/.casebook)
#   SMOKE_HEALTH_ON    ops (default: the ops listener, CASEBOOK_OPS_ADDR) or
#                      http (a binary from before the ops listener existed)
#   SMOKE_ROLE         the role to serve (default api; `all` also loads the
#                      embedding model from the read-only bind)
#   SMOKE_SETTLE_SECS  seconds between readiness and SIGTERM (default 0)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SELF="$REPO_ROOT/deploy/docker/smoke-nonroot.sh"
RUN_UID=10001
RUN_GID=10001
ROLE="${SMOKE_ROLE:-api}"

say() { echo "smoke-nonroot: $*" >&2; }
die() {
    echo "smoke-nonroot: FAILED: $*" >&2
    exit 1
}

# Shared libraries the runtime image (debian slim + ca-certificates) has.
ALLOWED_LIBS='^(linux-vdso|ld-linux[-a-z0-9_]*|libc|libm|libgcc_s|libz|libdl|libpthread|librt|libutil)\.so'

# setpriv execs the command: a background "${AS_SERVICE_USER[@]}" cmd & has
# the command's own pid in $!, so that SIGTERM reaches the service itself.
AS_SERVICE_USER=(setpriv --reuid "$RUN_UID" --regid "$RUN_GID" --clear-groups --no-new-privs
                 --inh-caps=-all --bounding-set=-all --)
as_service_user() {
    "${AS_SERVICE_USER[@]}" "$@"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

inside() {
    local stage="$1"
    # 1. Only /tmp is writable: every other mount becomes read-only in this
    #    private namespace, then /tmp gets a fresh tmpfs.
    local ro_failed=()
    while read -r target; do
        case "$target" in
            /proc | /proc/* | /sys | /sys/* | /dev | /dev/*) continue ;;
        esac
        mount -o remount,bind,ro "$target" 2>/dev/null || ro_failed+=("$target")
    done < <(findmnt -rn -o TARGET | sort -u)
    mount --bind "$stage" "$stage"
    mount -o remount,bind,ro "$stage"
    mount -t tmpfs -o size=64m,mode=1777,nosuid,nodev tmpfs /tmp
    [ ${#ro_failed[@]} -eq 0 ] || say "could not make read-only (special mounts): ${ro_failed[*]}"

    cd "$stage"
    local bin="$stage/bin/casebook"
    # The staged files belong to the service user: only the read-only bind
    # stops it from changing them.
    if as_service_user sh -c "echo x >'$stage/bin/written'" 2>/dev/null; then
        die "the service user could write into the read-only bind of its files"
    fi
    if as_service_user sh -c "echo x >'$stage/bin/casebook'" 2>/dev/null; then
        die "the service user could overwrite its own binary"
    fi
    for path in / /var/tmp "$REPO_ROOT" /root; do
        if [ -d "$path" ] && as_service_user sh -c "echo x >'$path/.casebook-smoke'" 2>/dev/null; then
            die "the service user could write into $path"
        fi
    done
    as_service_user sh -c 'echo x >/tmp/probe && rm /tmp/probe' || die "/tmp is not writable for the service user"
    say "ok: uid $RUN_UID, no capabilities; $stage read-only (even to its owner), / read-only, /tmp writable"

    # 2. --help
    as_service_user "$bin" --help >/dev/null || die "casebook --help"
    say "ok: casebook --help"

    # 3. migrate into a scratch database, with its own topic prefix.
    local suffix db admin_url
    suffix="$(date +%s)_$$"
    db="casebook_smoke_$suffix"
    admin_url="${DATABASE_URL%/*}/postgres"
    psql -X -q "$admin_url" -c "CREATE DATABASE $db" || die "could not create the scratch database"
    trap "psql -X -q '$admin_url' -c 'DROP DATABASE IF EXISTS $db WITH (FORCE)' >/dev/null 2>&1 || true" EXIT
    export DATABASE_URL="${DATABASE_URL%/*}/$db"
    export KAFKA_TOPIC_PREFIX="smoke_$suffix"
    export HOME=/tmp
    export CASEBOOK_ARCHIVE_DIR=/tmp/archive
    export CASEBOOK_JWT_SECRET
    CASEBOOK_JWT_SECRET="$(head -c 48 /dev/urandom | base64 | tr -d '\n/+=')"
    if [ -d "$stage/models/all-MiniLM-L6-v2" ]; then
        export CASEBOOK_EMBEDDINGS="local:$stage/models/all-MiniLM-L6-v2"
    fi
    as_service_user "$bin" migrate >/tmp/migrate.log 2>&1 || {
        tail -n 20 /tmp/migrate.log >&2
        die "casebook migrate"
    }
    say "ok: casebook migrate ($db, prefix $KAFKA_TOPIC_PREFIX)"

    # 4. serve --role $ROLE; the image's health check must pass.
    local http_port ops_port pid health_addr
    http_port="$(free_port)"
    ops_port="$(free_port)"
    export CASEBOOK_HTTP_ADDR="127.0.0.1:$http_port"
    export CASEBOOK_OPS_ADDR="127.0.0.1:$ops_port"
    export CASEBOOK_PUBLIC_URL="http://127.0.0.1:$http_port"
    if [ "${SMOKE_HEALTH_ON:-ops}" = http ]; then
        health_addr="$CASEBOOK_HTTP_ADDR"
    else
        health_addr="$CASEBOOK_OPS_ADDR"
    fi
    "${AS_SERVICE_USER[@]}" "$bin" serve --role "$ROLE" >/tmp/serve.log 2>&1 &
    pid=$!
    trap "kill -KILL $pid 2>/dev/null || true; psql -X -q '$admin_url' -c 'DROP DATABASE IF EXISTS $db WITH (FORCE)' >/dev/null 2>&1 || true" EXIT
    local healthy=""
    for _ in $(seq 1 150); do
        if CASEBOOK_OPS_ADDR="$health_addr" as_service_user "$stage/bin/casebook-healthcheck" 2>/dev/null; then
            healthy=1
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if [ -z "$healthy" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        tail -n 20 /tmp/serve.log >&2
        die "no HTTP 200 from /health on $health_addr within 30 s"
    fi
    say "ok: serve --role $ROLE answers /health on $health_addr (the image's health check script)"
    # SIGTERM handling starts once start-up is complete: wait for readiness
    # (Postgres, migrations, the broker) before stopping it.
    local ready=""
    for _ in $(seq 1 100); do
        if HEALTHCHECK_PATH=/ready CASEBOOK_OPS_ADDR="$health_addr" \
            as_service_user "$stage/bin/casebook-healthcheck" 2>/dev/null; then
            ready=1
            break
        fi
        sleep 0.2
    done
    if [ -n "$ready" ]; then
        say "ok: /ready answers 200"
    else
        say "note: /ready did not answer 200 within 20 s (it waits for the broker and the topics)"
    fi
    # SMOKE_SETTLE_SECS: time between readiness and SIGTERM (default 0: a
    # rolling update may stop a pod the moment it turns ready).
    sleep "${SMOKE_SETTLE_SECS:-0}"
    local written
    written="$(find /tmp -mindepth 1 -user "$RUN_UID" -printf '%P\n' 2>/dev/null | sort | tr '\n' ' ')"
    say "files the service wrote (all under /tmp): ${written:-none}"
    kill -TERM "$pid"
    local rc=0
    local started=$SECONDS
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        die "serve did not stop within 40 s of SIGTERM"
    fi
    wait "$pid" || rc=$?
    if [ "$rc" -eq 143 ] && ! grep -q '"shutting down' /tmp/serve.log; then
        tail -n 20 /tmp/serve.log >&2
        die "serve was killed by SIGTERM (exit 143) without shutting down: it was ready, but its SIGTERM handler was not installed yet"
    fi
    [ "$rc" -eq 0 ] || {
        tail -n 20 /tmp/serve.log >&2
        die "serve exited $rc after SIGTERM"
    }
    grep -q '"shutting down' /tmp/serve.log || die "serve exited without its shutdown log line"
    say "ok: serve stopped cleanly on SIGTERM (exit 0, in $((SECONDS - started)) s)"
}

if [ "${1:-}" = "--inside" ]; then
    shift
    inside "$@"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "needs root for a private mount namespace"
for tool in unshare setpriv findmnt psql python3 ldd; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
BIN="${1:-$REPO_ROOT/target/release/casebook}"
[ -x "$BIN" ] || die "no binary at $BIN (build it: cargo build --release --bin casebook)"
export CASEBOOK_HOME="${CASEBOOK_HOME:-$REPO_ROOT/.casebook}"
eval "$("$REPO_ROOT/deploy/local/env.sh")"

# Libraries: everything the binary links must be in the runtime image.
extra="$(ldd "$BIN" | awk '{print $1}' | xargs -n1 basename | grep -Ev "$ALLOWED_LIBS" || true)"
[ -z "$extra" ] || die "the binary links libraries the runtime image lacks: $extra"
say "ok: shared libraries: $(ldd "$BIN" | awk '{print $1}' | xargs -n1 basename | tr '\n' ' ')"

# Stage the image's layout outside /tmp (which the namespace replaces).
STAGE="$(mktemp -d /var/tmp/casebook-smoke.XXXXXX)"
cleanup() { rm -rf "$STAGE"; }
trap cleanup EXIT
mkdir -p "$STAGE/bin" "$STAGE/models"
install -m 0755 "$BIN" "$STAGE/bin/casebook"
install -m 0755 "$REPO_ROOT/deploy/docker/healthcheck.sh" "$STAGE/bin/casebook-healthcheck"
if [ -f "$CASEBOOK_HOME/models/all-MiniLM-L6-v2/model.safetensors" ]; then
    cp -r "$CASEBOOK_HOME/models/all-MiniLM-L6-v2" "$STAGE/models/"
fi
chown -R "$RUN_UID:$RUN_GID" "$STAGE"
chmod 0755 "$STAGE"

unshare --mount --propagation private -- "$SELF" --inside "$STAGE"
say "all checks passed"
