# Two entry points (README quick start): `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): requirements.txt requirements-reference.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-reference.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tcompare compare --config configs/config.yaml --preset quick --out results/quick

# The suite's slow tests start processes (each imports torch, 3-4 s on a slow host) and leave a core idle:
# pytest-xdist runs them on every core (at most 4 workers, to bound memory on a large host),
# work-stealing so that no one long file ends the run alone.
test: $(STAMP)
	$(VENV)/bin/pytest -q -n auto --maxprocesses 4 --dist worksteal

bench: $(STAMP)
	$(VENV)/bin/tcompare bench kernels --out results/bench

clean:
	rm -rf $(VENV) results
