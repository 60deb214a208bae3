#!/usr/bin/env python3
"""Scale benchmark: `agent lab` with 2 hosts and with N hosts (300 by default), repeated.

Reports bring-up time, pairs checked and failures, ping RTT, the TCP h1 -> h2 iperf3 sample,
and memory per agent, then the ratio of the large lab's mean throughput to the small lab's.
Writes perf/results/lab-scale-<date>-<commit>.json and perf/results/lab-scale.md.

    sudo python3 perf/lab_scale.py [--hosts 300] [--runs 2] [--no-build]
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "target", "release", "agent")


def git_commit():
    try:
        c = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True).strip()
        dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "src"]).returncode != 0
        return c + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def run_lab(hosts, seconds):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [AGENT, "lab", "--hosts", str(hosts), "--throughput-seconds", str(seconds), "--json", path]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        with open(path) as f:
            report = json.load(f)
    except Exception:
        sys.exit(f"lab with {hosts} hosts produced no report (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")
    finally:
        os.unlink(path)
    report["exit_code"] = p.returncode
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=300, help="size of the large lab [300]")
    ap.add_argument("--runs", type=int, default=2, help="runs of each size [2]")
    ap.add_argument("--seconds", type=float, default=3.0, help="iperf3 sample length [3]")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "perf", "results"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the lab creates namespaces and TUN devices")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--bin", "agent"], cwd=ROOT, check=True)
    results = {}
    for hosts in (2, a.hosts):
        results[hosts] = [run_lab(hosts, a.seconds) for _ in range(a.runs)]
        for r in results[hosts]:
            print(f"{hosts:>4} hosts: up {r['bring_up_s']:.2f} s, {r['pairs_checked']} pairs, "
                  f"{len(r['failures'])} failures, RTT p50 {r['rtt_p50_ms']} ms, "
                  f"TCP {(r['throughput_bits_per_s'] or 0) / 1e9:.2f} Gbit/s, {r['rss_per_agent_mib']:.2f} MiB/agent", flush=True)
    mean = {h: statistics.mean((r["throughput_bits_per_s"] or 0) for r in rs) for h, rs in results.items()}
    ratio = mean[a.hosts] / mean[2] if mean[2] else 0.0
    now = datetime.datetime.now(datetime.timezone.utc)
    doc = {
        "date": now.isoformat(timespec="seconds"), "commit": git_commit(), "host": platform.node(),
        "kernel": platform.release(), "cpus": os.cpu_count(), "large": a.hosts, "runs": a.runs,
        "results": {str(h): rs for h, rs in results.items()}, "mean_bits_per_s": {str(h): v for h, v in mean.items()},
        "throughput_ratio": ratio,
    }
    os.makedirs(a.out, exist_ok=True)
    stem = f"lab-scale-{now.strftime('%Y-%m-%d-%H%M%S')}-{doc['commit']}"
    with open(os.path.join(a.out, stem + ".json"), "w") as f:
        json.dump(doc, f, indent=1)
    lines = [
        f"# tunbus lab scale ({a.runs} runs each)", "",
        f"{doc['date']} · commit `{doc['commit']}` · {doc['kernel']} · {doc['cpus']} CPUs", "",
        "| hosts | run | bring-up (s) | pairs checked | failures | RTT p50 (ms) | RTT p99 (ms) | TCP h1→h2 (Gbit/s) | memory per agent (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for h, rs in results.items():
        for i, r in enumerate(rs, 1):
            lines.append(f"| {h} | {i} | {r['bring_up_s']:.2f} | {r['pairs_checked']} | {len(r['failures'])} | "
                         f"{r['rtt_p50_ms']} | {r['rtt_p99_ms']} | {(r['throughput_bits_per_s'] or 0) / 1e9:.2f} | {r['rss_per_agent_mib']:.2f} |")
    lines += ["", f"Mean TCP h1→h2: {mean[2] / 1e9:.2f} Gbit/s with 2 hosts, {mean[a.hosts] / 1e9:.2f} Gbit/s with "
              f"{a.hosts} hosts: ratio {ratio:.2f} (target ≥ 0.80).", ""]
    with open(os.path.join(a.out, "lab-scale.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
