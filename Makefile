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

# the tests run on up to 4 processes (one per core), a test file per process
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: venv qe chromium slurm
	$(PY) -m pytest -ra -q --durations=25 -n $(TEST_JOBS) --dist loadgroup tests

# the embedded default: the whole ALKPU loop (temperature ladder 300 -> 1400 K, EMT as
# the labeller, this machine as the cluster) in demo-run/, then its report in
# demo-run/report/. Running it again continues where it stopped.
demo: venv
	$(PY) examples/cu-emt/demo.py demo-run

bench: venv
	$(PY) benchmarks/bench_rlekf_vs_adam.py

# Quantum ESPRESSO (pw.x and its pseudopotentials) for examples/cu-qe and tests/test_cu_qe.py;
# installed with apt when pw.x is missing (as root on Debian/Ubuntu, as CI runs)
.PHONY: qe
qe:
	command -v pw.x >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq quantum-espresso quantum-espresso-data)

# Debian's chromium, for tests/test_report_page.py (the report page in a headless browser);
# installed with apt when missing, as root (the test skips, saying so, without it)
.PHONY: chromium
chromium:
	command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) || echo "chromium not installed: tests/test_report_page.py will skip"

# Debian's Slurm (slurmctld, slurmd, client) and munge, for tests/test_slurm.py (a one-host cluster
# started by the tests themselves); installed with apt when missing, as root (the tests skip, saying
# so, without them)
.PHONY: slurm
slurm:
	if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge); then :; \
	else echo "Slurm not installed (it needs root and apt): tests/test_slurm.py will skip"; fi

clean:
	rm -rf $(VENV) build *.egg-info
