#!/usr/bin/env bash
# Headless Chromium (Debian's `chromium`, with apt) for the browser test of `starkret
# serve`'s page (tests/serve/test_page.py). `make test` runs it after scripts/bootstrap.sh;
# `make demo` does not need it. Best effort: without the package the test skips (except
# in CI, where it fails).
set -euo pipefail

say() { printf '\033[1m[browser]\033[0m %s\n' "$*"; }

if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    exit 0
fi
if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing chromium with apt-get (a few hundred MB; browser test of the serve page)"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null; } \
        || say "warning: could not install chromium; the serve page's browser test will skip"
else
    say "warning: chromium not found; the serve page's browser test will skip"
fi
