# Two entry points: `make test` and `make demo`. Both create .venv and install
# what they need when it is missing, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test demo venv clean bench

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

test: venv
	$(PY) -m pytest -ra -q tests

# until the full ALKPU loop lands (alkpu run on examples/cu-emt), the demo is the
# quick start: EMT data, dp train with RLEKF, dp freeze, alkpu calibrate / kpu
demo: venv
	$(PY) examples/quickstart.py quickstart-run

bench: venv
	$(PY) benchmarks/bench_rlekf_vs_adam.py

clean:
	rm -rf $(VENV) build *.egg-info
