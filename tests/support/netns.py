"""A Kubernetes node in a box: pods are network namespaces on this machine.

Layout of one `Node` (id = 4 random characters, e.g. ``k3xq``)::

    root network namespace ("the node", where metabridge runs hostNetwork)
      mb<id>h          holds HOST_IP = <slot subnet>.1/32 (a dummy interface,
                       or an empty bridge where the kernel has no dummy driver)
      mb<id>v<n>       host side of pod n's veth; no IPv4 address;
                       route  <pod ip>/32 dev mb<id>v<n> scope link
      ip rule  from <slot subnet>/24 lookup <table>   (pref 5207)
      table    throw <slot subnet>/24 ; unreachable default
    network namespace mb<id>p<n> ("pod n")
      lo up
      eth0             <pod ip>/32
                       169.254.1.1 dev eth0 scope link
                       default via 169.254.1.1 dev eth0
                       neigh 169.254.1.1 -> MAC of mb<id>v<n> (permanent)

Pod networking is the AWS VPC CNI's: a /32 per pod, a link-local gateway
(169.254.1.1) whose neighbour entry is the host side's MAC, and a host route
per pod. metabridge's interface pattern for a node is ``mb<id>v+``
(`Node.interface_pattern`), its chain ``MB<ID>`` (`Node.chain`).

What a pod can reach: the node's own addresses (HOST_IP, where the fakes listen
on 0.0.0.0), and the other pods of its node. Nothing else: the policy rule sends
everything else a pod (or the node from HOST_IP) sends to ``unreachable``, so
the kernel answers at once with ICMP host-unreachable (EHOSTUNREACH). In
particular 169.254.169.254:80 is reachable from a pod **only** through
metabridge's DNAT; without the rules the connect fails in milliseconds, and no
pod packet ever leaves this machine. The node never gets 169.254.169.254 as an
address.

Sysctls: only per-interface ones on interfaces we create
(``net.ipv4.conf.mb<id>v<n>.forwarding=1``, so the kernel answers the
unreachable route with ICMP instead of dropping silently). They vanish with the
interface; nothing global (``ip_forward``, ``route_localnet``) is changed: the
DNAT target HOST_IP is a local address, so DNAT'd packets are delivered, not
forwarded.

Commands in a pod (`Pod.run`, `Pod.popen`, `Pod.http_get`) get a clean
environment (`Pod.env()`: PATH, LANG and an empty HOME of the pod's own under
the state directory), so no cloud configuration of the machine leaks into an
SDK under test; pass ``env=pod.env(AWS_REGION="...")`` to add to it.

A "hostNetwork pod" is simply a process in the root namespace that uses the
node IP as its source (`Node.host_caller()`): e.g. ``curl --interface HOST_IP``.

Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking; never routed on the
internet and rarely used by real networks), one /24 per node ("slot"), override
with ``MB_TESTBED_NET``. A slot is refused if any address, route or rule on the
machine overlaps it.

Ownership and stale state: each live Node holds an flock on
``/run/metabridge-testbed/slot-<N>.lock`` and records its id next to it. The
lock dies with the process, so `cleanup_stale()` (run at session start) removes
exactly the ``mb*`` namespaces, links, ``MB*`` nat chains and policy rules that
no live process owns, also when several test runs share the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

STATE_DIR = Path(os.environ.get("MB_TESTBED_STATE", "/run/metabridge-testbed"))
DEFAULT_NET = "198.18.0.0/15"
RULE_PREF = 5207
TABLE_BASE = 52000
GATEWAY = "169.254.1.1"
METADATA_IP = "169.254.169.254"

_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_RE = r"[a-z0-9]{4}"
_NETNS_RE = re.compile(rf"^mb({_ID_RE})p\d+$")
_LINK_RE = re.compile(rf"^mb({_ID_RE})(?:h|v\d+)$")
_CHAIN_RE = re.compile(r"^MB([A-Z0-9]{4})$")


class TestbedError(RuntimeError):
    """The machine cannot host a node (not root, no netns, a clash, ...)."""


# ---------------------------------------------------------------- commands --


def sh(argv: Sequence[str], *, check: bool = True, timeout: float = 30,
       input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture its output; on failure raise with stderr shown."""
    proc = subprocess.run(list(argv), capture_output=True, text=True,
                          timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise TestbedError(f"`{shlex.join(argv)}` exited {proc.returncode}: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(["ip", *args], check=check)


def ip_json(*args: str) -> list:
    out = sh(["ip", "-json", *args]).stdout.strip()
    return json.loads(out) if out else []


def iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(["iptables", "-w", "5", *args], check=check)


def nat_rules(chain: str | None = None) -> list[str]:
    """`iptables -t nat -S [chain]` lines ('-A PREROUTING -j MBXXXX', ...)."""
    args = ["-t", "nat", "-S"] + ([chain] if chain else [])
    proc = iptables(*args, check=chain is None)
    if proc.returncode != 0:
        return []
    return [line for line in proc.stdout.splitlines() if line.strip()]


def nat_chains() -> set[str]:
    return {line.split()[1] for line in nat_rules() if line.startswith("-N ")}


def nat_save() -> str:
    return sh(["iptables-save", "-t", "nat"]).stdout


def check_environment() -> None:
    """Raise TestbedError (with the reason) unless we can build nodes here."""
    if os.geteuid() != 0:
        raise TestbedError("not root: network namespaces and iptables need root")
    for tool in ("ip", "iptables", "iptables-save"):
        if sh(["sh", "-c", f"command -v {tool}"], check=False).returncode != 0:
            raise TestbedError(f"`{tool}` is not installed")
    probe = "mbprobe" + "".join(random.choices(_ID_ALPHABET, k=6))
    try:
        ip("netns", "add", probe)
    except (TestbedError, OSError) as e:
        raise TestbedError(f"cannot create a network namespace: {e}") from e
    try:
        ip("netns", "del", probe)
    except TestbedError:
        pass
    try:
        iptables("-t", "nat", "-S", "PREROUTING")
    except (TestbedError, OSError) as e:
        raise TestbedError(f"cannot read the nat table: {e}") from e


# ------------------------------------------------------------------ locks --


def _state_dir() -> Path:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    return STATE_DIR


@contextlib.contextmanager
def _global_lock():
    fd = os.open(_state_dir() / "global.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on path, or None if someone holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _testbed_net() -> ipaddress.IPv4Network:
    net = ipaddress.ip_network(os.environ.get("MB_TESTBED_NET", DEFAULT_NET))
    if net.version != 4 or net.prefixlen > 24:
        raise TestbedError(f"MB_TESTBED_NET={net} must be an IPv4 /24 or larger")
    return net


def _slot_subnet(slot: int) -> ipaddress.IPv4Network:
    return list(_testbed_net().subnets(new_prefix=24))[slot]


def _slot_count() -> int:
    return 2 ** (24 - _testbed_net().prefixlen)


def _clash(subnet: ipaddress.IPv4Network, table: int) -> str | None:
    """What on this machine already uses subnet or table, or None."""
    for link in ip_json("-4", "addr", "show"):
        for a in link.get("addr_info", []):
            iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            if iface.network.overlaps(subnet):
                return f"address {iface} on {link['ifname']}"
    for r in ip_json("-4", "route", "show", "table", "all"):
        dst = r.get("dst", "")
        if dst in ("default", "") or r.get("type") in ("broadcast",):
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.overlaps(subnet) or str(r.get("table", "")) == str(table):
            return f"route {dst} (table {r.get('table', 'main')})"
    for rule in ip_json("-4", "rule", "show"):
        if str(rule.get("table", "")) == str(table):
            return f"ip rule {rule}"
        src = rule.get("src")
        if src and src != "all":
            net = ipaddress.ip_network(f"{src}/{rule.get('srclen', 32)}", strict=False)
            if net.overlaps(subnet):
                return f"ip rule from {net}"
    return None


# ---------------------------------------------------------- stale cleanup --


def _delete_chain(chain: str) -> None:
    for chain_name in ("PREROUTING", "OUTPUT"):
        for line in nat_rules(chain_name):
            toks = line.split()
            if "-j" in toks and toks[toks.index("-j") + 1] == chain:
                iptables("-t", "nat", *(["-D"] + toks[1:]), check=False)
    iptables("-t", "nat", "-F", chain, check=False)
    iptables("-t", "nat", "-X", chain, check=False)


def _delete_decoys(node_id: str) -> None:
    tag = f"mb{node_id}-decoy"
    for line in nat_rules("PREROUTING"):
        if tag in line:
            iptables("-t", "nat", *(["-D"] + line.split()[1:]), check=False)


def _remove_slot_network(slot: int) -> None:
    table = TABLE_BASE + slot
    while ip("-4", "rule", "del", "pref", str(RULE_PREF), "table", str(table),
             check=False).returncode == 0:
        pass
    ip("-4", "route", "flush", "table", str(table), check=False)


def _kill_netns_pids(ns: str) -> None:
    proc = ip("netns", "pids", ns, check=False)
    for pid in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def cleanup_stale() -> list[str]:
    """Remove leftovers of test runs that died; return what was removed."""
    removed: list[str] = []
    with _global_lock():
        live_ids: set[str] = set()
        live_slots: set[int] = set()
        for lock in sorted(_state_dir().glob("slot-*.lock")):
            slot = int(lock.stem.split("-")[1])
            meta = lock.with_suffix(".json")
            fd = _try_lock(lock)
            info = {}
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(meta.read_text())
            if fd is None:
                live_slots.add(slot)
                if info.get("id"):
                    live_ids.add(info["id"])
                continue
            try:
                _remove_slot_network(slot)
                if info:
                    removed.append(f"slot {slot} ({info.get('id', '?')})")
                meta.unlink(missing_ok=True)
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)

        for ns in _netns_names():
            m = _NETNS_RE.match(ns)
            if m and m.group(1) not in live_ids:
                _kill_netns_pids(ns)
                ip("netns", "del", ns, check=False)
                removed.append(f"netns {ns}")
        for link in ip_json("link", "show"):
            name = link.get("ifname", "")
            m = _LINK_RE.match(name)
            if m and m.group(1) not in live_ids:
                ip("link", "del", name, check=False)
                removed.append(f"link {name}")
        for home in sorted((_state_dir() / "home").glob("mb*")):
            m = _NETNS_RE.match(home.name)
            if m and m.group(1) not in live_ids:
                shutil.rmtree(home, ignore_errors=True)
                removed.append(f"home {home}")
        for chain in nat_chains():
            m = _CHAIN_RE.match(chain)
            if m and m.group(1).lower() not in live_ids:
                _delete_chain(chain)
                removed.append(f"chain {chain}")
        for line in nat_rules("PREROUTING"):
            m = re.search(rf"mb({_ID_RE})-decoy", line)
            if m and m.group(1) not in live_ids:
                _delete_decoys(m.group(1))
                removed.append(f"decoy rule {m.group(0)}")
        for rule in ip_json("-4", "rule", "show"):
            try:
                slot = int(rule.get("table", "")) - TABLE_BASE
            except ValueError:
                continue
            if rule.get("priority") == RULE_PREF and 0 <= slot < 4096 \
                    and slot not in live_slots:
                _remove_slot_network(slot)
                removed.append(f"ip rule table {TABLE_BASE + slot}")
    return removed


def _netns_names() -> list[str]:
    return [n.get("name") for n in ip_json("netns", "list") if n.get("name")]


# -------------------------------------------------------------- the node --


class Pod:
    """A pod: a network namespace with eth0 = `ip`/32 behind a veth pair."""

    def __init__(self, node: "Node", index: int, name: str, ip: str):
        self.node = node
        self.index = index
        self.name = name
        self.ip = ip
        self.netns = f"mb{node.id}p{index}"
        self.host_if = f"mb{node.id}v{index}"
        # An empty HOME of its own: no ~/.aws or ~/.config/gcloud of the
        # machine leaks into SDKs run in the pod.
        self.home = _state_dir() / "home" / self.netns
        self.deleted = False

    def __repr__(self) -> str:
        return f"Pod({self.name!r}, ip={self.ip}, netns={self.netns})"

    def env(self, **extra: str) -> dict:
        """The clean environment commands in the pod get: PATH, HOME, LANG + extra."""
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "HOME": str(self.home), "LANG": "C.UTF-8"}
        env.update(extra)
        return env

    def _create(self) -> None:
        n = self.node
        self.home.mkdir(parents=True, exist_ok=True)
        ip("netns", "add", self.netns)
        ip("link", "add", self.host_if, "type", "veth",
           "peer", "name", "eth0", "netns", self.netns)
        Path(f"/proc/sys/net/ipv4/conf/{self.host_if}/forwarding").write_text("1\n")
        ip("link", "set", self.host_if, "up")
        mac = Path(f"/sys/class/net/{self.host_if}/address").read_text().strip()
        nsip = ["-n", self.netns]
        ip(*nsip, "link", "set", "lo", "up")
        ip(*nsip, "addr", "add", f"{self.ip}/32", "dev", "eth0")
        ip(*nsip, "link", "set", "eth0", "up")
        ip(*nsip, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
        ip(*nsip, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        ip(*nsip, "neigh", "replace", GATEWAY, "lladdr", mac, "dev", "eth0",
           "nud", "permanent")
        ip("route", "replace", f"{self.ip}/32", "dev", self.host_if, "scope", "link")
        del n

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], *, env: dict | None = None,
            timeout: float = 30, check: bool = False, text: bool = True,
            input=None) -> subprocess.CompletedProcess:
        """Run argv inside the pod (ip netns exec); capture output.

        env=None runs with `self.env()` (clean); a dict is used as is (build
        it with `pod.env(AWS_REGION=...)`)."""
        if self.deleted:
            raise TestbedError(f"{self} was deleted")
        return subprocess.run(self.exec_argv(argv), capture_output=True,
                              text=text, timeout=timeout,
                              env=self.env() if env is None else env,
                              check=check, input=input, cwd=self.home)

    def python(self, code: str, *, env: dict | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
        """Run Python code (this interpreter, so the pinned SDKs) in the pod."""
        return self.run([sys.executable, "-c", code], env=env, timeout=timeout)

    def popen(self, argv: Sequence[str], *, env: dict | None = None,
              **kw) -> subprocess.Popen:
        """Start argv inside the pod; the caller waits (delete() kills leftovers)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("cwd", self.home)
        return subprocess.Popen(self.exec_argv(argv),
                                env=self.env() if env is None else env, **kw)

    def http_get(self, url: str, *, headers: dict | None = None,
                 timeout: float = 5, method: str = "GET") -> "HttpResult":
        return http_get(self.exec_argv, url, headers=headers, timeout=timeout,
                        method=method, env=self.env())

    def delete(self) -> None:
        """Delete the namespace (killing what still runs in it) and the veth."""
        if self.deleted:
            return
        self.deleted = True
        _kill_netns_pids(self.netns)
        ip("link", "del", self.host_if, check=False)
        ip("route", "del", f"{self.ip}/32", "dev", self.host_if, check=False)
        ip("netns", "del", self.netns, check=False)
        shutil.rmtree(self.home, ignore_errors=True)
        self.node._forget(self)


class HostCaller:
    """A hostNetwork pod: a process in the root namespace, source = node IP."""

    def __init__(self, node: "Node"):
        self.node = node
        self.ip = node.host_ip
        self.name = "hostnetwork"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def run(self, argv: Sequence[str], *, env: dict | None = None,
            timeout: float = 30, check: bool = False, text: bool = True,
            input=None) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=text,
                              timeout=timeout, env=env, check=check, input=input)

    def http_get(self, url: str, *, headers: dict | None = None,
                 timeout: float = 5, method: str = "GET") -> "HttpResult":
        # --interface binds the source address: the node IP, never 127.0.0.1
        # and never the machine's uplink address.
        return http_get(self.exec_argv, url, headers=headers, timeout=timeout,
                        method=method, source=self.ip)


class HttpResult:
    """What curl saw: status (None if no HTTP answer), headers, body, error."""

    def __init__(self, status: int | None, headers: dict[str, str], body: bytes,
                 error: str | None, curl_exit: int, elapsed: float):
        self.status = status
        self.headers = headers
        self.body = body
        self.error = error
        self.curl_exit = curl_exit
        self.elapsed = elapsed

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return (f"HttpResult(status={self.status}, error={self.error!r}, "
                f"elapsed={self.elapsed:.3f}s, body={self.body[:300]!r})")


_MARK = "\n__MB_CURL_STATUS__:"


def http_get(exec_argv, url: str, *, headers: dict | None = None,
             timeout: float = 5, method: str = "GET",
             source: str | None = None, env: dict | None = None) -> HttpResult:
    argv = ["curl", "-sS", "-X", method, "-m", f"{timeout:g}", "-D", "-",
            "-w", _MARK + "%{http_code}", "--noproxy", "*"]
    if source:
        argv += ["--interface", source]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    start = time.monotonic()
    proc = subprocess.run(exec_argv(argv), capture_output=True,
                          timeout=timeout + 10, env=env)
    elapsed = time.monotonic() - start
    out = proc.stdout
    raw, _, code = out.rpartition(_MARK.encode())
    status = int(code) if code.strip().isdigit() and int(code) else None
    headers_out: dict[str, str] = {}
    body = b""
    if status is not None:
        head, _, body = raw.partition(b"\r\n\r\n")
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers_out[k.strip().lower()] = v.strip()
    error = proc.stderr.decode("utf-8", "replace").strip() or None
    return HttpResult(status, headers_out, body, error, proc.returncode, elapsed)


class Node:
    """One simulated node; see the module docstring. Use as a context manager
    or call close(); close() removes everything, also after partial setup."""

    def __init__(self) -> None:
        self.id = ""
        self.slot = -1
        self._lock_fd: int | None = None
        self.pods: dict[str, Pod] = {}
        self._next_index = 0
        self._next_host = 10
        self.closed = False
        try:
            self._claim()
            self._create()
        except BaseException:
            self.close()
            raise

    # -- identity ------------------------------------------------------------
    @property
    def name(self) -> str:
        """The Kubernetes node name this box plays."""
        return f"node-mb{self.id}"

    @property
    def interface_pattern(self) -> str:
        return f"mb{self.id}v+"

    @property
    def chain(self) -> str:
        return f"MB{self.id.upper()}"

    @property
    def host_dev(self) -> str:
        return f"mb{self.id}h"

    def __repr__(self) -> str:
        return f"Node(id={self.id}, host_ip={getattr(self, 'host_ip', '?')})"

    # -- setup ---------------------------------------------------------------
    def _claim(self) -> None:
        with _global_lock():
            slots = list(range(_slot_count()))
            random.shuffle(slots)
            clashes = []
            for slot in slots[:64]:
                subnet = _slot_subnet(slot)
                fd = _try_lock(_state_dir() / f"slot-{slot}.lock")
                if fd is None:
                    continue
                why = _clash(subnet, TABLE_BASE + slot)
                if why:
                    clashes.append(f"{subnet}: {why}")
                    os.close(fd)
                    continue
                taken = {m.group(1) for m in map(_NETNS_RE.match, _netns_names()) if m}
                while True:
                    node_id = "".join(random.choices(_ID_ALPHABET, k=4))
                    if node_id not in taken and not node_id.isdigit():
                        break
                self.id, self.slot, self._lock_fd = node_id, slot, fd
                self.subnet = subnet
                self.table = TABLE_BASE + slot
                self.host_ip = str(subnet.network_address + 1)
                (_state_dir() / f"slot-{slot}.json").write_text(json.dumps(
                    {"id": node_id, "slot": slot, "pid": os.getpid(),
                     "subnet": str(subnet), "created": time.time()}))
                return
            raise TestbedError("no free /24 in the testbed range "
                               f"{_testbed_net()} (set MB_TESTBED_NET); "
                               f"clashes: {clashes[:5]}")

    def _create(self) -> None:
        dev = self.host_dev
        if ip("link", "add", dev, "type", "dummy", check=False).returncode != 0:
            # No dummy driver (e.g. a VM kernel without modules): an empty
            # bridge holds a local address just as well.
            ip("link", "add", dev, "type", "bridge")
        ip("addr", "add", f"{self.host_ip}/32", "dev", dev)
        ip("link", "set", dev, "up")
        ip("route", "add", "throw", str(self.subnet), "table", str(self.table))
        ip("route", "add", "unreachable", "default", "table", str(self.table))
        ip("rule", "add", "from", str(self.subnet), "lookup", str(self.table),
           "pref", str(RULE_PREF))

    # -- pods ----------------------------------------------------------------
    def allocate_ip(self) -> str:
        used = {p.ip for p in self.pods.values()}
        while True:
            if self._next_host > 254:
                self._next_host = 10
            candidate = str(self.subnet.network_address + self._next_host)
            self._next_host += 1
            if candidate not in used:
                return candidate

    def add_pod(self, name: str | None = None, ip: str | None = None) -> Pod:
        """Create pod netns; ip=None allocates one, ip=<old pod's ip> reuses it
        (the old pod must be deleted first)."""
        if self.closed:
            raise TestbedError("node closed")
        index = self._next_index
        self._next_index += 1
        name = name or f"pod{index}"
        if name in self.pods:
            raise TestbedError(f"pod {name} exists on {self}")
        if ip is None:
            ip = self.allocate_ip()
        else:
            if ipaddress.ip_address(ip) not in self.subnet or ip == self.host_ip:
                raise TestbedError(f"{ip} is not a pod address of {self.subnet}")
            for p in self.pods.values():
                if p.ip == ip:
                    raise TestbedError(f"{ip} is still used by {p}")
        pod = Pod(self, index, name, ip)
        self.pods[name] = pod
        try:
            pod._create()
        except BaseException:
            pod.delete()
            raise
        return pod

    def add_cloud_metadata_pod(self, name: str = "cloud-metadata") -> Pod:
        """A netns holding 169.254.169.254 that this node's pods reach by
        plain routing: the cloud's own metadata server, as pods meet it
        wherever metabridge's rules are missing. Only this node's pods route
        to it (a route in the node's table); the root namespace never gets
        the address. Whatever serves it runs in the returned pod."""
        cloud = self.add_pod(name)
        nsip = ["-n", cloud.netns]
        ip(*nsip, "addr", "add", f"{METADATA_IP}/32", "dev", "eth0")
        mac = ip(*nsip, "-j", "link", "show", "eth0").stdout
        mac = json.loads(mac)[0]["address"]
        ip("neigh", "replace", METADATA_IP, "lladdr", mac, "dev", cloud.host_if,
           "nud", "permanent")
        # In the node's table: gone with the veth when the pod is deleted.
        ip("route", "replace", f"{METADATA_IP}/32", "dev", cloud.host_if,
           "scope", "link", "table", str(self.table))
        return cloud

    def remove_pod(self, pod: Pod | str) -> None:
        if isinstance(pod, str):
            pod = self.pods[pod]
        pod.delete()

    def _forget(self, pod: Pod) -> None:
        if self.pods.get(pod.name) is pod:
            del self.pods[pod.name]

    def host_caller(self) -> HostCaller:
        return HostCaller(self)

    def insert_decoy_prerouting_rule(self) -> str:
        """Put a no-op rule at the top of nat PREROUTING (as kube-proxy would
        have rules there); returns its comment tag. Removed by close()."""
        tag = f"mb{self.id}-decoy"
        iptables("-t", "nat", "-I", "PREROUTING", "1", "-m", "comment",
                 "--comment", tag)
        return tag

    # -- teardown ------------------------------------------------------------
    def close(self) -> None:
        """Remove every pod, the node address, the policy rule, the chain."""
        if self.closed:
            return
        self.closed = True
        errors = []
        for pod in list(self.pods.values()):
            try:
                pod.delete()
            except Exception as e:  # keep going, report at the end
                errors.append(e)
        if self.id:
            for ns in _netns_names():
                if ns.startswith(f"mb{self.id}p"):
                    _kill_netns_pids(ns)
                    ip("netns", "del", ns, check=False)
            for home in (_state_dir() / "home").glob(f"mb{self.id}p*"):
                shutil.rmtree(home, ignore_errors=True)
            for link in ip_json("link", "show"):
                if _LINK_RE.match(link.get("ifname", "")) and \
                        link["ifname"].startswith(f"mb{self.id}"):
                    ip("link", "del", link["ifname"], check=False)
            _delete_decoys(self.id)
            if self.chain in nat_chains():
                _delete_chain(self.chain)
        if self.slot >= 0:
            _remove_slot_network(self.slot)
        if self._lock_fd is not None:
            with _global_lock():  # claims happen under it: safe to unlink
                (_state_dir() / f"slot-{self.slot}.json").unlink(missing_ok=True)
                (_state_dir() / f"slot-{self.slot}.lock").unlink(missing_ok=True)
                os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise TestbedError(f"errors while closing {self}: {errors}")

    def leftovers(self) -> list[str]:
        """Anything of this node still on the machine (for teardown checks)."""
        found = [f"netns {n}" for n in _netns_names() if n.startswith(f"mb{self.id}p")]
        found += [f"link {link['ifname']}" for link in ip_json("link", "show")
                  if link.get("ifname", "").startswith(f"mb{self.id}")]
        found += [f"chain {c}" for c in nat_chains() if c == self.chain]
        found += [f"home {h}" for h in (_state_dir() / "home").glob(f"mb{self.id}p*")]
        found += [f"rule table {r.get('table')}" for r in ip_json("-4", "rule", "show")
                  if str(r.get("table")) == str(getattr(self, "table", ""))]
        return found

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for(predicate, timeout: float, interval: float = 0.05,
             message: str = "condition"):
    """Poll predicate() until truthy; return its value or raise AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def prerouting_jumps() -> list[str]:
    """Targets of nat PREROUTING rules, in order ('' for rules with no -j)."""
    out = []
    for line in nat_rules("PREROUTING"):
        if not line.startswith("-A "):
            continue
        toks = line.split()
        out.append(toks[toks.index("-j") + 1] if "-j" in toks else "")
    return out


def parse_rule(line: str) -> dict[str, str]:
    """'-A C -d X -i Y -p tcp -m tcp --dport 80 -j DNAT --to-destination Z'
    → {'-A': 'C', '-d': 'X', ...} (module options kept by name)."""
    toks = shlex.split(line)
    out: dict[str, str] = {}
    i = 0
    while i < len(toks):
        key = toks[i]
        if key.startswith("-") and i + 1 < len(toks) and not toks[i + 1].startswith("-"):
            out[key] = toks[i + 1]
            i += 2
        else:
            out[key] = ""
            i += 1
    return out


__all__: Iterable[str] = (
    "Node", "Pod", "HostCaller", "HttpResult", "TestbedError", "check_environment",
    "cleanup_stale", "nat_rules", "nat_chains", "nat_save", "prerouting_jumps",
    "parse_rule", "wait_for", "http_get", "METADATA_IP",
)
