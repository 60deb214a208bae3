#!/usr/bin/env python3
"""Through a gateway agent against agent to agent, in one run (issue 25's benchmark).

  sudo python3 perf/routes.py [--seconds 10] [--rounds 2] [--agent PATH]

Measures, on this machine and in the same run, TCP 1 flow (iperf3) and ping RTT from h1:
  agent-agent  h1 -> h2, two TUN agents in two namespaces (the reference)
  via-gateway  h1 -> a host on a veth network behind agent gw, which advertises its prefix
               (h1 runs --accept-routes; gw's kernel forwards)
Rounds alternate the two paths so that the machine's drift hits both alike. Target
(issue 25): via-gateway at least 0.8x agent-agent. Writes
perf/results/routes-<date>-<commit>.json. Needs root, iperf3, ping, RabbitMQ on
127.0.0.1:5672 (guest/guest). The agent defaults to target/release/agent, else
target/debug/agent (the dev profile is optimized too).
"""

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
TAG = f"tbr{os.getpid() % 100000}"
PROCS: list[subprocess.Popen] = []
NAMESPACES: list[str] = []


def log(msg: str) -> None:
    print(f"[routes] {msg}", file=sys.stderr, flush=True)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def netns(name: str) -> str:
    ns = f"{TAG}{name}"
    sh("ip", "netns", "add", ns)
    NAMESPACES.append(ns)
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    return ns


def agent(binary: Path, ns: str, session: str, v4: str, *extra: str) -> subprocess.Popen:
    cmd = [str(binary), "connect", "--url", URL, "--session", session, "--name", ns, "--netns", ns, "--ipv4", v4, "--stats-interval", "0", *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"/tmp/{ns}.log", "w"))
    PROCS.append(p)
    return p


def wait_ping(ns: str, dst: str, limit: float = 20.0) -> None:
    t0 = time.time()
    while time.time() - t0 < limit:
        if subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", dst], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"{dst} never answered from {ns}")


def iperf(ns: str, dst: str, seconds: int) -> float:
    out = sh("ip", "netns", "exec", ns, "iperf3", "-c", dst, "-t", str(seconds), "-J")
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def rtt(ns: str, dst: str, count: int = 50) -> dict:
    out = sh("ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", "0.02", dst)
    times = sorted(float(m) for m in re.findall(r"time=([0-9.]+) ms", out))
    return {"p50_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))]}


def cleanup() -> None:
    for p in PROCS:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in PROCS:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    for ns in NAMESPACES:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--agent", type=Path)
    a = ap.parse_args()
    binary = a.agent or next((p for p in [ROOT / "target/release/agent", ROOT / "target/debug/agent"] if p.exists()), None)
    if binary is None:
        raise SystemExit("build the agent first (cargo build --release)")
    session = TAG
    try:
        h1, h2, gw, lan = netns("h1"), netns("h2"), netns("gw"), netns("lan")
        sh("ip", "-n", gw, "link", "add", "vlan", "type", "veth", "peer", "name", "vgw", "netns", lan)
        sh("ip", "-n", gw, "addr", "add", "198.19.90.1/24", "dev", "vlan")
        sh("ip", "-n", gw, "link", "set", "vlan", "up")
        sh("ip", "-n", lan, "addr", "add", "198.19.90.2/24", "dev", "vgw")
        sh("ip", "-n", lan, "link", "set", "vgw", "up")
        sh("ip", "-n", lan, "route", "add", "default", "via", "198.19.90.1")
        agent(binary, h2, session, "198.18.90.2/24")
        agent(binary, gw, session, "198.18.90.9/24", "--advertise", "198.19.90.0/24")
        agent(binary, h1, session, "198.18.90.1/24", "--accept-routes")
        for ns in (h2, lan):
            PROCS.append(subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ping(h1, "198.18.90.2")
        wait_ping(h1, "198.19.90.2")
        time.sleep(1)
        paths = {"agent-agent": "198.18.90.2", "via-gateway": "198.19.90.2"}
        tcp = {k: [] for k in paths}
        for r in range(a.rounds):
            for name, dst in paths.items():
                g = iperf(h1, dst, a.seconds)
                tcp[name].append(g)
                log(f"round {r + 1}: {name} TCP 1 flow {g:.2f} Gbit/s")
        result = {name: {"tcp_gbit_s": round(statistics.mean(v), 3), "rounds": [round(x, 3) for x in v], **rtt(h1, paths[name])} for name, v in tcp.items()}
        result["ratio"] = round(result["via-gateway"]["tcp_gbit_s"] / result["agent-agent"]["tcp_gbit_s"], 3)
        commit = sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD").strip()
        meta = {"date": datetime.date.today().isoformat(), "commit": commit, "agent": str(binary), "seconds": a.seconds, "rounds": a.rounds}
        out = ROOT / "perf" / "results" / f"routes-{meta['date']}-{commit}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        log(f"written {out}")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
