# `make dev` runs the system locally; `make test` runs every test; `make bench` measures.
SHELL := /bin/bash
.PHONY: dev test bench

dev:
	./scripts/dev.sh

test:
	./scripts/test.sh

bench:
	./scripts/bench.sh
