# VMThunder build, test, bench and demo entry points.
GO        ?= go
PYTHON    ?= python3
GOFLAGS   ?=
FUZZTIME  ?= 10s
BIN       := bin/vmthunder

.PHONY: all build test test-go test-fuzz test-python python-deps lint bench bench-bulk demo clean

all: build

build: $(BIN)

$(BIN): FORCE
	$(GO) build $(GOFLAGS) -o $(BIN) ./sidecar/cmd/vmthunder

FORCE:

# The Python test tools and the OpenStack libraries the shims are tested
# against go into the Python the tests run, $(PYTHON). This is a make step,
# not part of scripts/install-deps.sh: under sudo, PATH names another
# Python (Debian's refuses pip installs: PEP 668).
python-deps:
	$(PYTHON) -m pip install -q --root-user-action=ignore -r requirements-test.txt

lint: python-deps
	@test -z "$$(gofmt -l sidecar tests)" || { echo "gofmt needed:"; gofmt -l sidecar tests; exit 1; }
	$(GO) vet ./...
	$(PYTHON) -m ruff check cinder-connector nova-plugin tests
	$(PYTHON) -m ruff format --check cinder-connector nova-plugin tests

# Every test: Go unit and end-to-end tests, short fuzz runs, Python shims.
test: build lint test-go test-fuzz test-python

test-go: build
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) $(GO) test $(GOFLAGS) -count=1 -timeout 25m -p 1 ./...

test-fuzz:
	bash tests/fuzz.sh $(FUZZTIME)

test-python: build python-deps
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) bash tests/python.sh

bench: build
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) bash tests/bench/run.sh

# Many simulated nodes (netns, tc caps) booting at once: direct iSCSI,
# sidecar, sidecar with peers (docs/bench-bulk.md). NODES=1,8,32 by default.
bench-bulk: build
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) bash tests/bench/bench-bulk.sh

demo: build
	VMTHUNDER_BIN=$(CURDIR)/$(BIN) bash tests/demo.sh

clean:
	rm -rf bin
