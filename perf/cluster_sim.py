#!/usr/bin/env python3
"""What a RabbitMQ cluster pays per tunbus agent, without TUNs (issue 12).

Starts a private 3-node cluster, then examples/cluster_sim.rs adds simulated one-queue
agents in steps (10, 100, 1000, 10000 by default): each with its own connection, queue,
four bindings and a hello, nodes round robin. After each step this script records the time
the step took to declare, the cluster's memory (sum of the nodes' RSS) and per agent, and the
publish rate to one agent with all those bindings in the exchange. Writes
perf/results/cluster-sim-<date>-<commit>.json, perf/results/cluster-sim.md and
perf/results/cluster-sim.svg.

    python3 perf/cluster_sim.py [--steps 10,100,1000,10000] [--nodes 3] [--no-build]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import nodes

REPO = Path(__file__).resolve().parent.parent
SIM = REPO / "target" / "release" / "examples" / "cluster_sim"
OUT = REPO / "perf" / "results"


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


def svg(rows: list[dict]) -> str:
    W, H, pad = 900, 300, 50
    panels = [("seconds to declare the step", "declare_s"), ("broker MiB per added agent", "mib_per_agent"), ("msg/s to one agent", "msg_per_s")]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">']
    pw = (W - pad) / len(panels)
    for k, (title, key) in enumerate(panels):
        x0 = pad / 2 + k * pw
        vals = [r.get(key) or 0 for r in rows]
        top = max(vals) * 1.15 or 1
        out.append(f'<text x="{x0 + pw / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>')
        bw = (pw - 40) / max(len(rows), 1)
        for i, (r, v) in enumerate(zip(rows, vals)):
            h = (H - 80) * v / top
            x = x0 + 20 + i * bw
            out.append(f'<rect x="{x + 4}" y="{H - 40 - h}" width="{bw - 8}" height="{h}" fill="#1f77b4"/>')
            out.append(f'<text x="{x + bw / 2}" y="{H - 44 - h}" text-anchor="middle">{v:.3g}</text>')
            out.append(f'<text x="{x + bw / 2}" y="{H - 25}" text-anchor="middle">{r["agents"]}</text>')
        out.append(f'<text x="{x0 + pw / 2}" y="{H - 8}" text-anchor="middle">agents</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_outputs(meta: dict, rows: list[dict]) -> None:
    """cluster-sim.md and cluster-sim.svg. Memory per agent is the step's marginal cost
    (memory added / agents added): a fresh node's own memory moves by more than ten agents."""
    prev = None
    for r in rows:
        r["marginal_mib_per_agent"] = None if prev is None else (r["memory_mib"] - prev["memory_mib"]) / max(r["agents"] - prev["agents"], 1)
        prev = r
    chart = [dict(r, mib_per_agent=r["marginal_mib_per_agent"] or 0) for r in rows]
    (OUT / "cluster-sim.svg").write_text(svg(chart))
    md = [f"## A {meta['nodes']}-node cluster per agent (perf/cluster_sim.py)", "",
          f"{meta['date']} · commit `{meta['commit']}` · simulated one-queue agents (connection, queue, 4 bindings, a hello), nodes round robin; "
          "publish rate: 1500 B messages from one publisher to one agent, with every binding of the step in the exchange. "
          "Memory per agent: what the step added over the agents it added.", "",
          "| agents | bindings | declared in (s) | cluster memory (MiB) | MiB per added agent | msg/s to one agent |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["marginal_mib_per_agent"]
        md.append(f"| {r['agents']} | {r.get('bindings', 0)} | {r['declare_s']:.1f} | {r['memory_mib']:.0f} | {'–' if m is None else f'{m:.3f}'} | {r.get('msg_per_s', 0):.0f} |")
    md += ["", "![cluster cost per agent](cluster-sim.svg)", ""]
    (OUT / "cluster-sim.md").write_text("\n".join(md))
    print("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="10,100,1000,10000")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--render", metavar="JSON", help="only rewrite cluster-sim.md and the SVG from a results file")
    args = ap.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        write_outputs(data["meta"], data["rows"])
        return 0
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--example", "cluster_sim"], cwd=REPO, check=True)
    cluster = nodes.PrivateCluster(args.nodes)
    t0 = time.monotonic()
    cluster.start()
    print(f"[cluster-sim] {args.nodes} nodes up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    rows: list[dict] = []
    try:
        time.sleep(5)  # a fresh node's memory settles first
        base = cluster.memory_bytes()
        p = subprocess.Popen([str(SIM), "--urls", ",".join(cluster.urls()), "--steps", args.steps, "--seconds", str(args.seconds)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        row: dict = {}
        for line in p.stdout:
            ev = json.loads(line)
            if ev["phase"] == "declared":
                time.sleep(2)  # let the nodes settle before their memory is read
                mem = cluster.memory_bytes()
                row = {"agents": ev["agents"], "declare_s": ev["declare_s"], "new": ev["new"], "memory_mib": mem / 2**20,
                       "mib_per_agent": (mem - base) / 2**20 / max(ev["agents"], 1)}
                print(f"[cluster-sim] {ev['agents']} agents: declared {ev['new']} in {ev['declare_s']:.1f} s, "
                      f"cluster {mem / 2**20:.0f} MiB ({row['mib_per_agent']:.3f} MiB per agent)", file=sys.stderr)
                p.stdin.write("\n")
                p.stdin.flush()
            else:
                row["msg_per_s"] = ev["msg_per_s"]
                row["bindings"] = ev["bindings"]
                rows.append(row)
                print(f"[cluster-sim] {ev['agents']} agents, {ev['bindings']} bindings: {ev['msg_per_s']:.0f} msg/s to one agent", file=sys.stderr)
        p.stdin.close()
        if p.wait() != 0:
            print("cluster_sim failed", file=sys.stderr)
            return 1
    finally:
        cluster.stop()
    now = dt.datetime.now(dt.timezone.utc)
    meta = {"date": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "commit": commit(), "nodes": args.nodes, "seconds": args.seconds}
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y-%m-%d-%H%M%S")
    (OUT / f"cluster-sim-{stamp}-{meta['commit']}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    write_outputs(meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
