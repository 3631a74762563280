#!/bin/bash
# The image's HEALTHCHECK: GET /health on the ops listener, with nothing but
# bash (no curl in the image). Exit 0 on an HTTP 200 within the time limit.
#   CASEBOOK_OPS_ADDR  host:port of the ops listener (0.0.0.0 means loopback)
#   HEALTHCHECK_PATH   /health (default) or /ready
set -euo pipefail
addr="${CASEBOOK_OPS_ADDR:-127.0.0.1:9090}"
port="${addr##*:}"
host="${addr%:*}"
case "$host" in 0.0.0.0 | "" | "[::]") host=127.0.0.1 ;; esac
host="${host#[}"
host="${host%]}"
path="${HEALTHCHECK_PATH:-/health}"
exec 3<>"/dev/tcp/$host/$port"
printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$host" >&3
IFS=' ' read -r -t 3 _ status _ <&3
exec 3<&-
[ "$status" = "200" ]
