#!/usr/bin/env python3
"""Classic against quorum queues on a private 3-node cluster, with the broker bench
(examples/broker_bench.rs): why tunbus keeps classic queues (decision 0018). The publisher
connects to node 1, the consumer (and so the queue's leader) to node 2. Prints JSON and
writes perf/results/queue-types.md.

    python3 perf/queue_types.py [--seconds 3] [--no-build]
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import nodes

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "target" / "release" / "examples" / "broker_bench"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--example", "broker_bench"], cwd=REPO, check=True)
    cluster = nodes.PrivateCluster(3)
    cluster.start()
    out = {}
    try:
        u = cluster.urls()
        for qt in ("classic", "quorum"):
            r = subprocess.run([str(BENCH), "--url", u[1], "--publish-url", u[0], "--queue-type", qt, "--seconds", str(a.seconds),
                                "--sizes", "1536,262144", "--latency-samples", "300", "--latency-gaps", "0"],
                               capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            out[qt] = json.loads(r.stdout)
    finally:
        cluster.stop()
    md = ["## Queue types on a 3-node cluster (perf/queue_types.py)", "",
          "One publisher on node 1, one consumer on node 2 (the queue's node), tunbus's own client.", "",
          "| queue type | 1.5 KiB msg/s | 256 KiB Gbit/s | one hop p50 (µs) |", "|---|---:|---:|---:|"]
    for qt, d in out.items():
        t = {x["size_bytes"]: x for x in d["throughput"]}
        md.append(f"| {qt} | {t[1536]['msg_per_s']:.0f} | {t[262144]['gbit_per_s']:.2f} | {d['one_hop_latency'].get('p50_us', 0):.0f} |")
    text = "\n".join(md) + "\n"
    (REPO / "perf" / "results" / "queue-types.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
