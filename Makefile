# provisioner: the two set-up commands are `make demo` and `make test` (see CONTRIBUTING.md). With
# no Go >= 1.24 on PATH, tools/build.sh gets the pinned one first (tools/go.sh).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CONFIG ?= examples/site.yaml
LISTEN ?= 127.0.0.1:8080
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: all venv system-deps kube-bins demo serve test test-fast bench soak check clean

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

system-deps:
	./scripts/install-system-deps.sh

# The real Kubernetes components (tools/k8s, tools/etcd, tools/kueue: pinned Go modules), built
# once into ~/.cache/provisioner and reused: a cold build of k8s takes about 8 min on 2 cores
# (measured 7m38s with the Debian packages and the venv, on an empty machine), Kueue's manager
# about as long again; later runs only check the binaries.
kube-bins:
	tools/build.sh etcd >/dev/null
	tools/build.sh k8s >/dev/null
	tools/build.sh kueue >/dev/null

# The whole thing on one machine (scripts/demo.py): a real SLURM cluster, a real Kubernetes control
# plane, BMC simulators, the boot server and two qemu VMs that network-boot from it; the balancer
# runs every few seconds and moves a VM between the slurm and the k8s image when work is pending.
# Interactive (Ctrl-C stops everything); scripted: make demo DEMO_ARGS='--duration 180'.
demo: system-deps venv kube-bins
	$(PY) scripts/demo.py $(DEMO_ARGS)

# Installs everything it needs (Debian packages, the venv) and runs the whole suite.
test: system-deps venv kube-bins
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only (no daemons): quick feedback while editing.
test-fast: venv
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

bench: system-deps venv kube-bins
	$(PY) -m bench.run

# The soak (bench/soak.py): two `provisioner run` hosts on PostgreSQL, the real daemons, a random
# workload and random faults for SOAK_S seconds; prints the counters that must be 0. SOAK_SEED=N replays.
SOAK_S ?= 900
soak: system-deps venv kube-bins
	SOAK_S=$(SOAK_S) $(PY) -m bench.run soak

# Just the boot endpoint, on the reference config (examples/site.yaml), state in var/.
serve: venv
	$(VENV)/bin/provisioner --config $(CONFIG) check
	$(VENV)/bin/provisioner --config $(CONFIG) serve --listen $(LISTEN)

check: venv
	$(VENV)/bin/provisioner --config $(CONFIG) check

clean:
	rm -rf $(VENV) var .cache .pytest_cache build *.egg-info
