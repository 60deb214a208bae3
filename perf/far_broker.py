#!/usr/bin/env python3
"""A participant far from the broker (issue 28's windows): TCP each way with the broker RTT ms away.

  sudo python3 perf/far_broker.py [--rtt 50,100] [--seconds 10] [--no-build] [--only adaptive,fixed]

Agent A reaches the broker through a userspace delay line (this script's `--proxy`: every
chunk held half the round trip each way, no rate limit, no loss; this kernel has no
netem); agent B is next to the broker. TCP (iperf3, one
flow) runs from A to B (A publishes over the far path) and from B to A (A consumes over
it, where the consumer's window counts), with the window adaptive (the default) and with
`--fixed-prefetch`. In the same run, the reference: both agents next to the broker, each
delaying what it receives (`--emulate delay`) so that a ping takes what it took through the
far broker, which is what the inner TCP's own window allows over that round trip on this
machine; and the LAN rate (both agents next to the broker, no delay). Target (issue 28): each direction at least 0.8x
the lesser of the LAN rate and the reference. Writes perf/results/far-broker-<date>-<commit>.json
and prints a Markdown table. Removes what it made (namespaces, veths, processes), also on failure.
"""

import argparse
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as perf  # noqa: E402  (perf/run.py: Host2, CLEANUP, run, in_ns)

RELAY_PORT = 5673


async def delay_proxy(listen_port: int, half_s: float) -> None:
    """A TCP relay to the broker that holds every chunk `half_s` each way (a delay line:
    no rate limit, no loss), as a path to a far broker. This kernel has no netem."""
    import asyncio

    loop = asyncio.get_running_loop()

    class Half(asyncio.Protocol):
        def __init__(self) -> None:
            self.peer: asyncio.Transport | None = None
            self.early: list[bytes] = []
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            loop.call_later(half_s, self.forward, data)

        def forward(self, data: bytes) -> None:
            if self.peer is None:
                self.early.append(data)
            elif not self.peer.is_closing():
                self.peer.write(data)

        def connection_lost(self, exc) -> None:
            loop.call_later(half_s, lambda: self.peer is not None and self.peer.close())

    class Client(Half):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            loop.create_task(self.dial())

        async def dial(self) -> None:
            _, upstream = await loop.create_connection(Half, "127.0.0.1", perf.BROKER_PORT)
            upstream.peer = self.transport
            self.peer = upstream.transport
            for d in self.early:
                self.peer.write(d)
            self.early.clear()

    server = await loop.create_server(Client, "127.0.0.1", listen_port, reuse_address=True)
    async with server:
        await server.serve_forever()


def far_path(rtt_ms: float) -> subprocess.Popen:
    """The far agent's way to the broker: the delay proxy on 127.0.0.1:RELAY_PORT."""
    relay = perf.CLEANUP.spawn([sys.executable, __file__, "--proxy", str(RELAY_PORT), str(rtt_ms / 2000)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return relay


def remove_far_path(relay: subprocess.Popen | None) -> None:
    if relay is not None:
        perf.CLEANUP.stop(relay)


def agents(h: "perf.Host2", far: bool, extra: list[str], logdir: Path, tag: str) -> list[subprocess.Popen]:
    session = f"{perf.TAG}{tag}"
    out = []
    for i, (ns, v4, v6) in enumerate([(h.ns_a, h.addr_a, h.v6_a), (h.ns_b, h.addr_b, h.v6_b)]):
        url = f"amqp://guest:guest@127.0.0.1:{RELAY_PORT}/%2f" if far and i == 0 else perf.URL
        cmd = [str(perf.AGENT), "connect", "--url", url, "--session", session, "--name", f"{session}{'ab'[i]}", "--netns", ns,
               "--ipv4", f"{v4}/24", "--ipv6", f"{v6}/64", "--queues", "1", "--mtu", "9000", "--stats-interval", "0", *extra]
        errlog = open(logdir / f"{tag}-{'ab'[i]}.log", "w")
        out.append(perf.CLEANUP.spawn(cmd, stop_signal=signal.SIGINT, stdout=subprocess.PIPE, stderr=errlog, text=True,
                                      env={**os.environ, "NO_COLOR": "1"}))
    return out


def tcp_both_ways(h: "perf.Host2", seconds: int) -> dict:
    h.start_server()
    res = {}
    for name, extra in [("a_to_b", []), ("b_to_a", ["-R"])]:
        d = h.iperf(seconds, extra, omit=2)
        res[name] = d["end"]["sum_received"]["bits_per_second"] / 1e9
    return res


def tunbus_run(rtt_ms: float | None, extra: list[str], seconds: int, logdir: Path, tag: str, subnet: int) -> dict:
    h = perf.Host2(tag, subnet)
    relay = None
    procs = []
    try:
        if rtt_ms is not None:
            relay = far_path(rtt_ms)
        h.create()
        procs = agents(h, rtt_ms is not None, extra, logdir, tag)
        h.wait_ping(timeout=30)
        ping = h.ping(20, 0.2)
        res = {"ping_p50_ms": ping["p50_ms"], **tcp_both_ways(h, seconds)}
        grown = []
        for p in procs:
            perf.CLEANUP.stop(p, signal.SIGINT, grace=15)
            m = re.search(r"consumer window grew to (\d+)", p.stdout.read() if p.stdout else "")
            grown.append(int(m.group(1)) if m else None)
        res["prefetch_grown"] = grown
        return res
    finally:
        for p in procs:
            perf.CLEANUP.stop(p, signal.SIGINT, grace=15)
        h.destroy()
        remove_far_path(relay)


def reference(rtt_ms: float, seconds: int, logdir: Path, subnet: int) -> dict:
    """Both agents next to the broker, each delaying what it receives by half `rtt_ms`
    (`--emulate`, no loss, room for 100,000 packets): the inner TCP over that round trip
    with the broker path short, so its own window is what limits it."""
    return tunbus_run(None, ["--emulate", f"delay {rtt_ms / 2:g}ms limit 100000"], seconds, logdir, f"r{int(rtt_ms)}", subnet)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--proxy":
        import asyncio
        asyncio.run(delay_proxy(int(sys.argv[2]), float(sys.argv[3])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt", default="50,100", help="round trips to the broker, ms [50,100]")
    ap.add_argument("--seconds", type=int, default=10, help="seconds per iperf3 direction [10]")
    ap.add_argument("--only", default="adaptive,fixed", help="which windows [adaptive,fixed]")
    ap.add_argument("--no-build", action="store_true", help="use target/release/agent as it is")
    ap.add_argument("--out", default=str(perf.REPO / "perf" / "results"), help="results directory")
    args = ap.parse_args()
    perf.prepare("perf/far_broker.py", args.no_build)
    windows = {"adaptive": [], "fixed": ["--fixed-prefetch"]}
    chosen = [w for w in args.only.split(",") if w in windows]
    now = dt.datetime.now(dt.timezone.utc)
    res = {"date": now.strftime("%Y-%m-%d %H:%M:%S UTC"), "commit": perf.git_commit(), "seconds": args.seconds, "runs": {}}
    import tempfile
    try:
        with tempfile.TemporaryDirectory(prefix="tbfar-") as d:
            logdir = Path(d)
            perf.log("LAN: both agents next to the broker")
            res["runs"]["lan"] = tunbus_run(None, [], args.seconds, logdir, "lan", 70)
            for rtt in [float(r) for r in args.rtt.split(",")]:
                for w in chosen:
                    key = f"{w}-{rtt:g}ms"
                    perf.log(key)
                    try:
                        res["runs"][key] = tunbus_run(rtt, windows[w], args.seconds, logdir, f"{w[0]}{int(rtt)}", 71)
                    except Exception as e:
                        perf.log(f"{key} FAILED: {e}")
                        res["runs"][key] = {"error": str(e)}
                # The reference at the round trip a ping through the bus took.
                bus_rtt = next((r.get("ping_p50_ms") for k, r in res["runs"].items() if k.endswith(f"-{rtt:g}ms") and "ping_p50_ms" in r), rtt)
                perf.log(f"reference: veth with {bus_rtt:.1f} ms")
                res["runs"][f"reference-{rtt:g}ms"] = reference(bus_rtt, args.seconds, logdir, 72)
    finally:
        perf.CLEANUP.all()
    path = perf.write_results(args.out, "far-broker", res, now)
    lan = res["runs"].get("lan", {})
    print(f"\n# A participant far from the broker ({res['date']}, {res['commit']}, {args.seconds} s per direction)\n")
    print("| run | ping through the bus p50 ms | A to B Gbit/s | B to A Gbit/s | target A to B | target B to A | prefetch grown (A, B) |")
    print("|---|---|---|---|---|---|---|")
    for k, r in res["runs"].items():
        if "error" in r:
            print(f"| {k} | failed: {r['error'][:80]} | | | | | |")
            continue
        rtt = k.rsplit("-", 1)[-1] if "-" in k else None
        ref = res["runs"].get(f"reference-{rtt}", {}) if rtt else {}
        targets = ["", ""]
        if rtt and not k.startswith("reference"):
            for i, way in enumerate(("a_to_b", "b_to_a")):
                limit = min(x for x in (lan.get(way), ref.get(way)) if x)
                targets[i] = f"{r[way] / limit:.2f}x of {limit:.2f}"
        print(f"| {k} | {perf.fmt(r.get('ping_p50_ms'))} | {perf.fmt(r.get('a_to_b'))} | {perf.fmt(r.get('b_to_a'))} | {targets[0]} | {targets[1]} | "
              f"{r.get('prefetch_grown', '')} |")
    print(f"\n(results: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
