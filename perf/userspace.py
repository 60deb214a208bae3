#!/usr/bin/env python3
"""Userspace endpoints against TUN agents, in one run (issue 23's benchmark).

  sudo python3 perf/userspace.py [--quick] [--no-build] [--labs 1000,10000]

Measures, on this machine and in the same run:
  tun-tun     two TUN agents in two namespaces (the reference)
  us-expose   a TUN agent (client, in a namespace) to a userspace agent run as nobody whose
              --expose relays to an iperf3 server on the host's loopback
  us-forward  a client on the host's loopback through the userspace agent's --forward to an
              iperf3 server in the TUN agent's namespace
with TCP 1 flow, UDP 64 B (delivered packets per second) and idle ping (p50/p99; from the
TUN agent's namespace). Then `agent lab --userspace --hosts N` for each N: bring-up time,
memory of the process per endpoint, broker connections, sampled pairs reachable.
Writes perf/results/userspace-<date>-<commit>.json and .md. Needs root, iperf3, ping,
setpriv, RabbitMQ on 127.0.0.1:5672 (guest/guest).
"""

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "target" / "release" / "agent"
URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
TAG = f"tbu{os.getpid() % 100000}"
PROCS: list[subprocess.Popen] = []
NAMESPACES: list[str] = []


def log(msg: str) -> None:
    print(f"[userspace] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    NAMESPACES.append(name)
    return name


def in_ns(ns, cmd):
    return ["ip", "netns", "exec", ns, *cmd] if ns else cmd


def agent(name: str, session: str, args: list[str], unprivileged: bool = False) -> subprocess.Popen:
    cmd = [str(AGENT), "connect", "--url", URL, "--session", session, "--name", name, "--stats-interval", "0", *args]
    if unprivileged:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", *cmd]
    return spawn(cmd, stdout=subprocess.DEVNULL, stderr=open(f"/tmp/{name}.log", "w"), env={**os.environ, "NO_COLOR": "1"})


def wait_ping(ns, dst: str, timeout: float = 20) -> None:
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


def iperf(client_ns, server_ns, dst: str, port: int, seconds: float, extra: list[str], bind: str, server_port: int | None = None) -> dict:
    """The client connects to dst:port; the server listens on bind:server_port (port when not
    given: an --expose maps the bus port to another local one)."""
    srv = spawn(in_ns(server_ns, ["iperf3", "-s", "-1", "-B", bind, "-p", str(server_port or port)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    try:
        r = subprocess.run(in_ns(client_ns, ["iperf3", "-c", dst, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000", *extra]),
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


def pair(key: str, plan: dict) -> dict:
    session = f"{TAG}{key.replace('-', '')}"
    ns_a = netns(f"{TAG}-{key}-a")
    a = agent(f"{TAG}-{key}-a", session, ["--netns", ns_a, "--ipv4", "198.18.90.1/24", "--ipv6", "fd00:90::1/64"])
    res: dict = {}
    if key == "tun-tun":
        ns_b = netns(f"{TAG}-{key}-b")
        b = agent(f"{TAG}-{key}-b", session, ["--netns", ns_b, "--ipv4", "198.18.90.2/24", "--ipv6", "fd00:90::2/64"])
        wait_ping(ns_a, "198.18.90.2")
        res["ping_idle"] = ping(ns_a, "198.18.90.2", plan["pings"])
        res["tcp_1"] = iperf(ns_a, ns_b, "198.18.90.2", 5201, plan["tcp_s"], [], "198.18.90.2")
        res["udp_64"] = iperf(ns_a, ns_b, "198.18.90.2", 5201, plan["udp_s"], ["-u", "-b", "0", "-l", "64"], "198.18.90.2")
        stop(b)
    else:
        local = free_port()
        fwd = free_port()
        b = agent(f"{TAG}-{key}-b", session, ["--userspace", "--ipv4", "198.18.90.2/24", "--ipv6", "fd00:90::2/64",
                                              "--expose", f"tcp:5201=127.0.0.1:{local}", "--expose", f"udp:5201=127.0.0.1:{local}",
                                              "--forward", f"tcp:127.0.0.1:{fwd}=198.18.90.1:5201", "--forward", f"udp:127.0.0.1:{fwd}=198.18.90.1:5201"],
                  unprivileged=True)
        wait_ping(ns_a, "198.18.90.2")
        res["ping_idle"] = ping(ns_a, "198.18.90.2", plan["pings"])
        if key == "us-expose":
            res["tcp_1"] = iperf(ns_a, None, "198.18.90.2", 5201, plan["tcp_s"], [], "127.0.0.1", server_port=local)
            res["udp_64"] = iperf(ns_a, None, "198.18.90.2", 5201, plan["udp_s"], ["-u", "-b", "0", "-l", "64"], "127.0.0.1", server_port=local)
        else:
            res["tcp_1"] = forward_iperf(ns_a, fwd, plan, [])
            res["udp_64"] = forward_iperf(ns_a, fwd, plan, ["-u", "-b", "0", "-l", "64"])
        stop(b)
    stop(a)
    for ns in [n for n in NAMESPACES if key in n]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        NAMESPACES.remove(ns)
    return res


def forward_iperf(ns_a: str, fwd: int, plan: dict, extra: list[str]) -> dict:
    """Client on the host's loopback (the forward's local port), server in the TUN agent's namespace on 5201."""
    srv = spawn(in_ns(ns_a, ["iperf3", "-s", "-1", "-B", "198.18.90.1", "-p", "5201"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    seconds = plan["udp_s"] if "-u" in extra else plan["tcp_s"]
    try:
        r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(fwd), "-t", str(seconds), "-J", "--connect-timeout", "5000", *extra],
                           capture_output=True, text=True, timeout=seconds + 40)
        d = json.loads(r.stdout)
        if "error" in d:
            return {"error": d["error"]}
        if "-u" in extra:
            rcv = d["end"].get("sum_received") or d["end"]["sum"]
            return {"delivered_pps": (rcv["packets"] - rcv["lost_packets"]) / rcv["seconds"], "loss_percent": rcv["lost_percent"]}
        return {"gbit_per_s": d["end"]["sum_received"]["bits_per_second"] / 1e9}
    except Exception as e:
        return {"error": str(e)[:200]}
    finally:
        stop(srv)


def broker_connections() -> int:
    r = subprocess.run(["rabbitmqctl", "-q", "list_connections", "name"], capture_output=True, text=True)
    return sum(1 for l in r.stdout.splitlines() if "->" in l)


def lab(hosts: int) -> dict:
    # The agent names no connection: count all of them beyond those before the lab.
    baseline = broker_connections()
    t0 = time.monotonic()
    out_json = f"/tmp/{TAG}-lab-{hosts}.json"
    p = spawn([str(AGENT), "lab", "--userspace", "--hosts", str(hosts), "--sample", "200", "--session", f"{TAG}us{hosts}", "--json", out_json],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conns = 0
    while p.poll() is None:
        time.sleep(0.5)
        conns = max(conns, broker_connections() - baseline)
    wall = time.monotonic() - t0
    try:
        rep = json.loads(Path(out_json).read_text())
    except Exception:
        return {"error": (p.stderr.read() or "")[-400:]}
    return {"hosts": hosts, "bring_up_s": rep.get("bring_up_s"), "pairs_checked": rep.get("pairs_checked"), "failures": len(rep.get("failures", [])),
            "rss_mib": rep.get("rss_mib"), "mib_per_endpoint": rep.get("rss_per_agent_mib"), "rtt_p50_ms": rep.get("rtt_p50_ms"),
            "broker_connections_seen": conns, "ok": rep.get("ok"), "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--labs", default="1000,10000")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("run as root (namespaces, TUN devices)")
        return 1
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "agent"], cwd=ROOT, check=True)
    plan = {"tcp_s": 3 if args.quick else 8, "udp_s": 2 if args.quick else 4, "pings": 200 if args.quick else 500}
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))
    res: dict = {"plan": plan, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "systems": {}, "labs": []}
    try:
        for key in ["tun-tun", "us-expose", "us-forward"]:
            log(f"{key}")
            res["systems"][key] = pair(key, plan)
            log(f"  {json.dumps(res['systems'][key])}")
        for n in [int(x) for x in args.labs.split(",") if x]:
            log(f"lab --userspace --hosts {n}")
            res["labs"].append(lab(n))
            log(f"  {json.dumps(res['labs'][-1])}")
    finally:
        cleanup()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = ROOT / "perf" / "results" / f"userspace-{stamp}-{commit}"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    ref = res["systems"].get("tun-tun", {})

    def ratio(v, r):
        return f"{v / r:.2f}×" if isinstance(v, (int, float)) and isinstance(r, (int, float)) and r else "-"

    lines = ["| system | TCP 1 flow (Gbit/s) | vs tun-tun | UDP 64 B (pkt/s) | vs tun-tun | ping p50 (ms) | vs tun-tun | ping p99 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for key, s in res["systems"].items():
        tcp = s.get("tcp_1", {}).get("gbit_per_s")
        udp = s.get("udp_64", {}).get("delivered_pps")
        p50 = s.get("ping_idle", {}).get("p50_ms")
        p99 = s.get("ping_idle", {}).get("p99_ms")
        lines.append(f"| {key} | {tcp if tcp is None else f'{tcp:.2f}'} | {ratio(tcp, ref.get('tcp_1', {}).get('gbit_per_s'))} | "
                     f"{udp if udp is None else f'{udp:.0f}'} | {ratio(udp, ref.get('udp_64', {}).get('delivered_pps'))} | "
                     f"{p50} | {ratio(p50, ref.get('ping_idle', {}).get('p50_ms'))} | {p99} |")
    lines += ["", "| lab --userspace | bring-up (s) | pairs checked | failures | MiB per endpoint | process RSS (MiB) | broker connections | ping p50 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for l in res["labs"]:
        lines.append(f"| {l.get('hosts')} hosts | {l.get('bring_up_s')} | {l.get('pairs_checked')} | {l.get('failures')} | {l.get('mib_per_endpoint')} | {l.get('rss_mib')} | {l.get('broker_connections_seen')} | {l.get('rtt_p50_ms')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
