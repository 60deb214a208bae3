#!/usr/bin/env bash
# The whole test suite: unit and property tests, then the system tests against a real
# RabbitMQ, real TUN devices and network namespaces (which must run, not skip:
# TUNBUS_REQUIRE_SYSTEM_TESTS=1). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export TUNBUS_REQUIRE_SYSTEM_TESTS=1
exec cargo test --locked "$@"
