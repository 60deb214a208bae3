#!/usr/bin/env python3
"""tunbus over TLS against RabbitMQ alone through the same TLS listener, in one run (issue 28).

  sudo python3 perf/tls.py [--rounds 2] [--seconds 5] [--no-build]

On this 2-core machine the broker's own TLS is the measured limit, so tunbus over TLS is
judged against RabbitMQ alone through the same listener: one private node of this run with
a TLS listener (perf/nodes.py, certificates made here), then, alternated for `--rounds`:

- `broker-tls`: examples/broker_bench.rs over amqps:// (tunbus's own AMQP client, one
  publisher and one consumer, one queue) with the message sizes tunbus sends in one TCP
  flow (64 KiB and 256 KiB batches; the agents' reports give the sizes of the run);
- `tunbus-tls`: two agents (`--queues 1`) over amqps:// to that node, one TCP flow;
- the same two over amqp:// to the same node (`broker-plain`, `tunbus-plain`), for scale.

Target: tunbus over TLS at least 0.9x of RabbitMQ alone over TLS at the batch size tunbus
sent. Writes perf/results/tls-<date>-<commit>.json and prints a Markdown table.
"""

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nodes  # noqa: E402  (perf/nodes.py)
import run as perf  # noqa: E402  (perf/run.py)

SIZES = [65536, 262144]


def broker_bench(url: str, ca: str | None, seconds: float) -> dict:
    cmd = [str(perf.BROKER_BENCH), "--url", url, "--seconds", str(seconds), "--sizes", ",".join(map(str, SIZES)),
           "--latency-samples", "200", "--latency-gaps", "0"]
    if ca:
        cmd += ["--tls-ca", ca]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * len(SIZES) * 3 + 60, env={**os.environ, "RUST_BACKTRACE": "0"})
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-300:]}
    return json.loads(r.stdout)


def gbit(bench: dict, size: int) -> float | None:
    for t in bench.get("throughput", []):
        if t.get("size_bytes") == size:
            return t.get("gbit_per_s")
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds [2]")
    ap.add_argument("--seconds", type=float, default=5, help="seconds per measurement [5]")
    ap.add_argument("--no-build", action="store_true", help="use target/release as it is")
    ap.add_argument("--out", default=str(perf.REPO / "perf" / "results"), help="results directory")
    args = ap.parse_args()
    perf.prepare("perf/tls.py", args.no_build, ("broker_bench",))
    plan = dict(tcp_s=args.seconds, omit=1, tcp8=False, udp_s=2, ping_count=100, ping_interval=0.01, mtu=9000)
    now = dt.datetime.now(dt.timezone.utc)
    res = {"date": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "commit": perf.git_commit(), "rounds": []}
    node = nodes.PrivateNode(tls=True)
    try:
        node.start()
        node.add_user("tbperf", "tbperf-password")
        tls_url = f"amqps://tbperf:tbperf-password@localhost:{node.tls_port}/%2f"
        plain_url = f"amqp://tbperf:tbperf-password@127.0.0.1:{node.port}/%2f"
        ca = str(node.certs["ca"])
        with tempfile.TemporaryDirectory(prefix="tbtls-") as d:
            for i in range(args.rounds):
                r = {}
                for name, fn in [
                    ("broker-tls", lambda: broker_bench(tls_url, ca, args.seconds)),
                    ("tunbus-tls", lambda: perf.system_tunbus(plan, 1, Path(d), key="tunbus-tls", url=tls_url, url_args=["--tls-ca", ca], subnet=20, subset={"tcp_1"})),
                    ("broker-plain", lambda: broker_bench(plain_url, None, args.seconds)),
                    ("tunbus-plain", lambda: perf.system_tunbus(plan, 1, Path(d), key="tunbus-node", url=plain_url, subnet=21, subset={"tcp_1"})),
                ]:
                    perf.log(f"round {i + 1}: {name}")
                    try:
                        r[name] = fn()
                    except Exception as e:
                        perf.log(f"{name} FAILED: {e}")
                        r[name] = {"error": str(e)}
                res["rounds"].append(r)
    finally:
        node.stop()
        perf.CLEANUP.all()
    path = perf.write_results(args.out, "tls", res, now)
    print(f"\n# tunbus over TLS against RabbitMQ alone over TLS ({res['date']}, {res['commit']})\n")
    print("| round | broker TLS 64 KiB | broker TLS 256 KiB | tunbus TLS TCP 1 flow | mean batch bytes | tunbus / broker (nearest size) | broker plain 256 KiB | tunbus plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(res["rounds"]):
        b, t = r.get("broker-tls", {}), r.get("tunbus-tls", {})
        tg = perf.g(t, "tcp_1", "gbit_per_s")
        reports = t.get("agent_reports", {}) if isinstance(t, dict) else {}
        # The mean batch the sending agent published (bytes / batches of its report).
        batch = max((int(rep["tx"]["bytes"] / rep["tx"]["batches"]) for rep in reports.values() if rep.get("tx", {}).get("batches")), default=None)
        size = min(SIZES, key=lambda s: abs(s - batch)) if batch else SIZES[-1]
        limit = gbit(b, size)
        ratio = f"{tg / limit:.2f}x at {size // 1024} KiB" if tg and limit else "-"
        print(f"| {i + 1} | {perf.fmt(gbit(b, 65536))} | {perf.fmt(gbit(b, 262144))} | {perf.fmt(tg)} | {batch or '-'} | {ratio} | "
              f"{perf.fmt(gbit(r.get('broker-plain', {}), 262144))} | {perf.fmt(perf.g(r.get('tunbus-plain', {}), 'tcp_1', 'gbit_per_s'))} |")
    print(f"\n(results: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
