#!/usr/bin/env python3
"""Soak (issue 13): mixed traffic between the hosts of a kept `agent lab` on a private
RabbitMQ node, with a broker restart (`rabbitmqctl stop_app` + `start_app`) every
--restart-every seconds, for --duration. Every --sample seconds: the lab process's RSS,
open files and threads, the broker's queue depths, and the drops so far. Writes
perf/results/soak.md, soak.svg (one panel per series, restarts marked) and a JSON beside
them; growth is the change of each series' median between the first window after warm-up
and the last window, so a leak shows and a restart's spike does not.

    sudo python3 perf/soak.py --duration 1h [--hosts 4] [--no-build] [--note TEXT]
    python3 perf/soak.py --report perf/results/soak-….json [--note TEXT]   # rewrite the report
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import nodes  # perf/nodes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "target", "release", "agent")
OUT = os.path.join(ROOT, "perf", "results")
STATUS = re.compile(r"^\[\s*([0-9.]+) s\] (\d+)/(\d+) hosts connected.* (\d+) drops so far")
SESSION = "soak"


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 90s, 10m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def proc_sample(pid: int) -> dict:
    status = open(f"/proc/{pid}/status").read()
    field = lambda name: int(re.search(rf"^{name}:\s+(\d+)", status, re.M).group(1))
    return {"rss_mib": field("VmRSS") / 1024, "threads": field("Threads"), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def queue_depths(node: str) -> tuple[int, int]:
    out = subprocess.run(["rabbitmqctl", "-n", node, "list_queues", "-q", "--no-table-headers", "messages"], capture_output=True, text=True, timeout=60).stdout
    depths = [int(x) for x in out.split() if x.isdigit()]
    return sum(depths), max(depths, default=0)


def ns(i: int) -> list[str]:
    return ["ip", "netns", "exec", f"tb-{SESSION}-h{i}"]


def traffic(stop: threading.Event, hosts: int) -> None:
    """Keeps every kind of traffic going: pings around the ring, a paced TCP stream, a
    paced UDP stream, and bursts of bulk TCP."""
    addr = lambda i: f"198.18.0.{i}"
    servers = [subprocess.Popen(ns(2) + ["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               subprocess.Popen(ns(hosts) + ["iperf3", "-s", "-p", "5202"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(1)
    streams = []
    try:
        t_bulk = time.monotonic()
        while not stop.is_set():
            streams = [s for s in streams if s.poll() is None]
            if not streams:
                # 50 s paced TCP h1 -> h2 and UDP h3 -> hN, restarted when they end (a broker restart ends them).
                streams = [subprocess.Popen(ns(1) + ["iperf3", "-c", addr(2), "-p", "5201", "-t", "50", "-b", "50M"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                           subprocess.Popen(ns(3) + ["iperf3", "-c", addr(hosts), "-p", "5202", "-u", "-t", "50", "-b", "10M", "-l", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
            for i in range(1, hosts + 1):
                subprocess.run(ns(i) + ["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", addr(i % hosts + 1)], capture_output=True)
            if time.monotonic() - t_bulk > 120:
                # A burst of unpaced bulk TCP between two other hosts, every two minutes.
                subprocess.run(ns(hosts) + ["iperf3", "-c", addr(2), "-p", "5201", "-t", "3", "-R"], capture_output=True, timeout=30)
                t_bulk = time.monotonic()
            stop.wait(2)
    finally:
        for p in streams + servers:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def svg(samples: list[dict], restarts: list[float]) -> str:
    panels = [("lab RSS (MiB)", "rss_mib"), ("open files", "fds"), ("threads", "threads"), ("broker messages queued", "queued"), ("drops so far", "drops")]
    W, PH, pad = 900, 120, 45
    H = PH * len(panels) + 20
    end = max((s["t"] for s in samples), default=1) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">']
    for k, (title, key) in enumerate(panels):
        y0 = 10 + k * PH
        vals = [s.get(key) or 0 for s in samples]
        lo, hi = min(vals, default=0), max(vals, default=1)
        hi = hi if hi > lo else lo + 1
        x = lambda t: pad + (W - 2 * pad) * t / end
        y = lambda v: y0 + PH - 25 - (PH - 45) * (v - lo) / (hi - lo)
        out.append(f'<text x="{pad}" y="{y0 + 12}" font-weight="bold">{title}: {lo:.4g} – {hi:.4g}</text>')
        for r in restarts:
            out.append(f'<line x1="{x(r):.1f}" y1="{y0 + 18}" x2="{x(r):.1f}" y2="{y0 + PH - 25}" stroke="#d62728" stroke-dasharray="3,3"/>')
        pts = " ".join(f"{x(s['t']):.1f},{y(v):.1f}" for s, v in zip(samples, vals))
        out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>')
        out.append(f'<line x1="{pad}" y1="{y0 + PH - 25}" x2="{W - pad}" y2="{y0 + PH - 25}" stroke="#999"/>')
    out.append(f'<text x="{W / 2}" y="{H - 4}" text-anchor="middle">minutes: 0 – {end / 60:.0f} (dashed: broker restarts)</text>')
    out.append("</svg>")
    return "\n".join(out)


def growth(samples: list[dict], key: str, warmup: float, window: float) -> tuple[float, float]:
    end = samples[-1]["t"]
    first = [s[key] for s in samples if warmup <= s["t"] < warmup + window]
    last = [s[key] for s in samples if s["t"] >= end - window]
    return statistics.median(first or [0]), statistics.median(last or [0])


def drops_by_cause(samples: list[dict], restarts: list[float], after: float = 60.0) -> tuple[int, int]:
    """(drops counted within `after` seconds of a broker restart, drops at other times),
    from the increments between samples."""
    near = other = 0
    prev = None
    for s in samples:
        if s.get("drops") is None:
            continue
        if prev is not None and s["drops"] > prev["drops"]:
            d = s["drops"] - prev["drops"]
            if any(r - 1.0 <= s["t"] and prev["t"] <= r + after for r in restarts):
                near += d
            else:
                other += d
        prev = s
    return near, other


def write_report(run: dict, note: str = "") -> None:
    """soak.md and soak.svg from one run (as saved in its JSON)."""
    samples, restarts, duration = run["samples"], run["restarts"], run["duration_s"]
    warmup = min(600.0, duration / 6)
    window = min(600.0, duration / 6)
    md = [f"## Soak (perf/soak.py --duration {duration / 60:.0f}m)", "",
          f"{run.get('utc', '?')} UTC · commit `{run.get('commit', '?')}` · {run['hosts']} hosts on a private node, "
          f"broker restarted every {run.get('restart_every_s', 600) / 60:.0f} min ({len(restarts)} times), samples every {run.get('sample_s', 10):.0f} s", "",
          f"| series | median, minutes {warmup / 60:.1f}–{(warmup + window) / 60:.1f} | median, last {window / 60:.1f} minutes | growth |", "|---|---:|---:|---:|"]
    for key, unit in (("rss_mib", "MiB"), ("fds", ""), ("threads", ""), ("queued", "messages")):
        first, last = growth(samples, key, warmup, window)
        g = f"{(last - first) / first * 100:+.1f} %" if first else f"{last - first:+.0f}"
        md.append(f"| {key} | {first:.1f} {unit} | {last:.1f} {unit} | {g} |")
    drops = [s["drops"] for s in samples if s.get("drops") is not None]
    near, other = drops_by_cause(samples, restarts)
    md += ["", f"Drops counted by the lab's agents over the run: {drops[-1] if drops else 'n/a'}; {near} within a minute of a broker "
               f"restart (`broker_down` while the node is away), {other} at other times."]
    if note:
        md += ["", note]
    md += ["", "![soak](soak.svg)", ""]
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "soak.svg"), "w") as f:
        f.write(svg(samples, restarts))
    with open(os.path.join(OUT, "soak.md"), "w") as f:
        f.write("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=duration, default=3600.0, help="how long, e.g. 10m or 1h (default 1h)")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--restart-every", type=duration, default=600.0, help="seconds between broker restarts (default 10m)")
    ap.add_argument("--sample", type=duration, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--note", default="", help="a line for the report (what else ran on the machine, say)")
    ap.add_argument("--report", metavar="JSON", help="only rewrite soak.md and soak.svg from a saved run")
    a = ap.parse_args()
    if a.report:
        write_report(json.load(open(a.report)), a.note)
        return 0
    if os.geteuid() != 0:
        sys.exit("run as root (namespaces, TUN devices, a private broker)")
    for tool in ("iperf3", "rabbitmqctl"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            sys.exit(f"{tool} is missing: apt-get install iperf3 rabbitmq-server")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--bin", "agent"], cwd=ROOT, check=True)
    err = tempfile.NamedTemporaryFile(mode="w+", suffix=".log", delete=False)
    env = {**os.environ, "NO_COLOR": "1"}
    lab = subprocess.Popen([AGENT, "lab", "--hosts", str(a.hosts), "--private-broker", "--session", SESSION, "--keep", "--throughput-seconds", "0"],
                           stdout=subprocess.DEVNULL, stderr=err, env=env)
    stop = threading.Event()
    samples, restarts = [], []
    try:
        state = None
        for _ in range(120):
            time.sleep(1)
            if lab.poll() is not None:
                raise RuntimeError("the lab ended: " + open(err.name).read()[-2000:])
            if any(STATUS.match(l) for l in open(err.name)):
                state = json.load(open(f"/run/tunbus/lab-{SESSION}.json"))
                break
        if state is None:
            raise RuntimeError("the lab did not come up")
        node = state["broker_node"]
        mover = threading.Thread(target=traffic, args=(stop, a.hosts), daemon=True)
        mover.start()
        t0 = time.monotonic()
        next_restart = a.restart_every
        while time.monotonic() - t0 < a.duration:
            t = time.monotonic() - t0
            if t >= next_restart:
                restarts.append(t)
                subprocess.run(["rabbitmqctl", "-n", node, "stop_app"], capture_output=True, timeout=120)
                subprocess.run(["rabbitmqctl", "-n", node, "start_app"], capture_output=True, timeout=300)
                next_restart += a.restart_every
                continue
            s = {"t": t, **proc_sample(lab.pid)}
            s["queued"], s["deepest"] = queue_depths(node)
            drops = [int(m.group(4)) for m in map(STATUS.match, open(err.name).read().splitlines()[-20:]) if m]
            s["drops"] = drops[-1] if drops else None
            samples.append(s)
            print(f"[{t / 60:5.1f} min] rss {s['rss_mib']:.1f} MiB, fds {s['fds']}, threads {s['threads']}, queued {s['queued']}, drops {s['drops']}", flush=True)
            time.sleep(max(0.0, a.sample - (time.monotonic() - t0 - t)))
    finally:
        stop.set()
        nodes.interrupt(lab, 120)
        os.unlink(err.name)
    c = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc)
    run = {"samples": samples, "restarts": restarts, "duration_s": a.duration, "hosts": a.hosts,
           "restart_every_s": a.restart_every, "sample_s": a.sample, "commit": c, "utc": f"{now:%Y-%m-%d %H:%M:%S}"}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"soak-{now:%Y-%m-%d-%H%M%S}-{c}.json"), "w") as f:
        json.dump(run, f, indent=1)
    write_report(run, a.note)
    print(open(os.path.join(OUT, "soak.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
