#!/usr/bin/env bash
# Installs everything starkret needs into ./.venv (or $STARKRET_VENV) and builds
# the Rust core in release mode. Safe to re-run: dependencies are reinstalled
# only when pyproject.toml changes, and the Rust build is incremental. (Chromium, for
# one browser test, is scripts/browser.sh's: `make test` runs it, `make demo` does not.)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${STARKRET_VENV:-$root/.venv}"
# Extras to install: `dev` by default (numpy 2, current pyarrow/faiss-cpu); CI's second
# environment uses `dev,autofaiss` (autofaiss 2.18 and its numpy<2 pins).
extras="${STARKRET_EXTRAS:-dev}"

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

# ---- system packages (Debian/Ubuntu) ------------------------------------------
# Listed in one place; installed only when missing.
system_packages=(libturbojpeg0-dev pkg-config)
missing=()
for pkg in "${system_packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing system packages: ${missing[*]} (install them with your package manager)"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing system packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ---- toolchains ----------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and re-run"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || die "$python not found: install CPython >= 3.10"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$python is older than 3.10"

# ---- Python environment --------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
# Test-only packages installed without their dependencies (with `dev`): clip-retrieval
# for its ClipClient module (tests/serve/test_clip_client.py), which needs only requests;
# its own requirements (torch<3, numpy<2, flask, ...) would fight ours.
no_deps=(clip-retrieval==2.45.0)
stamp="$venv/.starkret-deps"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras ${no_deps[*]}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing Python dependencies (first run downloads torch: a few minutes)"
    # The installer is uv (from PyPI, into the venv): it hard-links every package's files
    # from one cache (~/.cache/uv), so a second environment (CI's autofaiss one) adds no
    # second copy of torch and its CUDA libraries (about 6 GB), and no compressed copy of
    # them is kept besides (pip's cache held one: 4 GB more; CI once ran out of disk).
    "$venv/bin/python" -m pip install -q --no-cache-dir "uv>=0.4"
    install() { "$venv/bin/python" -m uv pip install --quiet --python "$venv/bin/python" "$@"; }
    install -e ".[$extras]"
    if [[ ",$extras," == *",dev,"* ]]; then
        install --no-deps "${no_deps[@]}"
    fi
    echo "$want" >"$stamp"
fi

# ---- Rust core -------------------------------------------------------------------
say "building the Rust core (release)"
"$venv/bin/maturin" develop --release --skip-install
"$venv/bin/python" -c 'import starkret._core' || die "the Rust core did not build; see the output above"
say "ready: $venv"
