#!/usr/bin/env python3
"""End-to-end benchmark of tunbus against the limits of the machine it runs on.

One run measures, side by side and with the same workloads:

  veth        kernel only: a veth pair between two namespaces
  relay-plain userspace TUN<->TUN relay (examples/tun_relay.rs), no offloads
  relay-gso   the same relay with IFF_VNET_HDR offloads (TSO/USO super-packets)
  broker      RabbitMQ alone (examples/broker_bench.rs): msg/s, Gbit/s, one-hop latency
  tunbus-q1   two tunbus agents in two namespaces through the broker, --queues 1
  tunbus-q2   the same with --queues 2
  tunbus-noid the same as tunbus-q1 without the receivers' identity check (its cost)
  cluster-same / cluster-cross   --queues 1 through a private 3-node cluster, both agents
              on one node, and on two different nodes (TCP 1 flow, UDP 64 B, idle ping)
  tunbus-node / tunbus-tls   --queues 1 through a private RabbitMQ node of this run, over
              amqp:// and over amqps:// (TCP 1 flow, UDP 64 B, idle ping, CPU): TLS's cost

and writes a markdown table (each tunbus figure and its ratio to the relevant limit),
the same data as JSON, and an SVG picture into perf/results/. See perf/README.md.

Needs root, iperf3, ping, ip, cargo, and RabbitMQ on 127.0.0.1:5672 (guest/guest).
Everything it creates (namespaces, interfaces, processes, broker queues) is removed when
it ends, also on failure and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RELEASE = REPO / "target" / "release"
AGENT = RELEASE / "agent"
AGENT_ARGS: list[str] = []  # --agent-args
TUN_RELAY = RELEASE / "examples" / "tun_relay"
BROKER_BENCH = RELEASE / "examples" / "broker_bench"
BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2f"
IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")
TAG = f"tbp{os.getpid() % 100000}"  # unique per run; namespace names are <TAG>-<sys>-a/b

SYSTEMS = {
    "veth": "veth (kernel)",
    "relay-plain": "TUN relay, no offload",
    "relay-gso": "TUN relay, offload",
    "tunbus-q1": "tunbus --queues 1",
    "tunbus-q2": "tunbus --queues 2",
    "tunbus-noid": "tunbus q1, --no-identity-check",
    "tunbus-node": "tunbus q1, private node, amqp://",
    "tunbus-tls": "tunbus q1, private node, amqps://",
    "cluster-same": "tunbus q1, 3-node cluster, same node",
    "cluster-cross": "tunbus q1, 3-node cluster, two nodes",
    "tunbus-emu0": "tunbus q1, --emulate 'delay 0ms'",
    "tunbus-capture": "tunbus q1, agent capture running",
    "tunbus-noaqm": "tunbus q1, --no-aqm",
}
COLORS = {
    "veth": "#8c8c8c",
    "relay-plain": "#d4a017",
    "relay-gso": "#e06c00",
    "broker": "#6a4fc9",
    "tunbus-q1": "#1f77b4",
    "tunbus-q2": "#2ca02c",
    "tunbus-noid": "#9467bd",
    "tunbus-node": "#17becf",
    "tunbus-tls": "#d62728",
    "cluster-same": "#8c564b",
    "cluster-cross": "#e377c2",
    "tunbus-emu0": "#bcbd22",
    "tunbus-capture": "#7f7f7f",
    "tunbus-noaqm": "#aec7e8",
}
PCTS = [10, 25, 50, 75, 90, 95, 99, 99.5, 99.9]


def log(msg: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- cleanup

class Cleanup:
    """Everything this run started or created, undone in reverse order, exactly once."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen, int]] = []  # (process, signal to stop it)
        self.namespaces: list[str] = []

    def spawn(self, cmd: list[str], stop_signal: int = signal.SIGTERM, **kw) -> subprocess.Popen:
        # Own session: a Ctrl-C in the terminal reaches only us, and we stop children in order.
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.procs.append((p, stop_signal))
        return p

    def stop(self, p: subprocess.Popen, sig: int | None = None, grace: float = 10.0) -> int | None:
        """Stops one process we started (by its pid, never by name) and waits for it."""
        entry = next((e for e in self.procs if e[0] is p), None)
        if entry is not None:
            self.procs.remove(entry)
        if p.poll() is None:
            try:
                p.send_signal(sig if sig is not None else (entry[1] if entry else signal.SIGTERM))
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
        return p.returncode

    def add_namespace(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def del_namespace(self, name: str) -> None:
        if name in self.namespaces:
            self.namespaces.remove(name)
        subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL, check=False)

    def all(self) -> None:
        for p, sig in list(reversed(self.procs)):
            try:
                self.stop(p, sig, grace=5.0)
            except Exception as e:  # keep cleaning up the rest
                log(f"cleanup: stopping pid {p.pid}: {e}")
        for ns in list(reversed(self.namespaces)):
            self.del_namespace(ns)


CLEANUP = Cleanup()


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(cmd: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


# --------------------------------------------------------------------------- checks and build

def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (creates network namespaces and TUN devices): sudo python3 perf/run.py")
    for tool, pkg in [("iperf3", "iperf3"), ("ping", "iputils-ping"), ("ip", "iproute2"), ("cargo", "rustup/cargo"), ("openssl", "openssl")]:
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` not found (install {pkg})")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun is missing (modprobe tun)")
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=2):
            pass
    except OSError as e:
        problems.append(
            f"no AMQP broker on {BROKER_HOST}:{BROKER_PORT} ({e}); start RabbitMQ: "
            "`rabbitmq-server -detached && rabbitmqctl await_startup` (user guest/guest)"
        )
    if problems:
        for p in problems:
            print(f"perf/run.py: {p}", file=sys.stderr)
        sys.exit(2)


def build() -> None:
    log("cargo build --release --bin agent --examples (may wait for cargo's lock)")
    r = subprocess.run(["cargo", "build", "--release", "--bin", "agent", "--examples"], cwd=REPO)
    if r.returncode != 0:
        sys.exit("perf/run.py: the build failed; see cargo's output above")
    for p in (AGENT, TUN_RELAY, BROKER_BENCH):
        if not p.exists():
            sys.exit(f"perf/run.py: {p} is missing after the build")


def prepare(script: str, no_build: bool, examples: tuple[str, ...] = ()) -> None:
    """What every perf script does first: check the machine, end cleanly on Ctrl-C and
    SIGTERM (removing what it made), and build the agent (and `examples`) unless `no_build`."""
    preflight()
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    if no_build:
        return
    cmd = ["cargo", "build", "--release", "--bin", "agent"] + [a for e in examples for a in ("--example", e)]
    log(f"{' '.join(cmd)} (may wait for cargo's lock)")
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        sys.exit(f"{script}: the build failed")


def write_results(out_dir: str, stem: str, res: dict, when) -> Path:
    """`res` as perf/results/<stem>-<date>-<commit>.json; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-{when.strftime('%Y%m%d-%H%M%S')}-{res['commit']}.json"
    path.write_text(json.dumps(res, indent=1))
    return path


# --------------------------------------------------------------------------- measurements

def percentile(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[i]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def broker_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "beam.smp":
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


class Host2:
    """Two namespaces, A (client) and B (server), joined by some system under test."""

    def __init__(self, key: str, subnet: int):
        self.key = key
        self.ns_a = f"{TAG}-{key}-a"
        self.ns_b = f"{TAG}-{key}-b"
        self.addr_a = f"198.18.{subnet}.1"
        self.addr_b = f"198.18.{subnet}.2"
        self.v6_a = f"fd00:7b:{subnet:x}::1"
        self.v6_b = f"fd00:7b:{subnet:x}::2"
        self.server: subprocess.Popen | None = None
        self.cpu_pids: list[int] = []  # processes whose CPU time is the system's cost

    def create(self) -> None:
        CLEANUP.add_namespace(self.ns_a)
        CLEANUP.add_namespace(self.ns_b)
        # ECN-capable TCP in every system (it changes nothing where nobody marks): what
        # tunbus's queue management marks instead of dropping (decision 0028).
        for ns in (self.ns_a, self.ns_b):
            run(in_ns(ns, ["sysctl", "-qw", "net.ipv4.tcp_ecn=1"]))

    def destroy(self) -> None:
        if self.server is not None:
            CLEANUP.stop(self.server)
            self.server = None
        CLEANUP.del_namespace(self.ns_a)
        CLEANUP.del_namespace(self.ns_b)

    def wait_ping(self, timeout: float = 20.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            r = subprocess.run(in_ns(self.ns_a, ["ping", "-c", "1", "-W", "1", self.addr_b]), capture_output=True)
            if r.returncode == 0:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"{self.key}: no ping reply from {self.addr_b} within {timeout:.0f} s")

    def start_server(self) -> None:
        if self.server is not None:
            CLEANUP.stop(self.server)
        self.server = CLEANUP.spawn(
            in_ns(self.ns_b, ["iperf3", "-s", "-B", self.addr_b, "-p", str(IPERF_PORT)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)

    def iperf(self, seconds: float, extra: list[str], omit: int = 0) -> dict:
        cmd = ["iperf3", "-c", self.addr_b, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
               "--connect-timeout", "3000", *extra]
        if omit:
            cmd += ["-O", str(omit)]
        last_err = ""
        for attempt in range(2):
            p = CLEANUP.spawn(in_ns(self.ns_a, cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                out, err = p.communicate(timeout=seconds + omit + 20)
            except subprocess.TimeoutExpired:
                CLEANUP.stop(p, signal.SIGKILL)
                last_err = "iperf3 timed out"
                self.start_server()
                continue
            CLEANUP.stop(p)
            try:
                d = json.loads(out)
            except json.JSONDecodeError:
                d = {"error": (err or out).strip()[:300]}
            if "error" not in d and p.returncode == 0:
                return d
            last_err = d.get("error", f"exit {p.returncode}")
            self.start_server()  # a failed test can leave the server busy
        raise RuntimeError(f"iperf3 {' '.join(extra)}: {last_err}")

    def ping(self, count: int, interval: float) -> dict:
        r = subprocess.run(
            in_ns(self.ns_a, ["ping", "-n", "-i", str(interval), "-c", str(count), "-W", "1", self.addr_b]),
            capture_output=True, text=True, timeout=count * interval + 30,
        )
        times = sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", r.stdout))
        if not times:
            raise RuntimeError(f"ping got no replies: {r.stdout[-200:]} {r.stderr[-200:]}")
        return {
            "sent": count,
            "received": len(times),
            "loss_percent": 100.0 * (count - len(times)) / count,
            "p50_ms": percentile(times, 50),
            "p99_ms": percentile(times, 99),
            "p999_ms": percentile(times, 99.9),
            "mean_ms": sum(times) / len(times),
            "max_ms": times[-1],
            "curve_ms": {str(p): percentile(times, p) for p in PCTS},
        }


def workloads(h: Host2, plan: dict, measure_cpu: bool, subset: set | None = None) -> dict:
    """Runs every workload of the plan (or of `subset`) on the prepared pair; one failure
    does not stop the rest."""
    res: dict = {}
    h.start_server()

    def attempt(name, fn):
        if subset is not None and name not in subset:
            return
        log(f"  {h.key}: {name}")
        try:
            res[name] = fn()
        except Exception as e:
            log(f"  {h.key}: {name} FAILED: {e}")
            res[name] = {"error": str(e)}

    def tcp(flows: int):
        cpu_before = cpu_of(h.cpu_pids)
        brk = broker_pids() if h.key.startswith("tunbus") else []
        brk_before = cpu_of(brk)
        d = h.iperf(plan["tcp_s"], ["-P", str(flows)] if flows > 1 else [], omit=plan["omit"])
        rcv = d["end"]["sum_received"]
        out = {"gbit_per_s": rcv["bits_per_second"] / 1e9, "bytes": rcv["bytes"], "seconds": rcv["seconds"],
               "retransmits": d["end"]["sum_sent"].get("retransmits")}
        if measure_cpu and h.cpu_pids:
            # CPU counted over the whole client run (omit + measured); bytes likewise
            total_bytes = rcv["bytes"] * (plan["tcp_s"] + plan["omit"]) / max(plan["tcp_s"], 1e-9)
            gb = total_bytes / 1e9
            out["cpu_s_per_gb"] = (cpu_of(h.cpu_pids) - cpu_before) / gb if gb > 0 else None
            if brk:
                out["broker_cpu_s_per_gb"] = (cpu_of(brk) - brk_before) / gb if gb > 0 else None
        return out

    def udp(size: int):
        d = h.iperf(plan["udp_s"], ["-u", "-b", "0", "-l", str(size)])
        rcv = d["end"].get("sum_received") or d["end"]["sum"]
        delivered = rcv["packets"] - rcv["lost_packets"]
        return {"delivered_pps": delivered / rcv["seconds"], "loss_percent": rcv["lost_percent"],
                "sent_pps": d["end"]["sum_sent"]["packets"] / d["end"]["sum_sent"]["seconds"],
                "gbit_per_s": rcv["bytes"] * 8 / rcv["seconds"] / 1e9}

    def ping_loaded():
        bg_s = plan["ping_count"] * plan["ping_interval"] + 3
        cmd = ["iperf3", "-c", h.addr_b, "-p", str(IPERF_PORT), "-t", f"{bg_s:.0f}", "-J", "--connect-timeout", "3000"]
        bg = CLEANUP.spawn(in_ns(h.ns_a, cmd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            time.sleep(1.0)
            r = h.ping(plan["ping_count"], plan["ping_interval"])
        finally:
            try:
                out, _ = bg.communicate(timeout=bg_s + 20)
                r["background_gbit_per_s"] = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
            except Exception:
                pass
            CLEANUP.stop(bg)
        return r

    attempt("ping_idle", lambda: h.ping(plan["ping_count"], plan["ping_interval"]))
    attempt("tcp_1", lambda: tcp(1))
    if plan["tcp8"]:
        attempt("tcp_8", lambda: tcp(8))
    attempt("udp_1400", lambda: udp(1400))
    attempt("udp_64", lambda: udp(64))
    attempt("ping_loaded", ping_loaded)
    return res


# --------------------------------------------------------------------------- systems

def system_veth(plan: dict) -> dict:
    h = Host2("veth", 10)
    try:
        h.create()
        run(["ip", "link", "add", "veth-a", "netns", h.ns_a, "type", "veth", "peer", "name", "veth-b", "netns", h.ns_b])
        for ns, dev, addr in [(h.ns_a, "veth-a", h.addr_a), (h.ns_b, "veth-b", h.addr_b)]:
            run(["ip", "-n", ns, "link", "set", dev, "mtu", str(plan["mtu"])])
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        h.wait_ping()
        return workloads(h, plan, measure_cpu=False)
    finally:
        h.destroy()


def system_relay(plan: dict, offload: bool) -> dict:
    key = "relay-gso" if offload else "relay-plain"
    h = Host2(key, 11 if offload else 12)
    relay = None
    try:
        h.create()
        cmd = [str(TUN_RELAY), "--ns-a", h.ns_a, "--ns-b", h.ns_b, "--addr-a", f"{h.addr_a}/24",
               "--addr-b", f"{h.addr_b}/24", "--mtu", str(plan["mtu"])]
        if not offload:
            cmd.append("--no-offload")
        relay = CLEANUP.spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        h.cpu_pids = [relay.pid]
        h.wait_ping()
        res = workloads(h, plan, measure_cpu=True)
        try:
            # communicate() closes the relay's stdin: it stops and prints its counters
            out, err = relay.communicate(timeout=10)
            res["relay_counters"] = json.loads(out.strip().splitlines()[-1])
        except Exception as e:
            log(f"  {key}: no relay counters ({e})")
        return res
    finally:
        if relay is not None:
            CLEANUP.stop(relay)
        h.destroy()


REPORT_RE = {
    "tx": re.compile(r"sent\s+(\d+) packets, (\d+) bytes in (\d+) batches"),
    "rx": re.compile(r"received\s+(\d+) packets, (\d+) bytes in (\d+) batches"),
    "lat": re.compile(r"one-way latency p50 (\d+) us, p99 (\d+) us, p99.9 (\d+) us"),
    "drops": re.compile(r"drops:(.*)"),
}


def parse_agent_report(text: str) -> dict:
    out: dict = {}
    for k in ("tx", "rx"):
        m = REPORT_RE[k].search(text)
        if m:
            p, b, n = map(int, m.groups())
            out[k] = {"packets": p, "bytes": b, "batches": n, "packets_per_batch": p / n if n else None}
    m = REPORT_RE["lat"].search(text)
    if m:
        out["one_way_latency_us"] = dict(zip(("p50", "p99", "p999"), map(int, m.groups())))
    m = REPORT_RE["drops"].search(text)
    if m:
        out["drops"] = m.group(1).strip()
    return out


def system_tunbus(plan: dict, queues: int, logdir: Path, key: str | None = None, url: str = URL,
                  url_args: list[str] | None = None, subnet: int | None = None, subset: set | None = None,
                  capture: bool = False) -> dict:
    key = key or f"tunbus-q{queues}"
    h = Host2(key, subnet or 12 + queues)
    agents: list[tuple[str, subprocess.Popen, Path]] = []
    session = f"{TAG}{key.replace('-', '')}"  # private exchange: no cross-talk with other agents on the broker
    try:
        h.create()
        for side, ns, v4, v6 in [("a", h.ns_a, h.addr_a, h.v6_a), ("b", h.ns_b, h.addr_b, h.v6_b)]:
            name = f"{TAG}-{key}-{side}"
            errlog = logdir / f"{name}.log"
            cmd = [str(AGENT), "connect", "--url", url, *(url_args or []), "--session", session, "--name", name, "--netns", ns,
                   "--ipv4", f"{v4}/24", "--ipv6", f"{v6}/64", "--queues", str(queues), "--mtu", str(plan["mtu"]),
                   "--stats-interval", "0"] + AGENT_ARGS
            p = CLEANUP.spawn(cmd, stop_signal=signal.SIGINT, stdout=subprocess.PIPE,
                              stderr=open(errlog, "w"), text=True,
                              env={**os.environ, "NO_COLOR": "1", "RUST_BACKTRACE": "0"})
            agents.append((name, p, errlog))
        h.cpu_pids = [p.pid for _, p, _ in agents]
        try:
            h.wait_ping()
        except RuntimeError:
            for name, p, errlog in agents:
                log(f"  {name} (exit {p.poll()}): {errlog.read_text()[-600:]}")
            raise
        tap = None
        if capture:
            # The whole session into the capture (decoded, cut, written; to /dev/null so that
            # the disk is not what is measured).
            caplog = logdir / f"{TAG}-{key}-capture.log"
            tap = CLEANUP.spawn([str(AGENT), "capture", "--url", url, "--session", session, "-w", "/dev/null"],
                                stop_signal=signal.SIGINT, stderr=open(caplog, "w"), env={**os.environ, "NO_COLOR": "1"})
            time.sleep(1.0)
        res = workloads(h, plan, measure_cpu=True, subset=subset)
        if tap is not None:
            CLEANUP.stop(tap, signal.SIGINT, grace=15)
            res["capture_summary"] = next((l for l in caplog.read_text().splitlines() if l.startswith("capture: ") and "packets" in l), "no summary")
            log(f"  {key}: {res['capture_summary']}")
        reports = {}
        for name, p, errlog in agents:
            CLEANUP.stop(p, signal.SIGINT, grace=15)
            out = p.stdout.read() if p.stdout else ""
            reports[name[-1]] = parse_agent_report(out)
            if p.returncode not in (0, None):
                log(f"  {name} exited with {p.returncode}: {errlog.read_text()[-400:]}")
        res["agent_reports"] = reports
        return res
    finally:
        for _, p, _ in agents:
            CLEANUP.stop(p, signal.SIGINT, grace=15)
        h.destroy()


TLS_WORKLOADS = {"tcp_1", "udp_64", "ping_idle"}


def system_private_node(plan: dict, logdir: Path, tls: bool) -> dict:
    """tunbus --queues 1 through a private node of this run, over amqp:// or amqps://: the
    same node software and settings for both, so the difference is TLS."""
    import nodes  # perf/nodes.py
    node = nodes.PrivateNode(tls=True)
    try:
        node.start()
        node.add_user("tbperf", "tbperf-password")
        if tls:
            url = f"amqps://tbperf:tbperf-password@localhost:{node.tls_port}/%2f"
            args = ["--tls-ca", str(node.certs["ca"])]
        else:
            url = f"amqp://tbperf:tbperf-password@127.0.0.1:{node.port}/%2f"
            args = []
        key = "tunbus-tls" if tls else "tunbus-node"
        return system_tunbus(plan, 1, logdir, key=key, url=url, url_args=args, subnet=20 if tls else 21, subset=TLS_WORKLOADS)
    finally:
        node.stop()


def system_cluster(plan: dict, logdir: Path) -> dict:
    """Both cluster columns from one private 3-node cluster: agents on the same node, then
    on two nodes (each lists the others after its own, as agent lab --brokers does)."""
    import nodes  # perf/nodes.py
    cluster = nodes.PrivateCluster(3)
    out = {}
    try:
        cluster.start()
        u = cluster.urls()
        same = system_tunbus_pair(plan, logdir, "cluster-same", [u[0], u[1], u[2]], [u[0], u[1], u[2]], 23)
        cross = system_tunbus_pair(plan, logdir, "cluster-cross", [u[0], u[1], u[2]], [u[1], u[2], u[0]], 24)
        out = {"cluster-same": same, "cluster-cross": cross}
    finally:
        cluster.stop()
    return out


def system_tunbus_pair(plan: dict, logdir: Path, key: str, urls_a: list[str], urls_b: list[str], subnet: int) -> dict:
    """Like system_tunbus with one queue, each agent with its own list of nodes."""
    h = Host2(key, subnet)
    agents = []
    session = f"{TAG}{key.replace('-', '')}"
    try:
        h.create()
        for side, ns, v4, v6, urls in [("a", h.ns_a, h.addr_a, h.v6_a, urls_a), ("b", h.ns_b, h.addr_b, h.v6_b, urls_b)]:
            name = f"{TAG}-{key}-{side}"
            errlog = logdir / f"{name}.log"
            cmd = [str(AGENT), "connect", *[a for url in urls for a in ("--url", url)], "--session", session, "--name", name,
                   "--netns", ns, "--ipv4", f"{v4}/24", "--ipv6", f"{v6}/64", "--mtu", str(plan["mtu"]), "--stats-interval", "0"] + AGENT_ARGS
            p = CLEANUP.spawn(cmd, stop_signal=signal.SIGINT, stdout=subprocess.PIPE, stderr=open(errlog, "w"), text=True,
                              env={**os.environ, "NO_COLOR": "1"})
            agents.append((name, p, errlog))
        h.cpu_pids = [p.pid for _, p, _ in agents]
        h.wait_ping()
        res = workloads(h, plan, measure_cpu=True, subset={"tcp_1", "udp_64", "ping_idle"})
        for _, p, _ in agents:
            CLEANUP.stop(p, signal.SIGINT, grace=15)
        return res
    finally:
        for _, p, _ in agents:
            CLEANUP.stop(p, signal.SIGINT, grace=15)
        h.destroy()


def system_broker(plan: dict) -> dict:
    cmd = [str(BROKER_BENCH), "--url", URL, "--seconds", str(plan["broker_s"]),
           "--latency-samples", str(plan["broker_lat_samples"]),
           "--latency-gaps", f"0,{round(plan['ping_interval'] * 1000)}"]
    p = CLEANUP.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "RUST_BACKTRACE": "0"})
    try:
        out, err = p.communicate(timeout=plan["broker_s"] * 3 + 60)
    except subprocess.TimeoutExpired:
        CLEANUP.stop(p, signal.SIGTERM)
        return {"error": "broker_bench timed out"}
    CLEANUP.stop(p)
    if p.returncode != 0:
        return {"error": err.strip()[-400:]}
    return json.loads(out)


# --------------------------------------------------------------------------- report

def g(d: dict, *path, default=None):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def fmt(v, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "–"
    if abs(v) >= 1e6:
        s = f"{v / 1e6:.2f} M"
    elif abs(v) >= 1e4:
        s = f"{v / 1e3:.0f} k"
    elif abs(v) >= 100:
        s = f"{v:.0f}"
    else:
        s = f"{v:.{digits}f}"
    return f"{s}{unit}".replace(" k", "k").replace(" M", "M")


def ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def broker_by_size(broker: dict, size: int) -> dict:
    for r in broker.get("throughput", []) or []:
        if r.get("size_bytes") == size:
            return r
    return {}


def ping_pace_hop(res: dict) -> dict:
    """The broker's one-hop latency measured at the ping's pace (an idle broker is slower to
    wake than a busy one, so a ping is compared with hops spaced like its own packets)."""
    br = res["systems"].get("broker", {})
    gap = round(g(res, "meta", "plan", "ping_interval", default=0.01) * 1000)
    for h in br.get("one_hop_latency_by_gap", []):
        if h.get("gap_ms") == gap:
            return h
    return br.get("one_hop_latency") or {}


def make_rows(res: dict) -> list[dict]:
    """The table: one row per workload, a value per system, and the tunbus ratios."""
    s = res["systems"]
    hop = ping_pace_hop(res)
    hop_p50 = hop.get("p50_us")
    hop_p99 = hop.get("p99_us")
    rows = []

    def row(label, getter, limit_key, unit, limit_name, better="higher", extra_limit=None):
        vals = {k: getter(s.get(k, {})) for k in SYSTEMS}
        r = {"workload": label, "unit": unit, "values": vals, "limit": limit_key, "better": better}
        for q in ("tunbus-q1", "tunbus-q2", "tunbus-tls", "tunbus-noid", "cluster-cross", "tunbus-emu0", "tunbus-capture", "tunbus-noaqm"):
            parts = []
            if q in ("tunbus-emu0", "tunbus-capture"):
                if vals.get("tunbus-q1") is not None:
                    parts.append(f"{ratio(vals[q], vals['tunbus-q1'])} off")
            elif q == "cluster-cross":
                if vals.get("cluster-same") is not None:
                    parts.append(f"{ratio(vals[q], vals['cluster-same'])} same node")
            elif q == "tunbus-noaqm":
                if vals.get(q) is not None:
                    parts.append(f"{ratio(vals['tunbus-q1'], vals[q])} on/off")
            elif q == "tunbus-noid":
                if vals.get("tunbus-q1") is not None:
                    parts.append(f"{ratio(vals['tunbus-q1'], vals[q])} checked/unchecked")
            elif q == "tunbus-tls":
                if vals.get("tunbus-node") is not None:
                    parts.append(f"{ratio(vals[q], vals['tunbus-node'])} plain")
            elif limit_key and vals.get(limit_key) is not None:
                parts.append(f"{ratio(vals[q], vals[limit_key])} {limit_name}")
            if extra_limit:
                ex_name, ex_val = extra_limit
                if ex_val is not None:
                    parts.append(f"{ratio(vals[q], ex_val)} {ex_name}")
            r[f"ratio_{q}"] = ", ".join(p for p in parts if not p.startswith("–")) or "–"
        rows.append(r)

    row("TCP 1 flow", lambda d: g(d, "tcp_1", "gbit_per_s"), "relay-gso", "Gbit/s", "relay-gso")
    row("TCP 8 flows", lambda d: g(d, "tcp_8", "gbit_per_s"), "relay-gso", "Gbit/s", "relay-gso")
    row("UDP 1400 B delivered", lambda d: g(d, "udp_1400", "delivered_pps"), "relay-plain", "pkt/s", "relay-plain")
    row("UDP 1400 B loss", lambda d: g(d, "udp_1400", "loss_percent"), None, "%", "", better="lower")
    row("UDP 64 B delivered", lambda d: g(d, "udp_64", "delivered_pps"), "relay-plain", "pkt/s", "relay-plain")
    row("UDP 64 B loss", lambda d: g(d, "udp_64", "loss_percent"), None, "%", "", better="lower")
    two_hop50 = 2 * hop_p50 / 1000 if hop_p50 else None
    two_hop99 = 2 * hop_p99 / 1000 if hop_p99 else None
    row("ping idle p50", lambda d: g(d, "ping_idle", "p50_ms"), "relay-gso", "ms", "relay", "lower", ("2×hop", two_hop50))
    row("ping idle p99", lambda d: g(d, "ping_idle", "p99_ms"), "relay-gso", "ms", "relay", "lower", ("2×hop", two_hop99))
    row("ping idle p99.9", lambda d: g(d, "ping_idle", "p999_ms"), "relay-gso", "ms", "relay", "lower")
    row("ping loaded p50", lambda d: g(d, "ping_loaded", "p50_ms"), "relay-gso", "ms", "relay", "lower", ("2×hop", two_hop50))
    row("ping loaded p99", lambda d: g(d, "ping_loaded", "p99_ms"), "relay-gso", "ms", "relay", "lower", ("2×hop", two_hop99))
    row("ping loaded p99.9", lambda d: g(d, "ping_loaded", "p999_ms"), "relay-gso", "ms", "relay", "lower")
    row("CPU per GB (TCP 1 flow)", lambda d: g(d, "tcp_1", "cpu_s_per_gb"), "relay-gso", "CPU-s/GB", "relay-gso", "lower")
    return rows


def markdown(res: dict, rows: list[dict], svg_name: str) -> str:
    m = res["meta"]
    out = [
        f"# tunbus end-to-end benchmark ({m['mode']})",
        "",
        f"{m['date']} · commit `{m['commit']}` · {m['host']} · Linux {m['kernel']} · {m['cpus']} CPUs · "
        f"MTU {m['mtu']} · {m['duration_s']:.0f} s run",
        "",
        "Ratios: tunbus / limit measured in this run (TCP vs the TUN relay with offloads, UDP packet rates vs "
        "the relay without offloads, ping vs the relay and vs twice the broker's one-hop latency).",
        "",
        "| workload | " + " | ".join(SYSTEMS.values()) + " | q1 vs limit | q2 vs limit | TLS vs plain | identity check on/off | two nodes vs one | delay 0ms vs off | capture vs off | AQM on/off |",
        "|---|" + "---:|" * len(SYSTEMS) + "---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        digits = 3 if r["unit"] == "ms" else 2
        vals = [fmt(r["values"][k], digits=digits) for k in SYSTEMS]
        out.append(f"| {r['workload']} ({r['unit']}) | " + " | ".join(vals) + f" | {r['ratio_tunbus-q1']} | {r['ratio_tunbus-q2']} | {r['ratio_tunbus-tls']} | {r['ratio_tunbus-noid']} | {r['ratio_cluster-cross']} | {r['ratio_tunbus-emu0']} | {r['ratio_tunbus-capture']} | {r['ratio_tunbus-noaqm']} |")
    br = res["systems"].get("broker", {})
    out += ["", "## RabbitMQ alone (one queue, one publisher, one consumer, tunbus's own AMQP client)", ""]
    if "error" in br:
        out.append(f"failed: {br['error']}")
    else:
        out += ["| message | msg/s | Gbit/s |", "|---|---:|---:|"]
        for t in br.get("throughput", []):
            out.append(f"| {t['size_bytes']} B | {fmt(t['msg_per_s'])} | {fmt(t['gbit_per_s'])} |")
        hops = br.get("one_hop_latency_by_gap") or [br.get("one_hop_latency", {})]
        out.append("")
        for lat in hops:
            pace = "back to back" if not lat.get("gap_ms") else f"{lat['gap_ms']} ms apart"
            out.append(f"One hop, 100 B, one at a time, {pace}: p50 {fmt(lat.get('p50_us'))} µs, p99 {fmt(lat.get('p99_us'))} µs, "
                       f"p99.9 {fmt(lat.get('p999_us'))} µs ({lat.get('samples')} samples).")
        out += ["", "The ping rows compare with two hops at the ping's pace (an idle broker wakes more slowly)."]
    out += ["", "## Inside tunbus", ""]
    for q in ("tunbus-q1", "tunbus-q2", "tunbus-noid", "tunbus-node", "tunbus-tls"):
        if q not in res["systems"]:
            continue
        d = res["systems"][q]
        if "error" in d and len(d) == 1:
            out.append(f"- {q}: failed: {d['error']}")
            continue
        reps = d.get("agent_reports", {})
        a_tx = g(reps, "a", "tx") or {}
        b_tx = g(reps, "b", "tx") or {}
        parts = [
            f"agent A sent {a_tx.get('packets', '–')} packets in {a_tx.get('batches', '–')} batches "
            f"({fmt(a_tx.get('packets_per_batch'))} packets/batch over the whole run)",
            f"agent B sent {fmt(b_tx.get('packets_per_batch'))} packets/batch",
            f"agents {fmt(g(d, 'tcp_1', 'cpu_s_per_gb'))} CPU-s/GB and broker {fmt(g(d, 'tcp_1', 'broker_cpu_s_per_gb'))} CPU-s/GB in TCP 1 flow",
        ]
        lat = g(reps, "b", "one_way_latency_us")
        if lat:
            parts.append(f"one-way batch latency at B p50 {lat['p50']} µs, p99 {lat['p99']} µs")
        drops = [f"{s}: {g(reps, s, 'drops')}" for s in ("a", "b") if g(reps, s, "drops") not in (None, "none")]
        if drops:
            parts.append("drops " + "; ".join(drops))
        out.append(f"- **{q}**: " + "; ".join(parts) + ".")
    for k in ("relay-plain", "relay-gso"):
        c = g(res["systems"], k, "relay_counters", "a_to_b")
        if c:
            out.append(f"- {k}: {fmt(c['packets_per_wakeup'])} packets per wake-up A→B, "
                       f"{fmt(g(res['systems'], k, 'tcp_1', 'cpu_s_per_gb'))} CPU-s/GB in TCP 1 flow.")
    failures = [f"{k}/{w}: {v['error']}" for k, d in res["systems"].items() if isinstance(d, dict)
                for w, v in d.items() if isinstance(v, dict) and "error" in v]
    if failures:
        out += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    out += ["", f"![throughput and latency]({svg_name})", ""]
    return "\n".join(out)


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg(res: dict) -> str:
    """Hand-written SVG: four bar charts (each its own scale) and RTT percentile curves."""
    W, H = 1180, 520
    s = res["systems"]
    br = s.get("broker", {})
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="10" y="18" font-size="14" font-weight="bold">tunbus vs the limits of this machine — '
             f'{esc(res["meta"]["date"])} {esc(res["meta"]["commit"])} ({res["meta"]["mode"]})</text>']
    keys = list(SYSTEMS)
    charts = [
        ("TCP 1 flow (Gbit/s)", lambda d: g(d, "tcp_1", "gbit_per_s"), ("broker alone, 256 KiB msgs", g(broker_by_size(br, 262144), "gbit_per_s"))),
        ("TCP 8 flows (Gbit/s)", lambda d: g(d, "tcp_8", "gbit_per_s"), ("broker alone, 256 KiB msgs", g(broker_by_size(br, 262144), "gbit_per_s"))),
        ("UDP 1400 B delivered (kpkt/s)", lambda d: (g(d, "udp_1400", "delivered_pps") or 0) / 1e3 or None,
         ("broker alone, 1.5 KiB kmsg/s", (g(broker_by_size(br, 1536), "msg_per_s") or 0) / 1e3 or None)),
        ("UDP 64 B delivered (kpkt/s)", lambda d: (g(d, "udp_64", "delivered_pps") or 0) / 1e3 or None, None),
    ]
    cw, ch = 340, 200
    for i, (title, getter, ref) in enumerate(charts):
        x0 = 20 + (i % 2) * (cw + 30)
        y0 = 40 + (i // 2) * (ch + 50)
        vals = [getter(s.get(k, {})) for k in keys]
        top = max([v for v in vals if v] + [ref[1] if ref and ref[1] else 0] + [1e-9]) * 1.25
        plot_h = ch - 40
        base = y0 + 20 + plot_h
        parts.append(f'<text x="{x0}" y="{y0 + 12}" font-weight="bold">{esc(title)}</text>')
        parts.append(f'<line x1="{x0}" y1="{base}" x2="{x0 + cw}" y2="{base}" stroke="#333"/>')
        bw = cw / len(keys)
        for j, (k, v) in enumerate(zip(keys, vals)):
            bx = x0 + j * bw + 6
            if v:
                bh = plot_h * v / top
                parts.append(f'<rect x="{bx:.1f}" y="{base - bh:.1f}" width="{bw - 12:.1f}" height="{bh:.1f}" fill="{COLORS[k]}"/>')
                parts.append(f'<text x="{bx + (bw - 12) / 2:.1f}" y="{base - bh - 3:.1f}" text-anchor="middle">{fmt(v)}</text>')
            else:
                parts.append(f'<text x="{bx + (bw - 12) / 2:.1f}" y="{base - 3:.1f}" text-anchor="middle" fill="#c00">n/a</text>')
            parts.append(f'<text x="{bx + (bw - 12) / 2:.1f}" y="{base + 13}" text-anchor="middle" font-size="9">{esc(k)}</text>')
        if ref and ref[1]:
            ry = base - plot_h * ref[1] / top
            parts.append(f'<line x1="{x0}" y1="{ry:.1f}" x2="{x0 + cw}" y2="{ry:.1f}" stroke="{COLORS["broker"]}" stroke-dasharray="5,3"/>')
            parts.append(f'<text x="{x0}" y="{y0 + 26}" font-size="10" fill="{COLORS["broker"]}">dashed: {esc(ref[0])}, {fmt(ref[1])}</text>')

    # RTT percentile curves: x on a "nines" scale, y logarithmic in ms.
    px0, py0, pw, ph = 790, 60, 360, 380
    xs = lambda p: px0 + pw * math.log10(1 / (1 - p / 100)) / 3.0  # p99.9 at the right edge
    curves = []
    for k in keys:
        for cond, dash in (("ping_idle", ""), ("ping_loaded", "6,3")):
            c = g(s.get(k, {}), cond, "curve_ms")
            if c:
                curves.append((k, cond, dash, [(float(p), v) for p, v in c.items() if v]))
    hop = ping_pace_hop(res)
    hop_pts = [(p, 2 * hop[f]) for p, f in ((50, "p50_us"), (99, "p99_us"), (99.9, "p999_us")) if hop.get(f)]
    allv = [v for _, _, _, pts in curves for _, v in pts] + [v / 1000 for _, v in hop_pts]
    lo = 10 ** math.floor(math.log10(min(allv))) if allv else 0.01
    hi = 10 ** math.ceil(math.log10(max(allv))) if allv else 10
    if hi <= lo:
        hi = lo * 10
    ys = lambda v: py0 + ph - ph * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    parts.append(f'<text x="{px0}" y="{py0 - 24}" font-weight="bold">ping RTT by percentile (ms, log scale)</text>')
    parts.append(f'<text x="{px0}" y="{py0 - 10}">solid: idle; dashed: while a TCP flow saturates the path</text>')
    parts.append(f'<rect x="{px0}" y="{py0}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    d = lo
    while d <= hi * 1.0001:
        y = ys(d)
        parts.append(f'<line x1="{px0}" y1="{y:.1f}" x2="{px0 + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{px0 - 4}" y="{y + 4:.1f}" text-anchor="end">{d:g}</text>')
        d *= 10
    for p in (10, 50, 90, 99, 99.9):
        x = xs(p)
        parts.append(f'<line x1="{x:.1f}" y1="{py0}" x2="{x:.1f}" y2="{py0 + ph}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{py0 + ph + 14}" text-anchor="middle">p{p:g}</text>')
    for k, cond, dash, pts in curves:
        path = " ".join(f"{'M' if i == 0 else 'L'}{xs(p):.1f},{ys(v):.1f}" for i, (p, v) in enumerate(pts))
        da = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<path d="{path}" fill="none" stroke="{COLORS[k]}" stroke-width="2"{da}/>')
    for p, v in hop_pts:
        parts.append(f'<circle cx="{xs(p):.1f}" cy="{ys(v / 1000):.1f}" r="4" fill="{COLORS["broker"]}"/>')
    ly = py0 + ph + 30
    legend = [(k, SYSTEMS[k]) for k in keys] + [("broker", "broker one-hop × 2 (dots)")]
    for i, (k, label) in enumerate(legend):
        lx = px0 + (i % 2) * 190
        yy = ly + (i // 2) * 14
        parts.append(f'<rect x="{lx}" y="{yy - 8}" width="10" height="10" fill="{COLORS[k]}"/>')
        parts.append(f'<text x="{lx + 14}" y="{yy + 1}">{esc(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- main

def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    commit = r.stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description="End-to-end benchmark of tunbus against this machine's limits.")
    ap.add_argument("--quick", action="store_true", help="short runs (under 2 minutes once built)")
    ap.add_argument("--out", default=str(REPO / "perf" / "results"), help="results directory [perf/results]")
    ap.add_argument("--mtu", type=int, default=9000, help="MTU of every interface under test [9000, the agent's default]")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already in target/release")
    ap.add_argument("--only", default="", help="comma-separated subset of systems: veth,relay-plain,relay-gso,broker,tunbus-q1,tunbus-q2,tunbus-noid,tunbus-emu0,tunbus-noaqm,tunbus-capture,cluster,tunbus-node,tunbus-tls")
    ap.add_argument("--agent-args", default="", help="extra flags for both tunbus agents, e.g. \"--prefetch 64\" (to compare settings)")
    ap.add_argument("--render", metavar="JSON", help="only re-render latest.md and the SVG from a results JSON")
    args = ap.parse_args()
    AGENT_ARGS.extend(args.agent_args.split())

    if args.render:
        res = json.loads(Path(args.render).read_text())
        rows = make_rows(res)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = Path(args.render).with_suffix("").name
        (out_dir / f"{stem}.svg").write_text(svg(res))
        (out_dir / "latest.svg").write_text(svg(res))
        md = markdown(res, rows, "latest.svg")
        (out_dir / "latest.md").write_text(md)
        print(md)
        return 0

    preflight()
    # Installed explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    if not args.no_build:
        build()
    else:
        # Without the build, a missing example silently empties its columns (the relay's
        # figures went missing that way): say so at once.
        for p in (AGENT, TUN_RELAY, BROKER_BENCH):
            if not p.exists():
                sys.exit(f"perf/run.py: {p} is missing: run without --no-build, or cargo build --release --bin agent --examples")
    if args.quick:
        plan = dict(tcp_s=3, omit=0, tcp8=True, udp_s=2, ping_count=200, ping_interval=0.01,
                    broker_s=1, broker_lat_samples=500)
    else:
        plan = dict(tcp_s=8, omit=1, tcp8=True, udp_s=5, ping_count=500, ping_interval=0.01,
                    broker_s=3, broker_lat_samples=3000)
    plan["mtu"] = args.mtu
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    now = dt.datetime.now(dt.timezone.utc)
    res = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "commit": git_commit(),
            "host": platform.node(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "agent_args": " ".join(AGENT_ARGS),
            "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None),
            "mtu": args.mtu,
            "plan": plan,
        },
        "systems": {},
    }
    logdir = Path(tempfile.mkdtemp(prefix="tunbus-perf-"))
    steps = [
        ("veth", lambda: system_veth(plan)),
        ("relay-plain", lambda: system_relay(plan, offload=False)),
        ("relay-gso", lambda: system_relay(plan, offload=True)),
        ("broker", lambda: system_broker(plan)),
        ("tunbus-q1", lambda: system_tunbus(plan, 1, logdir)),
        ("tunbus-q2", lambda: system_tunbus(plan, 2, logdir)),
        ("tunbus-noid", lambda: system_tunbus(plan, 1, logdir, key="tunbus-noid", url_args=["--no-identity-check"], subnet=22,
                                              subset={"tcp_1", "udp_64"})),
        # Emulation off is tunbus-q1 above; these two run right after it, in the same run.
        ("tunbus-emu0", lambda: system_tunbus(plan, 1, logdir, key="tunbus-emu0", url_args=["--emulate", "delay 0ms"], subnet=23,
                                              subset={"tcp_1", "udp_64", "ping_idle"})),
        # Queue management off (tunbus-q1 has it on, the default), right after it.
        ("tunbus-noaqm", lambda: system_tunbus(plan, 1, logdir, key="tunbus-noaqm", url_args=["--no-aqm"], subnet=25,
                                               subset={"tcp_1", "ping_idle", "ping_loaded"})),
        ("tunbus-capture", lambda: system_tunbus(plan, 1, logdir, key="tunbus-capture", subnet=24, capture=True,
                                                 subset={"tcp_1", "udp_64", "ping_idle"})),
        ("cluster", lambda: system_cluster(plan, logdir)),
        ("tunbus-node", lambda: system_private_node(plan, logdir, tls=False)),
        ("tunbus-tls", lambda: system_private_node(plan, logdir, tls=True)),
    ]
    interrupted = False
    try:
        for key, fn in steps:
            if only and key not in only:
                continue
            log(f"{key}: start")
            t0 = time.monotonic()
            try:
                got = fn()
                if key == "cluster":
                    res["systems"].update(got)  # two columns from one cluster
                else:
                    res["systems"][key] = got
            except KeyboardInterrupt:
                raise
            except Exception as e:
                log(f"{key}: FAILED: {e}")
                res["systems"][key] = {"error": str(e)}
            log(f"{key}: done in {time.monotonic() - t0:.1f} s")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        CLEANUP.all()
    if interrupted:
        return 130

    res["meta"]["duration_s"] = time.monotonic() - started
    rows = make_rows(res)
    res["table"] = rows
    stamp = now.strftime("%Y-%m-%d-%H%M%S") + "-" + res["meta"]["commit"]
    (out_dir / f"{stamp}.json").write_text(json.dumps(res, indent=1) + "\n")
    picture = svg(res)
    (out_dir / f"{stamp}.svg").write_text(picture)
    (out_dir / "latest.svg").write_text(picture)
    md = markdown(res, rows, "latest.svg")
    (out_dir / "latest.md").write_text(md)
    print(md)
    log(f"wrote {out_dir / (stamp + '.json')}, {out_dir / 'latest.md'}, {out_dir / 'latest.svg'}; agent logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
