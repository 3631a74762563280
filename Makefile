# Casebook: the two commands that do everything on a fresh machine.
#   make run   local stack up, migrations, demo data, server in the foreground
#   make test  set-up, then every test (Rust, then the deployment checks in deploy/tests)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
ENV := eval "$$(deploy/local/env.sh)"
CARGO ?= cargo
TEST_THREADS ?= 8

.PHONY: run test stack-up stack-down build lint bench

stack-up:
	@deploy/local/stack-up.sh

stack-down:
	@deploy/local/stack-down.sh

build: stack-up
	@$(CARGO) build --release --quiet --bin casebook

run: build
	@$(ENV); ./target/release/casebook migrate
	@$(ENV); ./target/release/casebook kb ingest kb/demo
	@$(ENV); export CASEBOOK_AUDIT_SIGNING_KEY="$${CASEBOOK_AUDIT_SIGNING_KEY:-$$(deploy/local/audit-key.sh)}"; \
		exec ./target/release/casebook serve

test: stack-up
	@# Headless Chromium for the status page's browser test (tests/it/status_page.rs).
	@deploy/local/chromium.sh >/dev/null
	@$(ENV); $(CARGO) build --workspace --all-targets --quiet
	@rm -rf target/test-logs
	@$(ENV); CASEBOOK_TEST_LOG_DIR=$$PWD/target/test-logs $(CARGO) test --workspace --quiet -- --test-threads $(TEST_THREADS)
	@# Everything the suite logged, searched for unmasked emails and phone numbers.
	@$(ENV); CASEBOOK_TEST_LOG_DIR=$$PWD/target/test-logs $(CARGO) test --quiet --test pii_scan -- --ignored
	@# The deployment: chart rendered, validated and scanned offline.
	@python="$$(deploy/local/python-tools.sh)"; PYTHONDONTWRITEBYTECODE=1 "$$python" -m pytest -q -p no:cacheprovider deploy/tests

lint:
	@$(CARGO) fmt --all -- --check
	@$(CARGO) clippy --workspace --all-targets --quiet -- -D warnings

bench: build
	@$(ENV); for b in append intake pipeline agent kb; do ./target/release/casebook bench $$b; done
