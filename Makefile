# `make dev` runs the system locally; `make test` runs every test; `make bench` measures.
SHELL := /bin/bash
.PHONY: dev test test-fast bench worker fuzz soak audit

dev:
	./scripts/dev.sh

test:
	./scripts/test.sh

# Unit and in-process tests only (about 40 s once built).
test-fast:
	./scripts/test-fast.sh

bench:
	./scripts/bench.sh
	./scripts/bench-instructions.sh
	./scripts/bench-edge.sh

# The edge Worker (edge/build/); installs its toolchain on first use.
worker:
	./scripts/build-worker.sh

# Fuzz the parsers (FUZZ_SECONDS per target, default 60).
fuzz:
	./scripts/fuzz.sh

# Mixed traffic through the whole stack (SOAK_SECONDS, default 300).
soak:
	./scripts/soak.sh

# Dependency audit with cargo-deny (deny.toml).
audit:
	./scripts/audit.sh
