# UniHealth — the two commands a newcomer needs: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	scripts/install.sh $(VENV) $(PYTHON)
	@touch $@

run: install
	$(VENV)/bin/unihealth serve --demo

test: install
	scripts/test.sh

bench: install
	$(VENV)/bin/unihealth bench $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .unihealth .cache .pytest_cache .mypy_cache .ruff_cache
