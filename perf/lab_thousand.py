#!/usr/bin/env python3
"""A thousand hosts (issue 12): `agent lab --hosts 1000` on one node and on a private 3-node
cluster (bring-up time, sampled pairs over IPv4 and IPv6), then the same labs kept up while
the broker restarts (one node: `rabbitmqctl stop_app`/`start_app`) or a node dies (3 nodes:
SIGKILL of node 1's Erlang VM), timing until every agent is connected again and showing how
the reconnections spread over time (no stampede). Writes perf/results/lab-thousand.md and a
JSON beside it.

    sudo python3 perf/lab_thousand.py [--hosts 1000] [--no-build]
"""
import argparse
import collections
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import nodes  # perf/nodes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "target", "release", "agent")
STATUS = re.compile(r"^\[\s*([0-9.]+) s\] (\d+)/(\d+) hosts connected")
BACK = re.compile(r"^(\S+)Z\s+INFO tunbus::amqp: broker is back")


def lab_once(hosts, brokers):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [AGENT, "lab", "--hosts", str(hosts), "--brokers", str(brokers), "--session", "thou", "--throughput-seconds", "2", "--json", path]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    try:
        with open(path) as f:
            r = json.load(f)
    finally:
        os.unlink(path)
    r["wall_s"] = wall
    r["exit_code"] = p.returncode
    return r


def restart_under(hosts, brokers):
    """A kept lab; break its broker once everything is up; time until all are back."""
    env = {**os.environ, "RUST_LOG": "info,tunbus::agent=warn,tunbus::amqp=info", "NO_COLOR": "1"}
    err = tempfile.NamedTemporaryFile(mode="w+", suffix=".log", delete=False)
    p = subprocess.Popen([AGENT, "lab", "--hosts", str(hosts), "--brokers", str(brokers), "--session", "thour", "--keep", "--throughput-seconds", "0"],
                         stdout=subprocess.DEVNULL, stderr=err, env=env, text=True)
    result = {}
    try:
        state = None
        for _ in range(300):
            time.sleep(1)
            if any(STATUS.match(l) for l in open(err.name)):
                state = json.load(open("/run/tunbus/lab-thour.json"))
                break
        if state is None:
            raise RuntimeError("the kept lab did not come up")
        time.sleep(3)
        t_break = time.time()
        if brokers == 1:
            node = state["broker_node"]
            subprocess.run(["rabbitmqctl", "-n", node, "stop_app"], capture_output=True, timeout=120)
            subprocess.run(["rabbitmqctl", "-n", node, "start_app"], capture_output=True, timeout=300)
            how = "rabbitmqctl stop_app + start_app"
        else:
            pid = int(open(os.path.join(state["temp_dir"], "node1", "pid")).read().strip())
            os.kill(pid, signal.SIGKILL)
            how = "SIGKILL of node 1"
        broken_for = time.time() - t_break
        # Wait until a status line after the break says everyone is connected.
        t0_lines = None
        done = None
        deadline = time.time() + 180
        while time.time() < deadline and done is None:
            time.sleep(1)
            lines = open(err.name).read().splitlines()
            stamps = [(float(m.group(1)), int(m.group(2)), int(m.group(3))) for m in map(STATUS.match, lines) if m]
            if t0_lines is None and stamps:
                # status line times are seconds since the lab went up; map the break onto them
                t0_lines = stamps[-1][0] - (time.time() - t_break)
            down = [s for s in stamps if s[0] >= t0_lines and s[1] < s[2]]
            if down and stamps[-1][1] == stamps[-1][2] and stamps[-1][0] > down[-1][0]:
                done = next(s[0] for s in stamps if s[0] > down[-1][0] and s[1] == s[2]) - t0_lines
        backs = []
        for l in open(err.name):
            m = BACK.match(l)
            if m:
                backs.append(datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc).timestamp() - t_break)
        spread = collections.Counter(int(b) for b in backs if b >= 0)
        result = {"hosts": hosts, "brokers": brokers, "how": how, "broken_for_s": broken_for, "all_back_s": done,
                  "reconnected": len([b for b in backs if b >= 0]), "per_second": dict(sorted(spread.items()))}
    finally:
        nodes.interrupt(p, 300)
        os.unlink(err.name)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--bin", "agent"], cwd=ROOT, check=True)
    labs = [lab_once(a.hosts, b) for b in (1, 3)]
    restarts = [restart_under(a.hosts, b) for b in (1, 3)]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc)
    md = [f"## {a.hosts} hosts (perf/lab_thousand.py)", "", f"{now:%Y-%m-%d %H:%M:%S} UTC · commit `{commit}`", "",
          "| broker | hosts up | bring-up (s) | pairs checked | failures | ping p50 / p99 (ms) | MiB per agent |", "|---|---:|---:|---:|---:|---|---:|"]
    for r in labs:
        md.append(f"| {r['broker']} | {r['hosts_up']}/{r['hosts']} | {r['bring_up_s']:.1f} | {r['pairs_checked']} | {len(r['failures'])} | "
                  f"{r['rtt_p50_ms'] or 0:.2f} / {r['rtt_p99_ms'] or 0:.2f} | {r['rss_per_agent_mib']:.2f} |")
    md += ["", "| broken by | the break took (s) | every agent connected after (s) | reconnections per second after the break |", "|---|---:|---:|---|"]
    for r in restarts:
        spread = ", ".join(f"{s}: {n}" for s, n in r.get("per_second", {}).items())
        md.append(f"| {r.get('how')} ({r.get('brokers')} node(s)) | {r.get('broken_for_s', 0):.1f} | {r.get('all_back_s') or 0:.0f} | {spread} |")
    md.append("")
    os.makedirs(os.path.join(ROOT, "perf", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "perf", "results", f"lab-thousand-{now:%Y-%m-%d-%H%M%S}-{commit}.json"), "w") as f:
        json.dump({"labs": labs, "restarts": restarts}, f, indent=1)
    with open(os.path.join(ROOT, "perf", "results", "lab-thousand.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
