#!/usr/bin/env bash
# Makes a Debian machine ready for tunbus, as root: installs what is missing
# (iproute2, ping, iperf3, tcpdump, openssl, RabbitMQ; nftables, dnsmasq, socat and busybox
# for gateway, Ethernet and serial test hosts) and starts the broker when it is not running.
# Idempotent and quiet when everything is already there. Sourced by demo.sh and test.sh.
set -euo pipefail

say() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "run as root: tunbus creates TUN devices and network namespaces"; exit 1
fi

missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v ping >/dev/null 2>&1 || missing+=(iputils-ping)
command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
command -v tcpdump >/dev/null 2>&1 || missing+=(tcpdump)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
[ -x /usr/sbin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
# Test hosts for gateways, Ethernet sessions and serial probes.
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v dnsmasq >/dev/null 2>&1 || missing+=(dnsmasq-base)
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v busybox >/dev/null 2>&1 || missing+=(busybox)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # iperf3 asks whether to start a daemon; the answer is no.
  echo 'iperf3 iperf3/start_daemon boolean false' | debconf-set-selections 2>/dev/null || true
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  say "cargo not found: install Rust 1.88 or newer (rustup, https://rustup.rs), then run this again"; exit 1
fi
rustc_minor=$(rustc --version 2>/dev/null | sed -n 's/^rustc 1\.\([0-9]*\).*/\1/p')
if [ -n "$rustc_minor" ] && [ "$rustc_minor" -lt 88 ]; then
  say "$(rustc --version) is too old: the locked crates need Rust 1.88 or newer (rustup update stable)"; exit 1
fi

[ -e /dev/net/tun ] || modprobe tun 2>/dev/null || true
if [ ! -e /dev/net/tun ]; then
  say "/dev/net/tun is missing and the tun module could not be loaded"; exit 1
fi

broker_answers() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
# Debian's wrapper starts the node through `su rabbitmq`, whose soft limit of open files is
# 1024: a lab of 300 hosts needs about 900 connections. Start it the wrapper's way with the
# limit raised to the hard limit (at most 65536).
start_broker() {
  local server=/usr/lib/rabbitmq/bin/rabbitmq-server
  if [ -x "$server" ] && id rabbitmq >/dev/null 2>&1; then
    su rabbitmq -s /bin/sh -c "cd /var/lib/rabbitmq; n=\$(ulimit -Hn); \
      if [ \"\$n\" = unlimited ] || [ \"\$n\" -gt 65536 ]; then n=65536; fi; ulimit -Sn \"\$n\"; \
      exec $server -detached"
  else
    rabbitmq-server -detached
  fi
}
if ! broker_answers; then
  say "starting RabbitMQ (rabbitmq-server -detached)"
  start_broker >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    broker_answers && break
    sleep 0.5
  done
  broker_answers || { say "RabbitMQ did not start; see /var/log/rabbitmq/"; exit 1; }
  rabbitmqctl -q await_startup >/dev/null 2>&1 || true
fi
