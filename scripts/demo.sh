#!/usr/bin/env bash
# The main job: a 4-host tunbus lab on this machine (namespaces tb-h1..tb-h4, one agent
# each, all talking through RabbitMQ), checked with ping over IPv4 and IPv6 between all
# pairs and an iperf3 TCP sample, then a report, then everything removed.
# Extra arguments go to `agent lab` (e.g. --hosts 8, --keep, --queues 2); --hosts 4 is
# added only when they give no --hosts of their own.
# TUNBUS_AGENT=PATH runs that binary instead of building the release one (the README's
# test, tests/readme.rs, uses the binary it built).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
agent=${TUNBUS_AGENT:-}
if [ -z "$agent" ]; then
  cargo build --release --locked --bin agent 2>&1 | tail -n 1
  agent=${CARGO_TARGET_DIR:-target}/release/agent
fi
hosts=(--hosts 4)
for a in "$@"; do
  case "$a" in --hosts|--hosts=*) hosts=() ;; esac
done
exec "$agent" lab "${hosts[@]}" "$@"
