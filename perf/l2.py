#!/usr/bin/env python3
"""L2 (TAP, `--l2`) against L3 (TUN) sessions, in one run (issue 26's benchmark).

  sudo python3 perf/l2.py [--quick] [--agent target/release/agent] [--no-build]

Two agents in two namespaces, once with TUNs (the reference) and once with TAPs in an
Ethernet session, same binary, same addresses, same MTU (--mtu, 1500), one after the other: TCP 1 flow (iperf3),
UDP 64 B (delivered packets per second, iperf3 -b 0) and idle ping (p50/p99). Target from
the issue: L2 at least 0.9x L3. Writes perf/results/l2-<date>-<commit>.json and .md.
Needs root, iperf3, ping, RabbitMQ on 127.0.0.1:5672 (guest/guest).
"""

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
TAG = f"tbl{os.getpid() % 100000}"
PROCS: list[subprocess.Popen] = []
NAMESPACES: list[str] = []


def log(msg: str) -> None:
    print(f"[l2] {msg}", file=sys.stderr, flush=True)


def spawn(cmd, **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, **kw)
    PROCS.append(p)
    return p


def stop(p: subprocess.Popen, sig=signal.SIGINT, grace: float = 10.0) -> None:
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            p.kill()
            p.wait()


def cleanup() -> None:
    for p in reversed(PROCS):
        stop(p)
    for ns in NAMESPACES:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def netns(name: str) -> str:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    NAMESPACES.append(name)
    return name


def in_ns(ns, cmd):
    return ["ip", "netns", "exec", ns, *cmd]


def wait_ping(ns, dst: str, timeout: float = 30) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if subprocess.run(in_ns(ns, ["ping", "-c", "1", "-W", "1", dst]), capture_output=True).returncode == 0:
            return
    raise RuntimeError(f"no ping reply from {dst}")


def ping(ns, dst: str, count: int) -> dict:
    r = subprocess.run(in_ns(ns, ["ping", "-n", "-i", "0.01", "-c", str(count), "-W", "1", dst]), capture_output=True, text=True)
    t = sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", r.stdout))
    if not t:
        return {"error": "no replies"}
    return {"p50_ms": t[len(t) // 2], "p99_ms": t[min(len(t) - 1, int(len(t) * 0.99))], "received": len(t), "sent": count}


def iperf(client_ns, server_ns, dst: str, seconds: float, extra: list[str]) -> dict:
    srv = spawn(in_ns(server_ns, ["iperf3", "-s", "-1", "-B", dst, "-p", "5201"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    try:
        r = subprocess.run(in_ns(client_ns, ["iperf3", "-c", dst, "-p", "5201", "-t", str(seconds), "-J", "--connect-timeout", "5000", *extra]),
                           capture_output=True, text=True, timeout=seconds + 40)
        d = json.loads(r.stdout)
        if "error" in d:
            return {"error": d["error"]}
        if "-u" in extra:
            rcv = d["end"].get("sum_received") or d["end"]["sum"]
            return {"delivered_pps": (rcv["packets"] - rcv["lost_packets"]) / rcv["seconds"], "loss_percent": rcv["lost_percent"]}
        return {"gbit_per_s": d["end"]["sum_received"]["bits_per_second"] / 1e9}
    except Exception as e:  # a failed workload is reported, the rest goes on
        return {"error": str(e)[:200]}
    finally:
        stop(srv)


def pair(agent: Path, key: str, plan: dict) -> dict:
    session = f"{TAG}{key}"
    extra = (["--l2"] if key == "l2" else []) + ["--mtu", str(plan["mtu"])]
    ns = [netns(f"{TAG}-{key}-{s}") for s in "ab"]
    procs = []
    for i, n in enumerate(ns):
        cmd = [str(agent), "connect", "--url", URL, "--session", session, "--name", f"{TAG}-{key}-{i}", "--stats-interval", "0",
               "--netns", n, "--ipv4", f"198.18.91.{i + 1}/24", "--ipv6", f"fd00:91::{i + 1}/64", *extra]
        procs.append(spawn(cmd, stdout=subprocess.DEVNULL, stderr=open(f"/tmp/{TAG}-{key}-{i}.log", "w")))
    res: dict = {}
    try:
        wait_ping(ns[0], "198.18.91.2")
        res["ping_idle"] = ping(ns[0], "198.18.91.2", plan["pings"])
        res["tcp_1"] = iperf(ns[0], ns[1], "198.18.91.2", plan["tcp_s"], [])
        res["udp_64"] = iperf(ns[0], ns[1], "198.18.91.2", plan["udp_s"], ["-u", "-b", "0", "-l", "64"])
    finally:
        for p in procs:
            stop(p)
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
            NAMESPACES.remove(n)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--agent", default=str(ROOT / "target" / "release" / "agent"))
    ap.add_argument("--mtu", type=int, default=1500, help="both sessions' MTU (the same link for both)")
    ap.add_argument("--rounds", type=int, default=2, help="L3 then L2, this many times (alternating evens out a busy machine)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("run as root (namespaces, TUN/TAP devices)")
        return 1
    agent = Path(args.agent)
    if not args.no_build and agent == ROOT / "target" / "release" / "agent":
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "agent"], cwd=ROOT, check=True)
    plan = {"tcp_s": 3 if args.quick else 8, "udp_s": 2 if args.quick else 4, "pings": 200 if args.quick else 500, "mtu": args.mtu}
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))
    res: dict = {"plan": plan, "agent": str(agent), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "rounds": []}
    try:
        for r in range(args.rounds):
            round_res = {}
            for key in ["l3", "l2"]:
                log(f"round {r + 1}: {key}")
                round_res[key] = pair(agent, key, plan)
                log(f"  {json.dumps(round_res[key])}")
            res["rounds"].append(round_res)
    finally:
        cleanup()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = ROOT / "perf" / "results" / f"l2-{stamp}-{commit}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))

    def ratio(v, r):
        return f"{v / r:.2f}×" if isinstance(v, (int, float)) and isinstance(r, (int, float)) and r else "-"

    lines = ["| round | session | TCP 1 flow (Gbit/s) | vs L3 | UDP 64 B (pkt/s) | vs L3 | ping p50 (ms) | ping p99 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for i, rr in enumerate(res["rounds"]):
        ref = rr.get("l3", {})
        for key, s in rr.items():
            tcp = s.get("tcp_1", {}).get("gbit_per_s")
            udp = s.get("udp_64", {}).get("delivered_pps")
            lines.append(f"| {i + 1} | {key} | {tcp if tcp is None else f'{tcp:.2f}'} | {ratio(tcp, ref.get('tcp_1', {}).get('gbit_per_s'))} | "
                         f"{udp if udp is None else f'{udp:.0f}'} | {ratio(udp, ref.get('udp_64', {}).get('delivered_pps'))} | "
                         f"{s.get('ping_idle', {}).get('p50_ms')} | {s.get('ping_idle', {}).get('p99_ms')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
