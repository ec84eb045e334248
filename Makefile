# Two commands matter: `make dev` runs the system, `make test` runs every test.
SHELL := /bin/bash
.PHONY: test dev bench
test:
	./scripts/test.sh
