#!/bin/bash
# Where a ping waits beside a bulk TCP flow (issue 28): two agents A and B (one queue each,
# ECN-capable TCP in both namespaces), iperf3 A->B for 12 s (saturating, or paced with
# IPERF_ARGS="-b 2G"), a ping A->B every 10 ms beside it; prints the ping's p50/p99/p99.9,
# the flow's rate, each agent's one-way latency (sender's TUN read -> receiver's TUN write)
# and the CE marks the receiver's queue management set.
#
#   sudo perf/loaded_latency.sh ["AGENT ARGS"]          (default "--queues 1")
#   sudo IPERF_ARGS="-b 1G" perf/loaded_latency.sh
#   sudo TSQ=65536 perf/loaded_latency.sh                (TCP small queues in both namespaces)
#
# Needs root, iperf3, ping and RabbitMQ on 127.0.0.1:5672; uses target/release/agent.
# Removes its namespaces and processes, also on Ctrl-C.
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
AG=$HERE/target/release/agent
A=tbla$$; B=tblb$$; S=tbl$$; OUT=$(mktemp -d)
PIDS=""
cleanup() { [ -n "$PIDS" ] && kill -INT $PIDS 2>/dev/null; wait 2>/dev/null; ip netns del $A 2>/dev/null; ip netns del $B 2>/dev/null; rm -rf "$OUT"; }
trap cleanup EXIT INT TERM
ip netns add $A; ip netns add $B
for n in $A $B; do
  ip netns exec $n sysctl -qw net.ipv4.tcp_ecn=1
  [ -n "${TSQ:-}" ] && ip netns exec $n sysctl -qw net.ipv4.tcp_limit_output_bytes=$TSQ
done
i=1
for n in $A $B; do
  $AG connect --url amqp://guest:guest@127.0.0.1:5672/%2f --session $S --name $S$i --netns $n --ipv4 198.18.77.$i/24 \
    --stats-interval 0 --stats-json $OUT/$i.json ${1:---queues 1} > $OUT/$i.out 2> $OUT/$i.err &
  PIDS="$PIDS $!"; i=$((i+1))
done
for _ in $(seq 50); do ip netns exec $A ping -c1 -W1 198.18.77.2 >/dev/null 2>&1 && break; sleep 0.2; done
ip netns exec $B iperf3 -s -1 -B 198.18.77.2 >/dev/null 2>&1 &
sleep 0.5
ip netns exec $A iperf3 -c 198.18.77.2 -t 12 ${IPERF_ARGS:-} > $OUT/iperf 2>&1 &
IP=$!
sleep 2
ip netns exec $A ping -i 0.01 -c 800 198.18.77.2 | grep -o "time=[0-9.]*" | cut -d= -f2 | sort -n |
  awk '{a[NR]=$1} END {print "ping beside the flow: p50",a[int(NR*0.5)],"ms, p99",a[int(NR*0.99)],"ms, p99.9",a[int(NR*0.999)],"ms"}'
wait $IP
grep receiver $OUT/iperf | awk '{print "flow:", $7, $8}'
kill -INT $PIDS; wait $PIDS 2>/dev/null; PIDS=""
for i in 1 2; do
  python3 -c "import json,sys; d=json.load(open('$OUT/$i.json')); l=d['latency']; print('agent', 'AB'[$i-1], 'one-way p50', l['p50_us'], 'us, p99', l['p99_us'], 'us; CE marked', d['ce_marked'], '; drops', d['drops'])"
done
