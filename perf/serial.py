#!/usr/bin/env python3
"""802.15.4 frames per second through two pseudo-terminal probes and the bus (issue 27).

  python3 perf/serial.py [--frames N] [--size BYTES] [--rates R1,R2] [--agent PATH] [--runs R]

Two `agent serial` processes, each on a pseudo-terminal the script plays the probe on;
probe A writes N SLIP-framed frames, offered at each rate of --rates (in chunks every 10 ms;
0: one burst as fast as the line takes them), probe B counts the frames that arrive (each
numbered, checked byte-exact); the agents' reports say where the others were lost (a
probe's line takes 32 frames of backlog: a burst far above its speed overflows it, as a
real 460800-baud probe would). In the same run:
  native     --wire native in a session of their own (frames batched into v1, flooded)
  ioppytest  --wire ioppytest, one JSON message per frame, through `agent route` with a
             topology linking the two probes (as an ioppytest session runs)
The reference is what a 460800-baud line carries: 46 080 bytes/s, i.e. about
46080 / (size + 3) frames/s of SLIP (END, frame, END; escapes not counted).
Writes perf/results/serial-<date>-<commit>.json and .md. Needs RabbitMQ on
127.0.0.1:5672 (guest/guest); no root.
"""

import argparse
import datetime
import json
import os
import pty
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
END, ESC, ESC_END, ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD
LINE_BYTES_PER_S = 460800 // 10  # 8N1: ten bits on the line per byte


def log(msg: str) -> None:
    print(f"[serial] {msg}", file=sys.stderr, flush=True)


def slip(frame: bytes) -> bytes:
    out = bytearray([END])
    for b in frame:
        if b == END:
            out += bytes([ESC, ESC_END])
        elif b == ESC:
            out += bytes([ESC, ESC_ESC])
        else:
            out.append(b)
    out.append(END)
    return bytes(out)


def frame(i: int, size: int) -> bytes:
    """Frame i: a data frame header, the number, then filler with END and ESC inside."""
    head = bytes([0x41, 0x88, i & 0xFF, 0xCD, 0xAB, 0xFF, 0xFF, 0x01, 0x00]) + i.to_bytes(4, "big")
    body = bytes((i + k) & 0xFF for k in range(size - len(head)))
    return head + body


class Probe:
    """A pseudo-terminal whose terminal side programs open through a symlink."""

    def __init__(self, folder: Path, name: str):
        self.master, slave = pty.openpty()
        tty.setraw(slave)
        self.tty = os.ttyname(slave)
        os.close(slave)
        self.path = folder / name
        os.symlink(self.tty, self.path)

    def close(self):
        os.close(self.master)


class Receiver(threading.Thread):
    """Decodes SLIP from a probe's master side (split on END, unescape: C speed) and counts
    the numbered frames that arrive byte-exact."""

    def __init__(self, probe: Probe, expected: list):
        super().__init__(daemon=True)
        self.probe, self.expected = probe, expected
        self.count = self.bad = 0
        self.first = self.last = None
        self.stop = False

    def run(self):
        rest = b""
        while not self.stop:
            try:
                data = os.read(self.probe.master, 1 << 20)
            except OSError:
                time.sleep(0.01)
                continue
            now = time.monotonic()
            parts = (rest + data).split(b"\xc0")
            rest = parts.pop()
            for p in parts:
                if not p:
                    continue
                f = p.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")
                n = int.from_bytes(f[9:13], "big")
                if n < len(self.expected) and f == self.expected[n]:
                    self.count += 1
                    self.first = self.first or now
                    self.last = now
                else:
                    self.bad += 1


def wait_log(path: Path, what: str, limit: float) -> None:
    t0 = time.time()
    while what not in path.read_text(errors="replace"):
        if time.time() - t0 > limit:
            raise SystemExit(f"no {what!r} in {path}:\n{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def stop_all(procs) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def run_case(agent: str, wire: str, frames: int, size: int, rate: int, folder: Path) -> dict:
    tag = f"sb{os.getpid() % 100000}{wire[:3]}{int(time.time() * 1000) % 100000}"
    a_name, b_name = f"{tag}a", f"{tag}b"
    pa, pb = Probe(folder, f"{tag}-a"), Probe(folder, f"{tag}-b")
    procs, logs = [], []

    def start(args, name):
        lp = folder / f"{name}.log"
        logs.append(lp)
        p = subprocess.Popen([agent, *args], stdout=subprocess.DEVNULL, stderr=open(lp, "w"))
        procs.append(p)
        return lp

    try:
        common = ["--url", URL, "--stats-interval", "0"]
        if wire == "native":
            extra = ["--wire", "native", "--session", tag]
        else:
            exchange = f"tunbus.{tag}"
            topo = folder / f"{tag}.yaml"
            topo.write_text(f"topology:\n  - link_id: radio\n    nodes: [{a_name}, {b_name}]\n")
            r = start(["route", "--url", URL, "--exchange", exchange, "--stats-interval", "0", "--topology", str(topo)], f"{tag}-router")
            wait_log(r, "router serving", 20)
            extra = ["--wire", "ioppytest", "--exchange", exchange]
        sa, sb = folder / f"{a_name}.json", folder / f"{b_name}.json"
        la = start(["serial", "--name", a_name, "--device", str(pa.path), "--stats-json", str(sa), *common, *extra], a_name)
        lb = start(["serial", "--name", b_name, "--device", str(pb.path), "--stats-json", str(sb), *common, *extra], b_name)
        wait_log(la, "agent up", 20)
        wait_log(lb, "agent up", 20)
        time.sleep(0.5)
        expected = [frame(i, size) for i in range(frames)]
        rx = Receiver(pb, expected)
        rx.start()
        # Offered at `rate` frames/s: one chunk every 10 ms (0: all at once, as fast as the
        # line takes them).
        per_chunk = max(1, int(rate / 100)) if rate else frames
        chunks = [b"".join(slip(f) for f in expected[i:i + per_chunk]) for i in range(0, frames, per_chunk)]
        t0 = time.monotonic()
        for k, chunk in enumerate(chunks):
            if rate:
                due = t0 + k * 0.01
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
            view = memoryview(chunk)
            while view:
                n = os.write(pa.master, view[:65536])
                view = view[n:]
        t_written = time.monotonic()
        seen, stall = -1, time.monotonic()
        while rx.count < frames and time.monotonic() - stall < 3.0:
            if rx.count != seen:
                seen, stall = rx.count, time.monotonic()
            time.sleep(0.02)
        rx.stop = True
        elapsed = (rx.last or t0) - t0
        fps = rx.count / elapsed if elapsed > 0 else 0.0
        line_fps = LINE_BYTES_PER_S / (size + 2)
        result = {
            "wire": wire,
            "offered_frames_per_s": rate or "burst",
            "frames_sent": frames,
            "frames_received": rx.count,
            "bad": rx.bad,
            "frame_bytes": size,
            "write_s": round(t_written - t0, 3),
            "elapsed_s": round(elapsed, 3),
            "frames_per_s": round(fps),
            "payload_bytes_per_s": round(fps * size),
            "x_460800_baud": round(fps / line_fps, 1),
        }
        stop_all(procs)
        for side, path in (("a", sa), ("b", sb)):
            try:
                report = json.loads(path.read_text())
                result[f"{side}_serial"] = report.get("serial")
                result[f"{side}_drops"] = report.get("drops")
            except (OSError, ValueError):
                pass
        log(json.dumps(result))
        return result
    finally:
        stop_all(procs)
        for pr in (pa, pb):
            pr.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--size", type=int, default=127)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--rates", default="0", help="offered frames/s, comma-separated (0: one burst as fast as the line takes it)")
    default_agent = ROOT / "target" / "release" / "agent"
    if not default_agent.exists():
        default_agent = ROOT / "target" / "debug" / "agent"
    ap.add_argument("--agent", default=str(default_agent))
    args = ap.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = []
    with tempfile.TemporaryDirectory(prefix="tbserial") as d:
        for _ in range(args.runs):
            for rate in [int(r) for r in args.rates.split(",")]:
                for wire in ("native", "ioppytest"):
                    results.append(run_case(args.agent, wire, args.frames, args.size, rate, Path(d)))
    line_fps = LINE_BYTES_PER_S / (args.size + 2)
    out = ROOT / "perf" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serial-{datetime.date.today()}-{commit}"
    (out / f"{stem}.json").write_text(json.dumps({"agent": args.agent, "line_frames_per_s": round(line_fps), "results": results}, indent=2))
    md = [
        "| wire | offered frames/s | sent | reached B's port (bus) | written to B's line | delivered frames/s | payload bytes/s | × 460800 baud | lost at B's line (busy) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r.get("b_serial") or {}
        busy = b.get("lost_busy", 0)
        reached = b.get("frames_out", 0) + busy
        md.append(f"| {r['wire']} | {r['offered_frames_per_s']} | {r['frames_sent']} | {reached} | {r['frames_received']} | {r['frames_per_s']} | {r['payload_bytes_per_s']} | {r['x_460800_baud']} | {busy} |")
    md.append(f"| 460800-baud line ({args.size}-byte frames) | | | | | {round(line_fps)} | {round(line_fps * args.size)} | 1 | |")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
