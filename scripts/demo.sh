#!/usr/bin/env bash
# The main job: a 4-host tunbus lab on this machine (namespaces tb-h1..tb-h4, one agent
# each, all talking through RabbitMQ), checked with ping over IPv4 and IPv6 between all
# pairs and an iperf3 TCP sample, then a report, then everything removed.
# Extra arguments go to `agent lab` (e.g. --hosts 8, --keep, --queues 2).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --locked --bin agent 2>&1 | tail -n 1
exec target/release/agent lab --hosts 4 "$@"
