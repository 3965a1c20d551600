#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time (see docs/development.md, "Fuzzing").
#
#   scripts/fuzz.sh                 every target, FUZZ_SECONDS each (default 60)
#   scripts/fuzz.sh decode pax      only these targets
#   scripts/fuzz.sh seeds           regenerate the committed seed corpus (fuzz/seeds/)
#
# Environment: FUZZ_SECONDS (per target), FUZZ_RSS_MB (memory limit per target process,
# default 2048), FUZZ_SEED (libFuzzer seed; unset = random), STARKRET_VENV (the venv whose
# Python the Rust core links, default .venv). Installs cargo-fuzz (and the nightly
# toolchain) when missing. Exits non-zero when a target crashes, naming the input that
# did it (under fuzz/artifacts/<target>/); new interesting inputs go to fuzz/corpus/<target>/
# (not committed). The committed fuzz/seeds/ and fuzz/regressions/ (minimal inputs of bugs
# found before) are only read.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${STARKRET_VENV:-$root/.venv}"
py="$venv/bin/python"

targets_all=(tar_stream pax patterns decode decode_independent select)
seconds="${FUZZ_SECONDS:-60}"
rss_mb="${FUZZ_RSS_MB:-2048}"
cargo_fuzz_version="0.13.2"

if [[ "${1:-}" == "seeds" ]]; then
    exec "$py" fuzz/make_seeds.py
fi
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${targets_all[@]}")

# Same linking as scripts/test.sh: the core links libpython outside maturin.
export PYO3_PYTHON="$py"
libdir="$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')"
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi

# Debug assertions (overflow checks) and AddressSanitizer on: cargo-fuzz's default build.
cargo +nightly fuzz build

seeds_of() { case "$1" in decode_independent) echo decode ;; *) echo "$1" ;; esac; }
max_len_of() { case "$1" in decode | decode_independent | tar_stream) echo 16384 ;; *) echo 4096 ;; esac; }
# Seconds one input may take (a slow image is a hang past 5 s; a million-path expansion
# legitimately takes seconds under AddressSanitizer on a busy machine).
timeout_of() { case "$1" in patterns) echo 60 ;; *) echo 10 ;; esac; }
# FUZZ_RUNS=brief (what `make test` uses): a fixed number of inputs per target instead of a
# time budget, so that with FUZZ_SEED and a fresh corpus (a clean clone) the run is the
# same on every machine: CI cannot turn red because a faster machine got further.
brief_runs_of() {
    case "$1" in
        decode | decode_independent) echo 3000 ;;
        patterns) echo 20000 ;;
        *) echo 100000 ;;
    esac
}

failed=()
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    artifacts="fuzz/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    if [[ "${FUZZ_RUNS:-}" == brief ]]; then
        budget=(-runs="$(brief_runs_of "$target")" -max_total_time=600)
        printf '\n\033[1m== fuzz %s (%s inputs)\033[0m\n' "$target" "$(brief_runs_of "$target")"
    else
        budget=(-max_total_time="$seconds")
        printf '\n\033[1m== fuzz %s (%ss)\033[0m\n' "$target" "$seconds"
    fi
    args=(
        "${budget[@]}"
        -rss_limit_mb="$rss_mb"
        -timeout="$(timeout_of "$target")"
        -max_len="$(max_len_of "$target")"
        -print_final_stats=1
    )
    [[ -z "${FUZZ_SEED:-}" ]] || args+=(-seed="$FUZZ_SEED")
    # `cargo fuzz run` passes the corpus dirs and everything after `--` to libFuzzer;
    # new inputs go to the first dir, so the committed seeds stay untouched.
    # fuzz/regressions/<target>/: minimal inputs of bugs found before, run at start too.
    dirs=("$corpus" "fuzz/seeds/$(seeds_of "$target")")
    [[ ! -d "fuzz/regressions/$target" ]] || dirs+=("fuzz/regressions/$target")
    log="$(mktemp)"
    if ! cargo +nightly fuzz run "$target" "${dirs[@]}" -- "${args[@]}" 2>&1 | tee "$log"; then
        # libFuzzer names the file it wrote: "Test unit written to <path>".
        found="$(grep -ao 'Test unit written to .*' "$log" | sed 's|^Test unit written to |  |' || true)"
        failed+=("$target")
        printf '\033[1;31mfuzz target %s failed\033[0m; input(s):\n%s\n' "$target" "${found:-"(none written: see the log above)"}"
        printf 'reproduce: PYO3_PYTHON=%s LD_LIBRARY_PATH=%s cargo +nightly fuzz run %s <input>\n' \
            "$PYO3_PYTHON" "$LD_LIBRARY_PATH" "$target"
    fi
    rm -f "$log"
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzzing found crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing: ${#targets[@]} target(s), ${FUZZ_RUNS:-${seconds}s} each, no crash"
