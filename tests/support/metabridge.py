"""Run the real metabridge binary on a `netns.Node`.

    mb = Metabridge(node, kubeconfig, log_dir, extra_args=["--iptables-resync", "1s"])
    mb.start(); mb.wait_ready()
    mb.metrics()[("metabridge_ready", ())] == 1.0
    mb.stop()            # SIGTERM, waits, returns the exit code
    mb.iptables_remove() # `metabridge iptables remove --iptables-chain MB<ID>`

The binary is ``target/debug/metabridge`` of this repository unless
``METABRIDGE_BIN`` names another. stdout+stderr go to ``<log_dir>/<name>.log``
(conftest prints it when a test fails). The child gets PR_SET_PDEATHSIG=SIGKILL
so a crashed test run cannot leave a daemon behind (its rules are then swept by
`netns.cleanup_stale()`); `close()` kills it in any case.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
WHOAMI_PATH = "/metabridge/v1/whoami"


def binary() -> Path:
    return Path(os.environ.get("METABRIDGE_BIN") or REPO / "target" / "debug" / "metabridge")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run_cli(args: Sequence[str], *, env: dict | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
    """`metabridge ARGS...` to completion (for subcommands and config errors)."""
    full_env = dict(os.environ)
    for k in list(full_env):  # no ambient config leaks into the run
        if k.startswith("METABRIDGE_") and k != "METABRIDGE_BIN" or k in ("NODE_NAME", "HOST_IP"):
            del full_env[k]
    full_env.update(env or {})
    return subprocess.run([str(binary()), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


# ------------------------------------------------------------- prometheus --

_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')

Labels = tuple[tuple[str, str], ...]


def _unescape(v: str) -> str:
    return v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def parse_prometheus(text: str) -> dict[tuple[str, Labels], float]:
    """Prometheus text format → {(name, ((label, value), ...sorted)): value}."""
    out: dict[tuple[str, Labels], float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        labels: list[tuple[str, str]] = []
        raw = m.group("labels") or ""
        pos = 0
        while pos < len(raw):
            lm = _LABEL_RE.match(raw, pos)
            if not lm:
                raise ValueError(f"bad labels in {line!r}")
            labels.append((lm.group(1), _unescape(lm.group(2))))
            pos = lm.end()
        out[(m.group("name"), tuple(sorted(labels)))] = float(m.group("value"))
    return out


def metric(metrics: dict, name: str, **labels: str) -> float | None:
    """The value of name with exactly these labels, or None."""
    return metrics.get((name, tuple(sorted(labels.items()))))


def metric_sum(metrics: dict, name: str, **labels: str) -> float:
    """Sum of name over every series whose labels include these."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


# ----------------------------------------------------------------- daemon --


class Metabridge:
    """One `metabridge run` process for one node. See the module docstring."""

    def __init__(self, node, kubeconfig: str | os.PathLike, log_dir: str | os.PathLike,
                 *, extra_args: Sequence[str] = (), env: dict | None = None,
                 name: str = "metabridge", listen_port: int | None = None,
                 admin_port: int | None = None, debug_whoami: bool = True,
                 chain: str | None = None):
        self.node = node
        self.kubeconfig = str(kubeconfig)
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self.listen_port = listen_port or free_port(node.host_ip)
        self.admin_port = admin_port or free_port("127.0.0.1")
        self.chain = chain or node.chain
        self.extra_args = list(extra_args)
        self.env_extra = dict(env or {})
        self.debug_whoami = debug_whoami
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._log = None

    # -- addresses -----------------------------------------------------------
    @property
    def listen(self) -> str:
        return f"{self.node.host_ip}:{self.listen_port}"

    @property
    def url(self) -> str:
        """The metadata listener, direct (not through the DNAT)."""
        return f"http://{self.listen}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def argv(self) -> list[str]:
        argv = [str(binary()), "run",
                "--node-name", self.node.name,
                "--listen", self.listen,
                "--admin-listen", f"127.0.0.1:{self.admin_port}",
                "--intercept-interface", self.node.interface_pattern,
                "--intercept-to", self.listen,
                "--iptables-chain", self.chain]
        if self.debug_whoami:
            argv.append("--debug-whoami")
        return argv + self.extra_args

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("METABRIDGE_") or k in ("NODE_NAME", "HOST_IP"))}
        env.update({"KUBECONFIG": self.kubeconfig, "HOST_IP": self.node.host_ip,
                    "METABRIDGE_LOG": os.environ.get("METABRIDGE_LOG", "info,metabridge=debug"),
                    "NO_COLOR": "1",
                    "RUST_BACKTRACE": "1"})
        env.update(self.env_extra)
        return env

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> "Metabridge":
        if not binary().exists():
            raise FileNotFoundError(f"metabridge binary not found at {binary()} "
                                    "(run `cargo build` or set METABRIDGE_BIN)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.returncode = None
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env,
                                     preexec_fn=_die_with_parent)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")

    def admin_get(self, path: str, timeout: float = 2) -> tuple[int | None, str]:
        """(status, body) of GET on the admin listener; (None, reason) if down."""
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (OSError, urllib.error.URLError) as e:
            return None, str(e)

    def readyz(self) -> int | None:
        return self.admin_get("/readyz")[0]

    def wait_ready(self, timeout: float = 20) -> "Metabridge":
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check_alive()
            last = self.admin_get("/readyz", timeout=1)
            if last[0] == 200:
                return self
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {timeout}s (last /readyz: "
                             f"{last}):\n{self.log_tail()}")

    def metrics_text(self) -> str:
        status, body = self.admin_get("/metrics")
        if status != 200:
            raise AssertionError(f"/metrics answered {status}: {body[:500]}")
        return body

    def metrics(self) -> dict[tuple[str, Labels], float]:
        return parse_prometheus(self.metrics_text())

    def metric(self, name: str, **labels: str) -> float | None:
        return metric(self.metrics(), name, **labels)

    def metric_sum(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

    def send_signal(self, sig: int) -> None:
        if self.running:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send sig, wait for exit, return the exit code (-N for a signal)."""
        if self.proc is None:
            raise RuntimeError("not started")
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"{self.name} did not exit within {timeout}s of "
                                     f"signal {sig}:\n{self.log_tail()}")
        self.returncode = self.proc.returncode
        self._close_log()
        return self.returncode

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def close(self) -> None:
        """Teardown: kill if still running (never raises for a dead process)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def iptables_remove(self, chain: str | None = None) -> subprocess.CompletedProcess:
        return run_cli(["iptables", "remove", "--iptables-chain", chain or self.chain])

    # -- logs ----------------------------------------------------------------
    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> "Metabridge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
