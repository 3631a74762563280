#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test of the status page
# (tests/it/status_page.rs), once. Idempotent and quiet when it is present;
# prints the browser's path on stdout so that callers can pass it on:
#   CASEBOOK_CHROMIUM="$(deploy/local/chromium.sh)" cargo test --test it status_page
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

find_chromium() {
    local c
    for c in "${CASEBOOK_CHROMIUM:-}" /usr/bin/chromium "$(command -v chromium 2>/dev/null || true)"; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

if ! find_chromium >/dev/null; then
    note "installing Debian's chromium for the status page's browser test (once)"
    step "apt-get update" as_root apt-get update -q
    step "apt-get install chromium" as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
find_chromium || fail "chromium is not installed and could not be installed (apt-get install chromium)"
