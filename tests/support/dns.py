"""Pod DNS in the testbed, the way a cluster gives it to pods.

Google's client libraries reach the metadata server by name,
``metadata.google.internal`` (Python's token fetch, Java, gcloud; Go races the
name against the IP). On GKE the name resolves already; on EKS the chart makes
CoreDNS answer it (``charts/metabridge/templates/coredns-configmap.yaml``: a
``metadata.google.internal:53 { hosts { 169.254.169.254 metadata.google.internal } }``
server block beside the cluster's own ``.:53`` block), or a pod lists it in
``spec.hostAliases``. This module plays both, faithfully enough that an
unmodified resolver (glibc's, Go's) in a pod namespace behaves as in a pod:

* `ClusterDns` — the cluster DNS service (CoreDNS) on the node address,
  UDP and TCP port 53. Its answers follow the Corefile the chart renders:

  - the chart's zone (``metadata.google.internal.``, records parsed from the
    chart template by `chart_hosts()`): ``A`` of a listed name → its address
    (authoritative, the chart's TTL); another type of a listed name → NOERROR
    without answers (NODATA, as the ``hosts`` plugin does); any other name in
    the zone → NXDOMAIN (``hosts`` without ``fallthrough``);
  - ``cluster.local.`` and the reverse zones (the ``kubernetes`` plugin; the
    testbed has no Services) → NXDOMAIN;
  - everything else (``forward . /etc/resolv.conf``: the testbed has no
    upstream, and an upstream would not know a name we made up) → NXDOMAIN;
  - anything but a standard query of one IN question → NOTIMP / FORMERR /
    REFUSED.

  ``ClusterDns(host_ip, hosts={})`` is a stock cluster (the chart's CoreDNS
  block not installed). ``queries`` records every question asked;
  ``configure_pod(pod)`` points a pod at the server (files below), undone by
  ``stop()``.

* `PodDnsFiles` — a pod's ``/etc/resolv.conf`` and ``/etc/hosts`` as kubelet
  writes them (``dnsPolicy: ClusterFirst``: ``search <ns>.svc.cluster.local
  svc.cluster.local cluster.local``, ``options ndots:5``; the managed hosts file
  with ``spec.hostAliases`` appended). They live in ``/etc/netns/<netns>/``,
  which ``ip netns exec`` (hence `Pod.run`, `Pod.python`, `Pod.http_get`)
  bind-mounts over ``/etc/``. Where this machine's ``/etc/nsswitch.conf`` would
  send host lookups elsewhere (``resolve``, ``mdns``…), a copy with
  ``hosts: files dns`` — a container image's — is placed there too.
  ``remove()`` deletes all of it (and ``/etc/netns`` when it is left empty);
  `cleanup_stale()` removes what crashed runs left for namespaces that no
  longer exist.

Never derived from matheuscscp/gke-metadata-server (AGPL).
"""

from __future__ import annotations

import errno
import ipaddress
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "metabridge"
ETC_NETNS = Path("/etc/netns")
CLUSTER_DOMAIN = "cluster.local"

# RR types / classes / rcodes we name.
A, NS, CNAME, SOA, PTR, AAAA, OPT, ANY = 1, 2, 5, 6, 12, 28, 41, 255
IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 28: "AAAA", 33: "SRV",
              41: "OPT", 65: "HTTPS", 255: "ANY"}

_NETNS_DIR_RE = re.compile(r"^mb[a-z0-9]{4}p\d+$")


# ------------------------------------------------------------ the chart --


def chart_hosts() -> tuple[dict[str, dict[str, str]], int]:
    """({zone: {name: ipv4}}, ttl) of the CoreDNS block the chart renders.

    Read from ``templates/coredns-configmap.yaml`` (the ``NAME:53 {`` server
    blocks other than ``.`` and the address lines of their ``hosts {}``) and
    the ``dns.coreDNS.ttl`` default of ``values.yaml``, so the testbed follows
    the chart rather than a copy of it. Raises when the template no longer has
    that shape (then this emulation must be revisited)."""
    template = (CHART / "templates" / "coredns-configmap.yaml").read_text()
    zones: dict[str, dict[str, str]] = {}
    heads = list(re.finditer(r"^\s*([A-Za-z0-9][A-Za-z0-9.-]*?)\.?:53\s*\{", template, re.M))
    for i, m in enumerate(heads):
        zone = _fqdn(m.group(1))
        block = template[m.end():heads[i + 1].start() if i + 1 < len(heads) else len(template)]
        hosts = re.search(r"hosts\s*\{(.*?)\}", block, re.S)
        if not hosts:
            continue
        records: dict[str, str] = {}
        for line in hosts.group(1).splitlines():
            fields = line.split()
            if len(fields) >= 2 and _is_ipv4(fields[0]):
                for name in fields[1:]:
                    records[_fqdn(name)] = fields[0]
        zones[zone] = records
    if not zones or not any(zones.values()):
        raise RuntimeError(f"no `NAME:53 {{ hosts {{ … }} }}` block found in {template!r:.200}")
    ttl = 60
    values = (CHART / "values.yaml").read_text()
    m = re.search(r"^dns:\s*\n(?:[ \t].*\n)*?[ \t]+coreDNS:\s*\n(?:[ \t].*\n)*?[ \t]+ttl:\s*(\d+)",
                  values, re.M)
    if m:
        ttl = int(m.group(1))
    return zones, ttl


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def _fqdn(name: str) -> str:
    return name.lower().rstrip(".") + "."


# ------------------------------------------------------------ wire format --


class _FormErr(Exception):
    pass


def _read_name(msg: bytes, pos: int) -> tuple[str, int]:
    """(name as 'a.b.' with the query's case, position after it)."""
    labels: list[str] = []
    end = None
    hops = 0
    while True:
        if pos >= len(msg):
            raise _FormErr("name runs past the message")
        n = msg[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(msg) or hops > 16:
                raise _FormErr("bad compression pointer")
            if end is None:
                end = pos + 2
            pos = ((n & 0x3F) << 8) | msg[pos + 1]
            hops += 1
            continue
        if n & 0xC0:
            raise _FormErr("bad label type")
        pos += 1
        if n == 0:
            break
        if pos + n > len(msg):
            raise _FormErr("label runs past the message")
        labels.append(msg[pos:pos + n].decode("latin-1"))
        pos += n
    return ".".join(labels) + ".", (end if end is not None else pos)


def _encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode("latin-1")
            out += bytes([len(raw)]) + raw
    return bytes(out + b"\x00")


def build_query(name: str, qtype: int = A, *, ident: int = 0x1234, rd: bool = True) -> bytes:
    """A standard query (for tests of this module and for `query`)."""
    flags = 0x0100 if rd else 0
    return struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 0) + _encode_name(name) + \
        struct.pack("!HH", qtype, IN)


def parse_response(msg: bytes) -> dict:
    """{"id","rcode","aa","answers": [(name, type, ttl, rdata-text)]} of a reply."""
    ident, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", msg[:12])
    pos = 12
    for _ in range(qd):
        _, pos = _read_name(msg, pos)
        pos += 4
    answers = []
    for _ in range(an):
        name, pos = _read_name(msg, pos)
        rtype, _cls, ttl, rdlen = struct.unpack("!HHIH", msg[pos:pos + 10])
        pos += 10
        rdata = msg[pos:pos + rdlen]
        pos += rdlen
        text = socket.inet_ntoa(rdata) if rtype == A and rdlen == 4 else rdata.hex()
        answers.append((name, rtype, ttl, text))
    return {"id": ident, "rcode": flags & 0xF, "aa": bool(flags & 0x0400),
            "qr": bool(flags & 0x8000), "answers": answers}


def query(server: str, name: str, qtype: int = A, *, port: int = 53,
          timeout: float = 2.0) -> dict:
    """One UDP query from this (root) namespace; `parse_response` of the answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(build_query(name, qtype), (server, port))
        return parse_response(s.recv(4096))


# ------------------------------------------------------------ the server --


class ClusterDns:
    """The cluster DNS service as the chart configures CoreDNS. See the module
    docstring. ``hosts=None``: the chart's block (`chart_hosts`); ``{}``: none."""

    def __init__(self, address: str, *, port: int = 53,
                 hosts: dict[str, dict[str, str]] | None = None, ttl: int | None = None,
                 cluster_domain: str = CLUSTER_DOMAIN):
        if hosts is None:
            hosts, chart_ttl = chart_hosts()
            ttl = chart_ttl if ttl is None else ttl
        self.address = address
        self.port = port
        self.zones = {_fqdn(zone): {_fqdn(n): ip for n, ip in records.items()}
                      for zone, records in hosts.items()}
        self.ttl = 60 if ttl is None else int(ttl)
        self.cluster_domain = _fqdn(cluster_domain)
        self.queries: list[dict] = []
        self.pod_files: list[PodDnsFiles] = []
        self._lock = threading.Lock()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------
    def start(self) -> "ClusterDns":
        try:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp.bind((self.address, self.port))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.address, self.port))
            tcp.listen(16)
        except OSError as e:
            for s in (locals().get("udp"), locals().get("tcp")):
                if s is not None:
                    s.close()
            hint = " (another DNS server holds port 53 on every address?)" \
                if e.errno == errno.EADDRINUSE else ""
            raise RuntimeError(f"cluster DNS cannot listen on {self.address}:{self.port}: "
                               f"{e}{hint}") from e
        udp.settimeout(0.2)
        tcp.settimeout(0.2)
        self._udp, self._tcp = udp, tcp
        for target, name in ((self._serve_udp, "udp"), (self._serve_tcp, "tcp")):
            t = threading.Thread(target=target, name=f"cluster-dns-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    @property
    def url(self) -> str:
        return f"dns://{self.address}:{self.port}"

    def configure_pod(self, pod, *, resolv: bool = True,
                      host_aliases: Iterable[tuple[str, Iterable[str]]] = ()) -> "PodDnsFiles":
        """Give pod a kubelet-style resolv.conf naming this server (unless
        resolv=False) and /etc/hosts (with host_aliases); removed by stop()."""
        if self.port != 53:
            raise ValueError("resolv.conf cannot name a port: the server must listen on 53")
        files = PodDnsFiles(pod, nameserver=self.address if resolv else None,
                            host_aliases=host_aliases)
        self.pod_files.append(files)
        return files.write()

    def stop(self) -> None:
        """Stop answering and remove the files of every configured pod."""
        for files in self.pod_files:
            files.remove()
        self.pod_files.clear()
        self._stopping.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        self._udp = self._tcp = None

    def __enter__(self) -> "ClusterDns":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection ------------------------------------------------------
    def questions(self, name: str | None = None) -> list[dict]:
        """Recorded questions (optionally of one name, any case, with or without the dot)."""
        with self._lock:
            qs = list(self.queries)
        if name is None:
            return qs
        want = _fqdn(name)
        return [q for q in qs if _fqdn(q["name"]) == want]

    # -- answering -------------------------------------------------------
    def _serve_udp(self) -> None:
        assert self._udp is not None
        while not self._stopping.is_set():
            try:
                data, peer = self._udp.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            reply = self.answer(data, peer[0], "udp")
            if reply is not None:
                if len(reply) > 512:  # no EDNS from us: truncate, the client retries on TCP
                    reply = reply[:2] + bytes([reply[2] | 0x02, reply[3]]) + reply[4:12]
                try:
                    self._udp.sendto(reply, peer)
                except OSError:
                    pass

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn, peer[0]), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket, peer: str) -> None:
        conn.settimeout(5)
        with conn:
            try:
                while True:
                    head = _recv_exact(conn, 2)
                    if head is None:
                        return
                    data = _recv_exact(conn, struct.unpack("!H", head)[0])
                    if data is None:
                        return
                    reply = self.answer(data, peer, "tcp")
                    if reply is None:
                        return
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return

    def resolve(self, name: str, qtype: int) -> tuple[int, list[tuple[int, bytes]], bool]:
        """(rcode, [(type, rdata)], authoritative) for one question."""
        fq = _fqdn(name)
        zone = self._zone_of(fq)
        if zone is not None:
            records = self.zones[zone]
            if fq not in records:
                return NXDOMAIN, [], True
            if qtype in (A, ANY):
                return NOERROR, [(A, socket.inet_aton(records[fq]))], True
            return NOERROR, [], True  # NODATA
        # The stock `.:53` block: `kubernetes cluster.local in-addr.arpa
        # ip6.arpa` (no Services here) then `forward` (no upstream knows it).
        return NXDOMAIN, [], fq.endswith("." + self.cluster_domain) or fq == self.cluster_domain

    def _zone_of(self, fq: str) -> str | None:
        best = None
        for zone in self.zones:
            if fq == zone or fq.endswith("." + zone):
                if best is None or len(zone) > len(best):
                    best = zone
        return best

    def answer(self, data: bytes, peer: str, proto: str) -> bytes | None:
        """The reply to one message (None: not even a header to answer)."""
        if len(data) < 12:
            return None
        ident, flags, qdcount = struct.unpack("!HHH", data[:6])
        if flags & 0x8000:  # a response: never answer those
            return None
        opcode = (flags >> 11) & 0xF
        rd = flags & 0x0100
        reply_flags = 0x8000 | (opcode << 11) | rd | 0x0080  # QR, RA
        if opcode != 0:
            return struct.pack("!HHHHHH", ident, reply_flags | NOTIMP, 0, 0, 0, 0)
        try:
            if qdcount != 1:
                raise _FormErr("one question expected")
            qname, pos = _read_name(data, 12)
            if pos + 4 > len(data):
                raise _FormErr("truncated question")
            qtype, qclass = struct.unpack("!HH", data[pos:pos + 4])
            question = data[12:pos + 4]
        except _FormErr:
            return struct.pack("!HHHHHH", ident, reply_flags | FORMERR, 0, 0, 0, 0)
        if qclass != IN:
            rcode, answers, aa = REFUSED, [], False
        else:
            rcode, answers, aa = self.resolve(qname, qtype)
        with self._lock:
            self.queries.append({"name": qname, "type": TYPE_NAMES.get(qtype, str(qtype)),
                                 "rcode": RCODE_NAMES[rcode], "client": peer, "proto": proto,
                                 "time": time.time()})
        out = bytearray(struct.pack("!HHHHHH", ident, reply_flags | (0x0400 if aa else 0) | rcode,
                                    1, len(answers), 0, 0))
        # The question is echoed as asked (0x20 case randomisation intact).
        out += question
        for rtype, rdata in answers:
            out += struct.pack("!HHHIH", 0xC00C, rtype, IN, self.ttl, len(rdata)) + rdata
        return bytes(out)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------ pod files --


def kubelet_hosts_file(pod_ip: str, hostname: str,
                       host_aliases: Iterable[tuple[str, Iterable[str]]] = ()) -> str:
    """``/etc/hosts`` as kubelet writes it (pkg/kubelet/kubelet_pods.go
    managedHostsFileContent), ``spec.hostAliases`` = [(ip, [hostnames])]."""
    lines = ["# Kubernetes-managed hosts file.",
             "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback",
             "fe00::0\tip6-localnet",
             "fe00::0\tip6-mcastprefix",
             "fe00::1\tip6-allnodes",
             "fe00::2\tip6-allrouters",
             f"{pod_ip}\t{hostname}"]
    aliases = list(host_aliases)
    if aliases:
        lines += ["", "# Entries added by HostAliases."]
        for ip, names in aliases:
            lines.append(f"{ip}\t" + "\t".join(names))
    return "\n".join(lines) + "\n"


def kubelet_resolv_conf(nameserver: str, namespace: str,
                        cluster_domain: str = CLUSTER_DOMAIN) -> str:
    """``/etc/resolv.conf`` of a ``dnsPolicy: ClusterFirst`` pod."""
    cd = cluster_domain.rstrip(".")
    return (f"search {namespace}.svc.{cd} svc.{cd} {cd}\n"
            f"nameserver {nameserver}\n"
            "options ndots:5\n")


def _container_nsswitch() -> str | None:
    """A copy of this machine's nsswitch.conf with ``hosts: files dns``, or
    None when it already says that (or there is none to shadow)."""
    try:
        text = Path("/etc/nsswitch.conf").read_text()
    except OSError:
        return None
    m = re.search(r"^hosts:\s*(.*)$", text, re.M)
    if m and m.group(1).split() == ["files", "dns"]:
        return None
    if m:
        return text[:m.start()] + "hosts:          files dns" + text[m.end():]
    return text.rstrip("\n") + "\nhosts:          files dns\n"


class PodDnsFiles:
    """A pod's resolv.conf / hosts (/ nsswitch.conf) in /etc/netns/<netns>/.

    ``nameserver=None`` leaves the machine's resolv.conf (hostAliases only).
    ``host_aliases`` = [(ip, [names])] as in ``spec.hostAliases``."""

    def __init__(self, pod, *, nameserver: str | None,
                 host_aliases: Iterable[tuple[str, Iterable[str]]] = (),
                 namespace: str | None = None, hostname: str | None = None):
        self.pod = pod
        self.dir = ETC_NETNS / pod.netns
        namespace = namespace or getattr(pod, "namespace", None) or "default"
        hostname = hostname or getattr(pod, "kube_name", None) or pod.name
        self.files: dict[str, str] = {"hosts": kubelet_hosts_file(pod.ip, hostname, host_aliases)}
        if nameserver is not None:
            self.files["resolv.conf"] = kubelet_resolv_conf(nameserver, namespace)
        nss = _container_nsswitch()
        if nss is not None:
            self.files["nsswitch.conf"] = nss
        self.written = False

    def write(self) -> "PodDnsFiles":
        for attempt in range(5):
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                for name, text in self.files.items():
                    (self.dir / name).write_text(text)
                break
            except FileNotFoundError:  # /etc/netns removed by a parallel teardown
                if attempt == 4:
                    raise
        self.written = True
        return self

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        _rmdir_if_empty(ETC_NETNS)
        self.written = False

    def __enter__(self) -> "PodDnsFiles":
        return self.write()

    def __exit__(self, *exc) -> None:
        self.remove()


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def cleanup_stale() -> list[str]:
    """Remove /etc/netns/<testbed netns> directories whose namespace is gone."""
    if not ETC_NETNS.is_dir():
        return []
    live = _netns_names()
    removed = []
    for d in sorted(ETC_NETNS.iterdir()):
        if _NETNS_DIR_RE.match(d.name) and d.name not in live:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    _rmdir_if_empty(ETC_NETNS)
    return removed


__all__ = ["ClusterDns", "PodDnsFiles", "chart_hosts", "cleanup_stale", "query",
           "build_query", "parse_response", "kubelet_hosts_file", "kubelet_resolv_conf"]
