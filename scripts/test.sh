#!/usr/bin/env bash
# Installs what the tests need, builds, and runs every test: unit tests of the
# crates, and black-box tests of the built daemon with real clients.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

export CARGO_TERM_COLOR=never
# Everything is installed now: a test that finds a tool missing fails rather
# than skipping.
export BLKD_TESTS_NEED_TOOLS=1
cargo build --release --workspace --all-targets
# Tests that start QSD, QEMU or many daemons are heavy for 2 cores: run them
# two at a time.
cargo nextest run --release --workspace --no-fail-fast --test-threads 2 "$@"
