#!/usr/bin/env bash
# Runs every check starkret has but the fuzzing: lint, stub check, Rust unit tests, Python
# tests. Expects scripts/bootstrap.sh to have run (`make test` does both). The fuzz targets
# run in `make fuzz` (scripts/fuzz.sh), which CI runs after this.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${STARKRET_VENV:-$root/.venv}"
py="$venv/bin/python"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "ruff"
"$venv/bin/ruff" check python tests benches
"$venv/bin/ruff" format --check python tests benches

step "stubtest"
# python/starkret/_core.pyi is written by hand; this checks it against the built extension.
"$py" -m mypy.stubtest starkret._core

# The Rust unit tests link libpython (no `extension-module` feature outside maturin).
export PYO3_PYTHON="$py"
libdir="$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')"
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "cargo fmt"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
step "cargo clippy"
# --all-features: also the `fuzzing` entry points (rust/fuzzing.rs) the fuzz targets use.
cargo clippy --all-targets --all-features -q -- -D warnings
step "cargo test"
cargo test -q

step "pytest"
"$py" -m pytest -q "$@"
