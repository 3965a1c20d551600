#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what benches/gpu.sh installs on a GPU machine that has
# Python 3.12 and PyTorch but no package index: the abi3 starkret wheel (`make wheel`)
# and wheels of the packages that machine lacks, one version each, < 60 MiB in all.
#
#   bash scripts/gpu_wheels.sh                 # builds the wheel (make wheel), downloads the rest
#   STARKRET_WHEEL=dist/x.whl bash scripts/gpu_wheels.sh   # carry this starkret wheel instead
#   GPU_EXTRA_WHEELS="faiss-cpu==1.9.0.post1" bash scripts/gpu_wheels.sh   # carry more
#
# What the device image lacks (see its package list): open_clip_torch and ftfy (and
# ftfy's wcwidth). `import starkret` does not need faiss-cpu (faiss is imported only where
# an index is built or read), nor webdataset, so neither is carried by default. The versions
# carried are the ones installed in the venv here, so the GPU run uses what CI tested.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${STARKRET_VENV:-$root/.venv}"
py="$venv/bin/python"
dest="$root/.whl"
limit_mib=60
# The GPU machine's interpreter: CPython 3.12 on x86-64 (manylinux, glibc 2.39).
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)
device_glibc_minor=39

say() { printf '\033[1m[gpu_wheels]\033[0m %s\n' "$*"; }
die() { printf '[gpu_wheels] error: %s\n' "$*" >&2; exit 1; }

[ -x "$py" ] || die "no Python at $py: run \`make install\` or set STARKRET_VENV"

# ---- the starkret wheel ---------------------------------------------------------
if [ -n "${STARKRET_WHEEL:-}" ]; then
    wheel="$STARKRET_WHEEL"
    [ -f "$wheel" ] || die "STARKRET_WHEEL=$wheel does not exist"
else
    say "building the abi3 wheel (make wheel)"
    built_after="$(date +%s)"
    make -C "$root" wheel VENV="$venv"
    wheel="$(ls -t dist/starkret-*.whl 2>/dev/null | head -n1 || true)"
    [ -n "$wheel" ] || die "make wheel left no dist/starkret-*.whl"
    [ "$(stat -c %Y "$wheel")" -ge "$built_after" ] || die "$wheel is older than this build"
fi
name="$(basename "$wheel")"
# abi3 (one wheel for every CPython >= 3.10) and manylinux (portable across distributions)
[[ "$name" == *-abi3-* ]] || die "$name is not an abi3 wheel"
[[ "$name" =~ -(manylinux_2_([0-9]+)_x86_64|manylinux2014_x86_64)\.whl$ ]] \
    || die "$name is not a manylinux x86-64 wheel (maturin's auditwheel repair gives one)"
glibc_minor="${BASH_REMATCH[2]:-17}"
((glibc_minor <= device_glibc_minor)) \
    || die "$name needs glibc 2.$glibc_minor; the GPU machine has 2.$device_glibc_minor"
# the JPEG decoder is bundled (the GPU machine has no libturbojpeg)
"$py" - "$wheel" <<'EOF' || die "$name does not bundle libturbojpeg (starkret.libs/)"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(not any(n.startswith("starkret.libs/libturbojpeg") for n in names))
EOF

# ---- the packages the GPU machine lacks, at the versions installed here ----------
version_of() {
    "$py" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$1" \
        || die "$1 is not installed in $venv"
}
wanted=(
    "open_clip_torch==$(version_of open_clip_torch)"
    "ftfy==$(version_of ftfy)"
    "wcwidth==$(version_of wcwidth)"
)
# shellcheck disable=SC2206
[ -n "${GPU_EXTRA_WHEELS:-}" ] && wanted+=(${GPU_EXTRA_WHEELS})

rm -rf "$dest"
mkdir -p "$dest"
cp "$wheel" "$dest/"
# which source the wheel was built from, printed by benches/gpu.sh and kept in gpu.json
git -C "$root" describe --always --dirty >"$dest/SOURCE" 2>/dev/null || echo unknown >"$dest/SOURCE"
platform_args=()
for p in "${platforms[@]}"; do platform_args+=(--platform "$p"); done
say "downloading ${wanted[*]}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platform_args[@]}" -d "$dest" "${wanted[@]}"

# ---- one version of each, total size ---------------------------------------------
dupes="$(ls "$dest"/*.whl | xargs -n1 basename | sed -E 's/^([^-]+)-.*/\1/' | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
[ -z "$dupes" ] || die "several versions of: $dupes (pip on the GPU machine would refuse)"
total=$(du -cb "$dest"/*.whl | tail -n1 | cut -f1)
ls -l "$dest"/*.whl
((total < limit_mib * 1024 * 1024)) \
    || die "$((total / 1048576)) MiB of wheels: more than the $limit_mib MiB that may travel"
say "$(ls "$dest"/*.whl | wc -l) wheels, $((total / 1024)) KiB in .whl/"
say "next: the device tool's run with carry [\".whl\"] and the command: bash benches/gpu.sh"
