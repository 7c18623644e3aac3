# Two commands a newcomer needs (see README.md):
#   make demo   install, then run the whole pipeline end to end on embedded Kafka + local Flink
#   make test   install, then lint, type-check and run every test tier (unit, flink, e2e)
#
# PYTHON is the interpreter to install into and run with (use a virtualenv's if you like).
PYTHON ?= python3
STAMP := .rtrec/installed.stamp

.PHONY: install demo test lint unit flink e2e bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m pip install --progress-bar off -c constraints.txt -e ".[dev]"
	$(PYTHON) -m rtrec setup
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

demo: install
	$(PYTHON) -m rtrec demo

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy models

test: lint
	$(PYTHON) -m pytest tests -m "unit or flink or e2e" --durations=15

unit flink e2e: install
	$(PYTHON) -m pytest tests -m $@

# Every benchmark (benchmarks/*.py) with a summary table; BENCH_ARGS=--quick for a smoke run.
bench: install
	$(PYTHON) -m rtrec bench $(BENCH_ARGS)

clean:
	rm -rf .rtrec
