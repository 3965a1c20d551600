# The two commands of the README are `make demo` and `make test`.
VENV ?= .venv
export STARKRET_VENV := $(abspath $(VENV))

.PHONY: install demo test bench doctor

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
