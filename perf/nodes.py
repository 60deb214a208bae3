"""Private RabbitMQ nodes for benchmarks: their own name, ports and folder, optionally a
TLS listener with certificates made here (openssl), stopped and removed when done.

Used by perf/run.py (the TLS column) and the cluster and soak benchmarks. The same recipe as
`tunbus::lab::broker::PrivateBroker`: Debian's rabbitmq-server started through `su rabbitmq`
with the open-files limit raised, every setting through RABBITMQ_* variables.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

RAISED_START = ("cd /var/lib/rabbitmq 2>/dev/null; n=$(ulimit -Hn); "
                "if [ \"$n\" = unlimited ] || [ \"$n\" -gt 65536 ]; then n=65536; fi; ulimit -Sn \"$n\"; "
                "exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached")


def interrupt(p: subprocess.Popen, timeout: float) -> None:
    """Ends a process we started as Ctrl-C would (SIGINT), so it cleans up after itself;
    kills it if it has not ended within `timeout` seconds."""
    import signal
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path) -> dict:
    """A test CA and a server certificate for localhost / 127.0.0.1 (EC P-256)."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=tunbus perf CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                  "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl(d, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    openssl(d, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


class PrivateNode:
    """One RabbitMQ node on 127.0.0.1 with a plain listener (and a TLS one with tls=True)."""

    def __init__(self, tls: bool = False, name: str | None = None, cookie: str | None = None,
                 extra_conf: list[str] | None = None, port: int | None = None, dist_port: int | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="tunbus-perf-node-"))
        self.port = port or free_port()
        self.dist_port = dist_port or free_port()
        self.tls_port = free_port() if tls else None
        self.node = name or f"tbperf-{os.getpid()}-{self.port}@localhost"
        self.cookie = cookie
        self.certs = make_certs(self.dir / "certs") if tls else None
        conf = ["loopback_users = none"]
        if self.certs:
            conf += [f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                     f"ssl_options.cacertfile = {self.certs['ca']}",
                     f"ssl_options.certfile = {self.certs['cert']}",
                     f"ssl_options.keyfile = {self.certs['key']}",
                     "ssl_options.verify = verify_none"]
        conf += extra_conf or []
        for sub in ("log", "mnesia"):
            (self.dir / sub).mkdir()
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        if cookie:
            # A node's own home, with the cluster's Erlang cookie.
            (self.dir / "home").mkdir()
            (self.dir / "home" / ".erlang.cookie").write_text(cookie)
            os.chmod(self.dir / "home" / ".erlang.cookie", 0o400)
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.dir)], check=False)
        self.started = False

    def env(self) -> dict:
        e = dict(os.environ)
        e.update({
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "none-advanced.config"),
        })
        if self.cookie:
            e["HOME"] = str(self.dir / "home")
            e["RABBITMQ_CTL_ERL_ARGS"] = f"-setcookie {self.cookie}"
            e["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = f"-setcookie {self.cookie}"
        return e

    def start(self, wait: float = 60) -> "PrivateNode":
        subprocess.run(["su", "rabbitmq", "-s", "/bin/sh", "-c", RAISED_START], env=self.env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started = True
        t0 = time.monotonic()
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        while not all(answers(p) for p in ports):
            if time.monotonic() - t0 > wait:
                self.stop()
                raise RuntimeError(f"private RabbitMQ node {self.node} did not come up in {wait:.0f} s")
            time.sleep(0.2)
        return self

    def ctl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(["rabbitmqctl", "-n", self.node, *args], env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def pid(self) -> int | None:
        try:
            return int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def add_user(self, user: str, password: str, vhost: str = "/") -> None:
        self.ctl("add_user", user, password)
        self.ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def stop(self) -> None:
        if self.started:
            try:
                subprocess.run(["rabbitmqctl", "-n", self.node, "stop"], env=self.env(), capture_output=True, timeout=60)
            except subprocess.TimeoutExpired:
                # A node busy deleting thousands of queues may not stop in time: ours, so kill it.
                pid = self.pid()
                if pid:
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateCluster:
    """n private nodes joined into one cluster (node 1 first; the others join it). All run as
    the rabbitmq user, so they share its Erlang cookie."""

    def __init__(self, n: int = 3, extra_conf: list[str] | None = None):
        self.nodes = [PrivateNode(extra_conf=extra_conf) for _ in range(n)]

    def start(self) -> "PrivateCluster":
        try:
            for node in self.nodes:
                subprocess.run(["su", "rabbitmq", "-s", "/bin/sh", "-c", RAISED_START], env=node.env(), check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                node.started = True
            for node in self.nodes:
                t0 = time.monotonic()
                while not answers(node.port):
                    if time.monotonic() - t0 > 90:
                        raise RuntimeError(f"node {node.node} did not come up")
                    time.sleep(0.2)
            first = self.nodes[0].node
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first)
                node.ctl("start_app")
            return self
        except Exception:
            self.stop()
            raise

    def urls(self, user: str = "guest", password: str = "guest") -> list[str]:
        return [f"amqp://{user}:{password}@127.0.0.1:{n.port}/%2f" for n in self.nodes]

    def memory_bytes(self) -> int:
        """Total memory of the nodes as each reports it (rabbitmqctl status: total rss)."""
        total = 0
        for n in self.nodes:
            import json
            try:
                st = json.loads(n.ctl("status", "--formatter", "json"))
                total += int(st["memory"]["total"]["rss"])
            except Exception:
                pass
        return total

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
