#!/usr/bin/env bash
# Installs the Python tools the deployment tests need (deploy/tests/
# requirements.txt) into a virtualenv under $CASEBOOK_HOME/venv, once.
# Idempotent and quiet when the venv already matches the requirements; prints
# the venv's python on stdout so that callers can run it:
#   "$(deploy/local/python-tools.sh)" -m pytest deploy/tests
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REQUIREMENTS="$REPO_ROOT/deploy/tests/requirements.txt"
VENV="${CASEBOOK_VENV:-$CASEBOOK_HOME/venv}"
STAMP="$VENV/.requirements.sha256"
[ -f "$REQUIREMENTS" ] || fail "missing $REQUIREMENTS"
want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
        || fail "python3 3.9 or newer is needed (deploy/local/install.sh installs it)"
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        note "installing python3-venv"
        step "apt-get install python3-venv" as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends python3-venv
    fi
    note "installing the deployment test tools into $VENV (once, a minute or two)"
    [ -x "$VENV/bin/python" ] || step "python3 -m venv $VENV" python3 -m venv "$VENV"
    step "pip install -r deploy/tests/requirements.txt" "$VENV/bin/python" -m pip install \
        --quiet --disable-pip-version-check --no-input -r "$REQUIREMENTS"
    echo "$want" >"$STAMP"
fi
echo "$VENV/bin/python"
