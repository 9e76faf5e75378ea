# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# HOST / PORT given (make serve PORT=9000) override the settings file's server.host / server.port; not given,
# the file's (127.0.0.1:8000 in configs/default.yaml) or TURBOSERVE_SERVER__PORT decide.
HOST ?=
PORT ?=
CONFIG ?= configs/default.yaml

.PHONY: serve test redis-server nginx prometheus install install-dev bench simulate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned exactly: CPU wheel here, CUDA build on a GPU host.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e . --config-settings editable_mode=compat
	touch $@

# PyPI's `kernels` (pulled in by transformers >= 5.25, now excluded by pyproject.toml) has the import name of
# this repository's kernels/ package; a venv that once had it gets it removed here.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	$(BIN)/python -c "import importlib.metadata as m; m.distribution('kernels')" 2>/dev/null && $(BIN)/pip uninstall -y -q kernels || true
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/turboserve serve --config $(CONFIG) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# The embedding tests start real Redis servers (Debian's redis-server).
redis-server:
	@command -v redis-server >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server || ($$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server); }

# The monitoring test scrapes a real server with Debian's prometheus.
prometheus:
	@command -v prometheus >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus || ($$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus); }

# The scale-out test puts two replicas behind Debian's nginx (deploy/nginx/turboserve.conf).
nginx:
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light || ($$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light); }

test: install-dev redis-server prometheus nginx
	$(BIN)/python -m pytest -q

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(BIN)/pip install -q -e '.[dev,bench]' --config-settings editable_mode=compat
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/loadgen.py --spawn --concurrency 32 --requests 600 --baseline --single

simulate: $(VENV)/.installed-bench
	$(BIN)/turboserve profile
	$(BIN)/python bench/simulate.py

clean:
	rm -rf $(VENV) .pytest_cache
