#!/usr/bin/env python3
"""End-to-end encryption's cost (issue 29's benchmark), with and without --e2e in one run.

  sudo python3 perf/e2e.py [--quick] [--no-build] [--queues 1]

Two TUN agents in two namespaces, each logged in as a broker user of its own (a peers file
needs distinct users), once in clear and once with --e2e (keys from `agent keygen`, the
peers file with their public keys), on the same machine in the same run: TCP 1 flow
(Gbit/s and the agents' CPU-s per GB), UDP 64 B (delivered packets per second) and idle
ping (p50/p99). The workloads are perf/run.py's. Writes
perf/results/e2e-<date>-<commit>.json and prints a Markdown table. Needs root, iperf3, ping,
rabbitmqctl and RabbitMQ on 127.0.0.1:5672; removes the users, namespaces and processes it
made, also on failure.
"""

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as perf  # noqa: E402  (perf/run.py: Host2, workloads, CLEANUP, build, preflight)

USERS: list[str] = []


def add_user(name: str) -> str:
    password = f"pw-{os.getpid()}-{name}"
    perf.run(["rabbitmqctl", "-q", "add_user", name, password])
    USERS.append(name)
    perf.run(["rabbitmqctl", "-q", "set_permissions", "-p", "/", name, ".*", ".*", ".*"])
    return f"amqp://{name}:{password}@127.0.0.1:5672/%2f"


def remove_users() -> None:
    for u in USERS:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", u], capture_output=True)
    USERS.clear()


def keygen(path: Path) -> str:
    r = subprocess.run([str(perf.AGENT), "keygen"], capture_output=True, text=True, check=True)
    path.write_text(r.stdout)
    path.chmod(0o600)
    return r.stderr.strip().removeprefix("public key: ")


def system(plan: dict, logdir: Path, e2e: bool, queues: int, subnet: int) -> dict:
    key = "tunbus-e2e" if e2e else "tunbus-clear"
    h = perf.Host2(key, subnet)
    session = f"{perf.TAG}{key.replace('-', '')}"
    names = [f"{perf.TAG}{key.replace('-', '')}{side}" for side in "ab"]
    urls = [add_user(n) for n in names]
    peers = logdir / f"{key}.peers"
    lines = []
    for i, (n, v4, v6) in enumerate([(names[0], h.addr_a, h.v6_a), (names[1], h.addr_b, h.v6_b)]):
        public = keygen(logdir / f"{key}-{i}.key")
        lines.append(f"{n} {v4}/32,{v6}/128 key={public}")
    peers.write_text("\n".join(lines) + "\n")
    agents = []
    try:
        h.create()
        for i, (ns, v4, v6) in enumerate([(h.ns_a, h.addr_a, h.v6_a), (h.ns_b, h.addr_b, h.v6_b)]):
            errlog = logdir / f"{names[i]}.log"
            cmd = [str(perf.AGENT), "connect", "--url", urls[i], "--session", session, "--name", names[i], "--netns", ns,
                   "--ipv4", f"{v4}/24", "--ipv6", f"{v6}/64", "--queues", str(queues), "--mtu", str(plan["mtu"]),
                   "--stats-interval", "0", "--peers", str(peers)]
            if e2e:
                cmd += ["--e2e", "--private-key", str(logdir / f"{key}-{i}.key")]
            p = perf.CLEANUP.spawn(cmd, stop_signal=signal.SIGINT, stdout=subprocess.PIPE, stderr=open(errlog, "w"), text=True,
                                   env={**os.environ, "NO_COLOR": "1"})
            agents.append((names[i], p, errlog))
        h.cpu_pids = [p.pid for _, p, _ in agents]
        try:
            h.wait_ping()
        except RuntimeError:
            for name, p, errlog in agents:
                perf.log(f"  {name} (exit {p.poll()}): {errlog.read_text()[-600:]}")
            raise
        res = perf.workloads(h, plan, measure_cpu=True, subset={"tcp_1", "udp_64", "ping_idle"})
        reports = {}
        for name, p, _ in agents:
            perf.CLEANUP.stop(p, signal.SIGINT, grace=15)
            reports[name[-1]] = perf.parse_agent_report(p.stdout.read() if p.stdout else "")
        res["agent_reports"] = reports
        return res
    finally:
        for _, p, _ in agents:
            perf.CLEANUP.stop(p, signal.SIGINT, grace=15)
        h.destroy()


def row(name: str, r: dict) -> str:
    g = perf.g
    return (f"| {name} | {perf.fmt(g(r, 'tcp_1', 'gbit_per_s'))} | {perf.fmt(g(r, 'tcp_1', 'cpu_s_per_gb'))} | "
            f"{perf.fmt(g(r, 'udp_64', 'delivered_pps'), digits=0)} | {perf.fmt(g(r, 'ping_idle', 'p50_ms'), digits=3)} | "
            f"{perf.fmt(g(r, 'ping_idle', 'p99_ms'), digits=3)} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs")
    ap.add_argument("--no-build", action="store_true", help="use target/release/agent as it is")
    ap.add_argument("--queues", type=int, default=1, help="queues per agent [1]")
    ap.add_argument("--out", default=str(perf.REPO / "perf" / "results"), help="results directory")
    args = ap.parse_args()
    perf.prepare("perf/e2e.py", args.no_build)
    if args.quick:
        plan = dict(tcp_s=3, omit=0, tcp8=False, udp_s=2, ping_count=200, ping_interval=0.01)
    else:
        plan = dict(tcp_s=8, omit=1, tcp8=False, udp_s=5, ping_count=500, ping_interval=0.01)
    plan["mtu"] = 9000
    now = dt.datetime.now(dt.timezone.utc)
    res = {"date": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "commit": perf.git_commit(), "plan": plan, "queues": args.queues, "systems": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="tbe2e-perf-") as d:
            # Alternated, so a drift of the machine's load falls on both.
            for e2e, subnet in [(False, 61), (True, 62)]:
                name = "tunbus-e2e" if e2e else "tunbus-clear"
                perf.log(f"{name}")
                try:
                    res["systems"][name] = system(plan, Path(d), e2e, args.queues, subnet)
                except Exception as e:
                    perf.log(f"{name} FAILED: {e}")
                    res["systems"][name] = {"error": str(e)}
    finally:
        perf.CLEANUP.all()
        remove_users()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-{now.strftime('%Y%m%d-%H%M')}-{res['commit']}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    print("| system | TCP 1 flow Gbit/s | CPU-s/GB (agents) | UDP 64 B delivered pps | idle ping p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for name, r in res["systems"].items():
        print(row(name, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
