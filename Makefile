# Workernator. `make demo` and `make test` work on a fresh Debian/Ubuntu machine as root:
# they install what they need themselves (a few Debian packages, without recommends; a .venv
# with the project). `make install` installs it for real (deploy/install.sh).

# The system Python when it is new enough: the venv must be usable by the api's unprivileged
# user, and an interpreter under /root (pyenv) is not.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; assert sys.version_info >= (3, 11)' \
            2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
APT    := DEBIAN_FRONTEND=noninteractive apt-get -y -q --no-install-recommends
WHEELS := dist
PREFIX := /opt/workernator

.PHONY: all venv system-deps lint test test-unit proto proto-check buf-lint demo clean \
        wheels install uninstall

all: test

# The virtualenv with the project and its dev tools. Rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "installing python3 (3.11+ needed)"; $(APT) update && $(APT) install python3 python3-venv; }
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  $(APT) update && $(APT) install python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@command -v openssl >/dev/null || { $(APT) update && $(APT) install openssl; }
	@touch $@

venv: $(STAMP)

# What the runner's sandbox needs from the system, checked at every run (quietly): nft for the
# jobs' egress firewall, ip for the tests' and the demo's networks, libseccomp (pyseccomp loads
# it) for the jobs' system call filter, and systemd's tools (systemd-analyze, -sysusers,
# -tmpfiles) for the tests of the units in deploy/.
system-deps:
	@export PATH="$$PATH:/usr/sbin:/sbin"; missing=; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2 ' || missing="$$missing libseccomp2"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v qemu-img >/dev/null || missing="$$missing qemu-utils"; \
	command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; $(APT) update && $(APT) install $$missing; \
	fi

lint: $(STAMP)
	@command -v shellcheck >/dev/null || { $(APT) update && $(APT) install shellcheck; }
	shellcheck deploy/*.sh scripts/*.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy bench/*.py  # not a package: the benchmarks are scripts
	$(BIN)/lint-imports
	PYTHON=$(BIN)/python bash scripts/check_proto.sh
	@$(MAKE) --no-print-directory buf-lint

# Regenerate workernator_api/_proto from proto/ (pinned grpcio-tools); commit the result.
proto: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/gen_proto.sh

proto-check: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/check_proto.sh

# buf lint of the proto (buf is the dev dependency buf-bin, in the venv).
buf-lint: $(STAMP)
	bash scripts/buf_lint.sh

test: system-deps lint
	$(BIN)/pytest -q -ra

test-unit: $(STAMP)
	$(BIN)/pytest -q -ra tests/unit

# Install into a directory of its own (deploy/install.sh --code-only), start the runner (root)
# and the api (unprivileged) from there, run each job type from the CLI, remove it all.
demo: system-deps $(STAMP)
	bash scripts/demo.sh

# The project's wheel and its dependencies' wheels, in dist/: what deploy/install.sh installs.
wheels: $(STAMP)
	bash scripts/build_wheels.sh $(WHEELS)

# Code in $(PREFIX), the units, users, directories and example configs (deploy/install.sh);
# enables and starts nothing: see docs/operations.md.
install: system-deps wheels
	bash deploy/install.sh --prefix $(PREFIX) --wheels $(WHEELS)

# Removes the code and the units; keeps configs, state and users (deploy/uninstall.sh --purge
# removes them too).
uninstall:
	bash deploy/uninstall.sh --prefix $(PREFIX)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis $(WHEELS)
