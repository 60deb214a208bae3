#!/usr/bin/env python3
"""How long an idle broker takes to pass one message on, by the pace of the messages (issue 28's idle ping).

  sudo python3 perf/broker_wakeup.py [--no-build] [--gaps 0,10,200,1000] [--samples 12]

A ping through tunbus crosses the broker twice, so its idle latency is bounded below by two
broker hops at the ping's own pace. On this machine (a VM whose idle vCPUs halt) that hop
grows with the gap between messages. Two private RabbitMQ nodes of this run, one after the
other: RabbitMQ's defaults (its schedulers sleep at once when idle: `+sbwt none`), and the
same with the Erlang schedulers busy-waiting a while before sleeping (`+sbwt very_long
+sbwtdcpu very_long +sbwtdio very_long`, through RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS: a
setting of the broker, not of tunbus). On each: examples/broker_bench's one-hop latency of a
100-byte message at each gap, and a ping through two tunbus agents every 0.2 s and every
second. Prints a Markdown table; writes perf/results/broker-wakeup-<date>-<commit>.json.
"""

import argparse
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nodes  # noqa: E402
import run as perf  # noqa: E402

BUSY_WAIT = "+sbwt very_long +sbwtdcpu very_long +sbwtdio very_long"


class Node(nodes.PrivateNode):
    def __init__(self, extra_erl_args: str):
        super().__init__(tls=False)
        self.extra = extra_erl_args

    def env(self) -> dict:
        e = super().env()
        if self.extra:
            e["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = (e.get("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "") + " " + self.extra).strip()
        return e


def hops(url: str, gaps: list[int], samples: int) -> dict:
    cmd = [str(perf.BROKER_BENCH), "--url", url, "--seconds", "0.2", "--sizes", "1536", "--latency-samples", str(samples),
           "--latency-gaps", ",".join(map(str, gaps))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + samples * sum(gaps) / 1000 * 2)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-300:]}
    return {str(h["gap_ms"]): {"p50_us": h["p50_us"], "p99_us": h["p99_us"]} for h in json.loads(r.stdout)["one_hop_latency_by_gap"]}


def tunbus_pings(url: str, logdir: Path, subnet: int) -> dict:
    h = perf.Host2(f"wake{subnet}", subnet)
    procs = []
    try:
        h.create()
        session = f"{perf.TAG}wake{subnet}"
        for side, ns, v4 in [("a", h.ns_a, h.addr_a), ("b", h.ns_b, h.addr_b)]:
            cmd = [str(perf.AGENT), "connect", "--url", url, "--session", session, "--name", f"{session}{side}", "--netns", ns,
                   "--ipv4", f"{v4}/24", "--queues", "1", "--stats-interval", "0"]
            procs.append(perf.CLEANUP.spawn(cmd, stop_signal=signal.SIGINT, stdout=subprocess.DEVNULL, stderr=open(logdir / f"{session}{side}.log", "w")))
        h.wait_ping()
        return {"0.2 s": h.ping(25, 0.2), "1 s": h.ping(12, 1.0)}
    finally:
        for p in procs:
            perf.CLEANUP.stop(p, signal.SIGINT, grace=15)
        h.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gaps", default="0,10,200,1000", help="gaps between messages, ms [0,10,200,1000]")
    ap.add_argument("--samples", type=int, default=12, help="messages per gap [12]")
    ap.add_argument("--no-build", action="store_true", help="use target/release as it is")
    ap.add_argument("--out", default=str(perf.REPO / "perf" / "results"), help="results directory")
    args = ap.parse_args()
    perf.prepare("perf/broker_wakeup.py", args.no_build, ("broker_bench",))
    gaps = [int(g) for g in args.gaps.split(",")]
    now = dt.datetime.now(dt.timezone.utc)
    res = {"date": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "commit": perf.git_commit(), "nodes": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="tbwake-") as d:
            for i, (name, extra) in enumerate([("defaults", ""), ("busy-wait", BUSY_WAIT)]):
                perf.log(f"node with {name}")
                node = Node(extra)
                try:
                    node.start()
                    node.add_user("tbperf", "tbperf-password")
                    url = f"amqp://tbperf:tbperf-password@127.0.0.1:{node.port}/%2f"
                    res["nodes"][name] = {"hops": hops(url, gaps, args.samples), "pings": tunbus_pings(url, Path(d), 30 + i)}
                finally:
                    node.stop()
    finally:
        perf.CLEANUP.all()
    path = perf.write_results(args.out, "broker-wakeup", res, now)
    print(f"\n# An idle broker's hop by pace ({res['date']}, {res['commit']})\n")
    print("| broker node | " + " | ".join(f"one hop, {g} ms gap: p50 / p99 ms" for g in gaps) + " | tunbus ping every 0.2 s p50 / p99 ms | every 1 s |")
    print("|---|" + "---:|" * (len(gaps) + 2))
    for name, r in res["nodes"].items():
        cells = []
        for g in gaps:
            h = r["hops"].get(str(g), {})
            cells.append(f"{h.get('p50_us', 0) / 1000:.2f} / {h.get('p99_us', 0) / 1000:.2f}" if h else "-")
        for pace in ("0.2 s", "1 s"):
            p = r["pings"].get(pace, {})
            cells.append(f"{p.get('p50_ms', 0):.2f} / {p.get('p99_ms', 0):.2f}" if p else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n(results: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
