#!/usr/bin/env bash
# The GPU benchmark of issue 12 in one command, for a short slot on a GPU machine that has
# Python 3.12 and PyTorch but no package index (`scripts/gpu_wheels.sh` fills .whl/ first):
#
#   bash benches/gpu.sh [--budget SECONDS] [--smoke] [-- bench_gpu.py arguments]
#
# 1. installs .whl/*.whl into /tmp/site (no index, no dependencies), 2. prints versions
# and nvidia-smi, 3. runs benches/bench_gpu.py (-> $OUT/gpu.md, $OUT/gpu.json), 4. runs the
# GPU tests (pytest -m gpu -> $OUT/gpu-tests.txt). Everything it prints also goes to
# $OUT/gpu-log.txt. The whole run stays inside --budget seconds (default 450, under the
# 8 minutes a slot allows): each step gets what is left, and a step that would not fit is
# skipped with a line saying so. $OUT defaults to bench-results/gpu. --smoke runs the same
# steps on the CPU with starkret-tiny (CI does, through tests/test_bench_gpu.py).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
budget=450
smoke=()
bench_args=()
while (($#)); do
    case "$1" in
        --budget) budget="$2"; shift 2 ;;
        --smoke) smoke=(--smoke); shift ;;
        --) shift; bench_args=("$@"); break ;;
        *) echo "usage: bash benches/gpu.sh [--budget SECONDS] [--smoke] [-- bench args]" >&2; exit 2 ;;
    esac
done
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "--budget takes whole seconds, got $budget" >&2; exit 2; }
out="${OUT:-$root/bench-results/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
site="${STARKRET_SITE:-/tmp/site}"
wheels="${STARKRET_WHEELS:-.whl}"
# the GPU tests get what is left after the benchmark, at least this much of the budget
tests_reserve="${GPU_TESTS_RESERVE:-75}"
[ ${#smoke[@]} -gt 0 ] && tests_reserve="${GPU_TESTS_RESERVE:-40}"
started=$SECONDS
left() { echo $((budget - (SECONDS - started))); }
exec > >(tee "$out/gpu-log.txt") 2>&1
tee_pid=$!
step() { printf '\n== %s (%ss left of %ss)\n' "$*" "$(left)" "$budget"; }

step "install"
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl || { echo "install from $wheels/ failed"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    [ -f "$wheels/SOURCE" ] && export STARKRET_SOURCE="$(cat "$wheels/SOURCE")"
else
    echo "no $wheels/*.whl: using the starkret this Python already imports"
fi

step "versions"
"$py" - <<'EOF' || { echo "starkret does not import"; exit 1; }
import importlib.metadata as md, platform, torch, starkret
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})"
      f"  triton {v('triton')}  open_clip {v('open_clip_torch')}  ftfy {v('ftfy')}")
print(f"starkret {starkret.__version__} (core {starkret.core_version}) from {starkret.__file__}")
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
[ -n "${STARKRET_SOURCE:-}" ] && echo "wheel built from: $STARKRET_SOURCE"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    nvidia-smi
else
    echo "no nvidia-smi"
fi

step "benchmark"
bench_budget=$(($(left) - tests_reserve))
if ((bench_budget < 20)); then
    echo "skipped: benchmark needs at least 20 s, $bench_budget s left before the tests' reserve"
else
    # SIGINT first: bench_gpu.py writes what it has; the kill follows 15 s later
    PYTHONUNBUFFERED=1 timeout -s INT -k 15 "$((bench_budget + 10))" \
        "$py" benches/bench_gpu.py "${smoke[@]}" --budget "$bench_budget" --out "$out" \
        "${bench_args[@]}"
    echo "bench_gpu.py exited with $?"
fi

step "GPU tests (pytest -m gpu)"
mapfile -t gpu_tests < <(grep -l -E 'mark\.gpu|pytestmark.*gpu' tests/test_*.py 2>/dev/null)
tests_budget=$(($(left) - 5))
if ((${#gpu_tests[@]} == 0)); then
    echo "no test file has a gpu mark" | tee "$out/gpu-tests.txt"
elif ((tests_budget < 15)); then
    echo "skipped: the GPU tests need at least 15 s, $tests_budget s left" | tee "$out/gpu-tests.txt"
else
    PYTHONUNBUFFERED=1 timeout -k 10 "$tests_budget" "$py" -m pytest -q -m gpu -p no:cacheprovider \
        -W ignore::pytest.PytestUnknownMarkWarning \
        "${gpu_tests[@]}" 2>&1 | tee "$out/gpu-tests.txt"
    echo "pytest exited with ${PIPESTATUS[0]} (124 = stopped at the budget)" | tee -a "$out/gpu-tests.txt"
fi

step "done in $((SECONDS - started)) s"
ls -l "$out"
# let tee write the log's last lines before the machine collects $OUT
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null || sleep 1
