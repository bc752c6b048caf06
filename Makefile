# VMThunder build, test, bench and demo entry points.
GO        ?= go
# Python tools, shims and the OpenStack services the tests run live in a venv
# made from Debian's python3 (scripts/install-deps.sh installs python3-venv).
BASE_PYTHON ?= /usr/bin/python3
VENV      ?= .venv
PYTHON    := $(VENV)/bin/python
GOFLAGS   ?=
FUZZTIME  ?= 10s
BIN       := bin/vmthunder

.PHONY: all build test test-go test-fuzz test-python python-deps lint bench bench-bulk demo demo-openstack clean

all: build

build: $(BIN)

$(BIN): FORCE
	$(GO) build $(GOFLAGS) -o $(BIN) ./sidecar/cmd/vmthunder

FORCE:

# The venv is (re)filled only when the lock file changes; pip install with
# the lock as constraints is incremental, so a venv in use is not removed.
venv: $(VENV)/.installed

$(VENV)/.installed: requirements-test.txt requirements-lock.txt
	test -x $(PYTHON) || $(BASE_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q --root-user-action=ignore pip==26.3
	$(PYTHON) -m pip install -q --root-user-action=ignore -r requirements-test.txt -c requirements-lock.txt
	$(PYTHON) -m pip check
	touch $@

# After changing requirements-test.txt: resolve again and pin the result.
venv-lock: venv
	$(PYTHON) -m pip install -q --root-user-action=ignore -r requirements-test.txt
	{ sed -n '/^#/p' requirements-lock.txt; $(PYTHON) -m pip freeze --all | grep -vi '^vmthunder'; } > requirements-lock.txt.new
	mv requirements-lock.txt.new requirements-lock.txt
	touch $(VENV)/.installed

python-deps: venv

lint: python-deps
	@test -z "$$(gofmt -l sidecar tests)" || { echo "gofmt needed:"; gofmt -l sidecar tests; exit 1; }
	$(GO) vet ./...
	$(PYTHON) -m ruff check cinder-connector nova-plugin tests
	$(PYTHON) -m ruff format --check cinder-connector nova-plugin tests

# Every test: Go unit and end-to-end tests, short fuzz runs, Python shims.
test: build lint test-go test-fuzz test-python

test-go: build venv
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) VMTHUNDER_PYTHON=$(CURDIR)/$(PYTHON) $(GO) test $(GOFLAGS) -count=1 -timeout 25m -p 1 ./...

test-fuzz:
	bash tests/fuzz.sh $(FUZZTIME)

test-python: build python-deps
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) PYTHON=$(CURDIR)/$(PYTHON) bash tests/python.sh

bench: build
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) bash tests/bench/run.sh

# Many simulated nodes (netns, tc caps) booting at once: direct iSCSI,
# sidecar, sidecar with peers (docs/bench-bulk.md). NODES=1,8,32 by default.
bench-bulk: build
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) bash tests/bench/bench-bulk.sh

# DEMO_ARGS=--openstack: the same wave through Nova's compute API
# (Nova's own services, a real Cinder, templates); also `make demo-openstack`.
demo: build
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) bash tests/demo.sh $(DEMO_ARGS)

demo-openstack: build
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) bash tests/demo.sh --openstack

clean:
	rm -rf bin
