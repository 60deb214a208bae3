#!/usr/bin/env bash
# The whole test suite: formatting and lints (rustfmt, clippy) when the toolchain has them, a
# check that the library and the agent build for a non-Linux system (scripts/check-portable.sh), unit and
# property tests, then the system tests against a real RabbitMQ, real TUN devices and
# network namespaces (which must run, not skip: TUNBUS_REQUIRE_SYSTEM_TESTS=1). Extra
# arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --check >/dev/null || { echo "test: the code is not formatted as rustfmt.toml says: run cargo fmt" >&2; exit 1; }
else
  echo "test: rustfmt is not installed (rustup component add rustfmt): formatting not checked" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --locked --all-targets -- -D warnings
else
  echo "test: clippy is not installed (rustup component add clippy): lints not checked" >&2
fi
# The userspace path builds on a non-Linux system (a check for FreeBSD; see the script).
if command -v rustup >/dev/null 2>&1; then
  scripts/check-portable.sh
else
  echo "test: rustup is not installed: the non-Linux build is not checked" >&2
fi
export TUNBUS_REQUIRE_SYSTEM_TESTS=1
exec cargo test --locked "$@"
