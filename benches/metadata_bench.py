#!/usr/bin/env python3
"""metabridge vs nginx serving the same bytes, measured side by side in one run.

    sudo python3 benches/metadata_bench.py [--duration 10 --connections 32 --threads 2]

What it builds (the end-to-end testbed of tests/support, constructed directly):

- a node in a box: one pod network namespace (AWS VPC CNI style), FakeKube
  with the pod and its ServiceAccount, FakeGoogle with a workload identity
  provider trusting the FakeKube issuer and a Google SA granted to the pod's
  Kubernetes SA (with --aws also fake AWS STS and a role trusting it);
- the **release** metabridge (target/release/metabridge, or METABRIDGE_BIN)
  with its iptables rules, the GCE flags, METABRIDGE_LOG=warn, no whoami;
- nginx on the node address serving, at the same paths, the bytes metabridge
  answered (fetched once from the pod), with the same Content-Type,
  Metadata-Flavor and hardening headers, refusing requests without the
  Metadata-Flavor header as metabridge does.

What it measures (wrk runs *inside the pod's network namespace*):

1. throughput and latency under load, per path, for metabridge through
   169.254.169.254 (the DNAT) and nginx on HOST_IP:port, interleaved
   (round 1: A B, round 2: B A, ...) so that the machine's noise lands on
   both; the ratio is the median of the per-round ratios;
2. single-connection latency (wrk -c 1), the same way;
3. the cold path: the first token request of a freshly created pod when
   prefetch had time to run (should be a cache hit), and of a pod of a brand
   new ServiceAccount calling immediately (identification + minting);
4. how many upstream STS calls the whole run caused: exactly one per
   identity, or the bench fails loudly (exit 1).

Fairness: by default the servers are pinned (taskset) to the upper half of
the CPUs and wrk (and this harness, with the fakes) to the lower half; nginx
runs one worker per server CPU, and metabridge's default tokio runtime sizes
itself to its affinity mask (one worker thread per server CPU). See
benches/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support import netns  # noqa: E402
from support.metabridge import Metabridge, free_port  # noqa: E402
from support.testbed import Testbed  # noqa: E402

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"

GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
PROJECT = "bench-project"
PROJECT_NUMBER = "424242424242"
POOL = "bench-pool"
PROVIDER = "kube"
PROVIDER_NAME = (f"projects/{PROJECT_NUMBER}/locations/global/"
                 f"workloadIdentityPools/{POOL}/providers/{PROVIDER}")
NAMESPACE = "bench"
SA = "bench"
AWS_REGION = "us-east-1"
AWS_AUDIENCE = "sts.amazonaws.com"
ROLE_NAME = "bench-role"

FLAVOR = {"Metadata-Flavor": "Google"}
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
EMAIL_PATH = "/computeMetadata/v1/instance/service-accounts/default/email"
PROJECT_PATH = "/computeMetadata/v1/project/project-id"
IMDS_TOKEN_PATH = "/latest/api/token"
IMDS_CREDS_PATH = f"/latest/meta-data/iam/security-credentials/{ROLE_NAME}"
IMDS_TOKEN_HEADER = "X-aws-ec2-metadata-token"

# Headers metabridge's GCE API sends on every answer (src/gce/wire.rs);
# nginx sends the same ones (its Server header is its own).
GCE_HEADERS = {"Metadata-Flavor": "Google", "X-XSS-Protection": "0",
               "X-Frame-Options": "SAMEORIGIN"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchFailure(RuntimeError):
    pass


def subject(namespace: str, sa: str) -> str:
    return f"system:serviceaccount:{namespace}:{sa}"


def principal(namespace: str, sa: str) -> str:
    pool = f"projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/{POOL}"
    return f"principal://iam.googleapis.com/{pool}/subject/{subject(namespace, sa)}"


# ----------------------------------------------------------------- machine --


def machine() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    def version(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "nginx": version(["nginx", "-v"]), "wrk": version(["wrk", "--version"])}


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat (user nice system idle iowait irq softirq steal)."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def steal_share(before: list[int], after: list[int]) -> float:
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    return delta[7] / total if total else 0.0


def proc_cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime (all threads)
        except (OSError, IndexError, ValueError):
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def parse_cpus(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


# -------------------------------------------------------------------- curl --


def curl(pod, url: str, headers: dict | None = None, method: str = "GET",
         timeout: float = 5) -> dict:
    """One request from inside the pod; curl's own timings (no process start)."""
    mark = "\n__MBBENCH__"
    argv = ["curl", "-sS", "-X", method, "-m", f"{timeout:g}", "-D", "-", "--noproxy", "*",
            "-w", mark + "%{http_code} %{time_connect} %{time_starttransfer} %{time_total}"]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    proc = subprocess.run(pod.exec_argv(argv), capture_output=True, timeout=timeout + 10,
                          env=pod.env())
    raw, _, tail = proc.stdout.rpartition(mark.encode())
    code, connect, ttfb, total = tail.decode().split()
    head, _, body = raw.partition(b"\r\n\r\n")
    hdrs = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return {"status": int(code), "headers": hdrs, "body": body, "connect": float(connect),
            "ttfb": float(ttfb), "total": float(total),
            "error": proc.stderr.decode(errors="replace").strip()}


# ------------------------------------------------------------------- nginx --


def nginx_literal(body: bytes) -> str:
    text = body.decode("utf-8")
    if any(c in text for c in "$\\'"):
        raise BenchFailure(f"body not representable as an nginx literal: {text[:80]!r}")
    return "'" + text + "'"


class Nginx:
    def __init__(self, workdir: Path, host_ip: str, workers: int, cpus: str | None):
        self.dir = workdir / "nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_ip = host_ip
        self.port = free_port(host_ip)
        self.workers = workers
        self.cpus = cpus
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host_ip}:{self.port}"

    def write_conf(self, locations: list[dict]) -> Path:
        d = self.dir
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        blocks = []
        for loc in locations:
            lines = [f"    location = {loc['path']} {{"]
            for header, value in loc["require"].items():
                var = "$http_" + header.lower().replace("-", "_")
                lines.append(f'      if ({var} {"!=" if value else "="} "{value}") {{ return 403; }}')
            lines.append(f'      default_type "{loc["content_type"]}";')
            for k, v in loc["headers"].items():
                lines.append(f'      add_header {k} "{v}" always;')
            lines.append(f"      return 200 {nginx_literal(loc['body'])};")
            lines.append("    }")
            blocks.append("\n".join(lines))
        conf = f"""# generated by benches/metadata_bench.py
daemon off;
master_process on;
user root;
worker_processes {self.workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
  worker_connections 4096;
}}
http {{
  access_log off;
  server_tokens off;
  # metabridge: keep-alive idle = --header-read-timeout (5s), no per-connection
  # request cap (only --connection-max-age 60s, longer than a run).
  keepalive_timeout 5s;
  keepalive_requests 10000000;
  tcp_nodelay on;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen {self.host_ip}:{self.port} backlog=1024;
{chr(10).join(blocks)}
    location / {{ return 404; }}
  }}
}}
"""
        path = d / "nginx.conf"
        path.write_text(conf)
        return path

    def start(self, locations: list[dict]) -> "Nginx":
        conf = self.write_conf(locations)
        argv = ["nginx", "-p", str(self.dir), "-c", str(conf)]
        test = subprocess.run(argv + ["-t"], capture_output=True, text=True)
        if test.returncode != 0:
            raise BenchFailure(f"nginx -t failed:\n{test.stderr}")
        if self.cpus:
            argv = ["taskset", "-c", self.cpus] + argv
        self.log = open(self.dir / "stdout.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchFailure(f"nginx exited {self.proc.returncode}: "
                                   f"{(self.dir / 'error.log').read_text(errors='replace')}")
            if len(children(self.proc.pid)) >= self.workers:
                try:
                    import socket
                    with socket.create_connection((self.host_ip, self.port), timeout=0.5):
                        return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise BenchFailure("nginx did not start listening within 10s")

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)] if self.proc else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "log", None):
            self.log.close()


# -------------------------------------------------------------- metabridge --


class PinnedMetabridge(Metabridge):
    """tests/support's Metabridge, started under `taskset -c CPUS` (exec'd: same pid)."""

    cpus: str | None = None

    @property
    def argv(self) -> list[str]:
        argv = super().argv
        return (["taskset", "-c", self.cpus] + argv) if self.cpus else argv


# --------------------------------------------------------------------- wrk --


def run_wrk(pod, url: str, headers: dict, *, duration: float, connections: int,
            threads: int, cpus: str | None, pids: list[int],
            perf_out: Path | None = None) -> dict:
    argv = []
    if cpus:
        argv += ["taskset", "-c", cpus]
    argv += ["wrk", "-t", str(min(threads, connections)), "-c", str(connections),
             "-d", f"{max(1, round(duration))}s", "--timeout", "5s", "-s", str(WRK_SCRIPT)]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    ticks_before = proc_cpu_ticks(pids)
    machine_before = cpu_times()
    perf = None
    if perf_out is not None:  # a flat profile of the server (kernel + user) during the run
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-o", str(perf_out),
                                 "-p", ",".join(map(str, pids)), "--", "sleep",
                                 str(max(1, round(duration)))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(pod.exec_argv(argv), capture_output=True, text=True,
                          timeout=duration + 60, env=pod.env())
    kids_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if perf is not None:
        perf.wait(timeout=60)
    machine_after = cpu_times()
    ticks_after = proc_cpu_ticks(pids)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchFailure(f"wrk failed ({proc.returncode}) against {url}:\n"
                           f"{proc.stdout}\n{proc.stderr}")
    out = json.loads(line[len("WRKJSON "):])
    out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
    hz = os.sysconf("SC_CLK_TCK")
    out["server_cpu_s"] = (ticks_after - ticks_before) / hz
    seconds = out["duration_us"] / 1e6
    # Share of one CPU the server got; < 1 per server CPU means it was not the
    # bottleneck (the client, or other work on the machine, was).
    out["server_util"] = out["server_cpu_s"] / seconds
    out["client_cpu_s"] = ((kids_after.ru_utime + kids_after.ru_stime)
                           - (kids_before.ru_utime + kids_before.ru_stime))
    busy = [b - a for a, b in zip(machine_before, machine_after)]
    busy_s = (sum(busy) - busy[3] - busy[4]) / hz  # minus idle and iowait
    # CPU time of everything else on the machine (other tenants, the fakes,
    # softirq not charged to a process), in CPUs: the noise of this run.
    out["other_cpus"] = max(0.0, busy_s - out["server_cpu_s"] - out["client_cpu_s"]) / seconds
    out["cpu_us_per_req"] = (out["server_cpu_s"] * 1e6 / out["requests"]) if out["requests"] else None
    out["bytes_per_resp"] = out["bytes"] / out["requests"] if out["requests"] else None
    out["errors"] = sum(out[k] for k in ("connect_errors", "read_errors", "write_errors",
                                         "timeouts"))
    return out


def perf_summary(data: Path, limit: int = 25) -> str:
    """Self time by binary, then the top symbols (`perf report`, flat)."""
    def report(sort: str, cut: str) -> list[str]:
        proc = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                               "--sort", sort, "--percent-limit", cut],
                              capture_output=True, text=True, timeout=120)
        return [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    dsos = report("dso", "1")
    syms = report("dso,sym", "0.7")
    return "\n".join(["by binary:", *dsos, "top symbols:", *syms[:limit]])


# ------------------------------------------------------------------- bench --


class Bench:
    def __init__(self, args):
        self.args = args
        self.kube = self.google = self.aws = self.node = self.tb = None
        self.mb: PinnedMetabridge | None = None
        self.nginx: Nginx | None = None
        self.identities: list[tuple[str, str]] = []  # (namespace, sa) with a Google SA
        self.aws_identities: list[tuple[str, str]] = []
        self.served: set[tuple[str, str]] = set()  # identities whose token was served
        self.results: dict = {"runs": [], "cold": {}, "upstream": {}}
        self.workdir = Path(tempfile.mkdtemp(prefix="metabridge-bench-"))

    # -- setup ---------------------------------------------------------------
    def pinning(self) -> tuple[str | None, str | None]:
        a = self.args
        if a.no_pin:
            return None, None
        if a.server_cpus or a.client_cpus:
            return a.server_cpus, a.client_cpus
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return None, None
        half = len(allowed) // 2
        return cpu_list(set(allowed[half:])), cpu_list(set(allowed[:half]))

    def grant(self, namespace: str, sa: str) -> str:
        gsa = f"{sa}@{PROJECT}.iam.gserviceaccount.com"
        self.google.add_service_account(gsa)
        self.google.grant_workload_identity_user(gsa, principal(namespace, sa))
        self.identities.append((namespace, sa))
        return gsa

    def setup(self) -> None:
        from support.fake_google import FakeGoogle
        from support.fake_kube import FakeKube

        a = self.args
        netns.check_environment()
        removed = netns.cleanup_stale()
        if removed:
            log(f"removed leftovers of earlier runs: {', '.join(removed)}")
        for tool in ("nginx", "wrk", "curl", "taskset"):
            if shutil.which(tool) is None:
                raise BenchFailure(f"`{tool}` is not installed "
                                   "(apt-get install -y nginx-light wrk curl util-linux)")
        self.server_cpus, self.client_cpus = self.pinning()
        if self.client_cpus:
            # The harness (and the fakes' threads) stay off the servers' CPUs.
            os.sched_setaffinity(0, parse_cpus(self.client_cpus))
        log(f"servers on CPUs {self.server_cpus or 'any'}, wrk on {self.client_cpus or 'any'}; "
            f"work dir {self.workdir}")

        self.kube = FakeKube().start()
        self.google = FakeGoogle().start()
        self.node = netns.Node()
        self.kube.add_node(self.node.name, addresses=[self.node.host_ip])
        self.tb = Testbed(self.kube, self.node, self.workdir / "testbed")
        self.google.add_oidc_provider(PROJECT_NUMBER, POOL, PROVIDER, self.kube.issuer)

        annotations = {GSA_ANNOTATION: self.grant(NAMESPACE, SA)}
        mb_args = ["--gcp-workload-identity-provider", PROVIDER_NAME,
                   "--gcp-project-id", PROJECT,
                   "--gcp-sts-url", self.google.url,
                   "--gcp-iamcredentials-url", self.google.url]
        if a.aws:
            from support.fake_aws import FakeAwsSts
            self.aws = FakeAwsSts().start()
            self.aws.add_oidc_provider(self.kube.issuer, client_ids=[AWS_AUDIENCE])
            provider = self.kube.issuer.split("://", 1)[1]
            role = self.aws.add_role(ROLE_NAME, provider=self.kube.issuer, conditions={
                f"{provider}:sub": [subject(NAMESPACE, SA)], f"{provider}:aud": AWS_AUDIENCE})
            annotations[ROLE_ANNOTATION] = role
            self.aws_identities.append((NAMESPACE, SA))
            mb_args += ["--aws-region", AWS_REGION, "--aws-sts-url", self.aws.url]
        self.pod = self.tb.add_pod("client", NAMESPACE, SA, annotations)

        self.mb = PinnedMetabridge(self.node, self.tb.kubeconfig, self.tb.workdir,
                                   extra_args=mb_args, env={"METABRIDGE_LOG": "warn"},
                                   name="metabridge", debug_whoami=False)
        self.mb.cpus = self.server_cpus
        self.tb.daemons.append(self.mb)
        self.mb.start().wait_ready(30)
        log(f"metabridge ready (pid {self.mb.proc.pid}, {os.environ.get('METABRIDGE_BIN')})")

    # -- what is served --------------------------------------------------------
    def paths(self) -> list[dict]:
        wanted = [p.strip() for p in self.args.paths.split(",") if p.strip()]
        table = {
            "token": {"name": "token", "path": TOKEN_PATH, "headers": dict(FLAVOR),
                      "require": dict(FLAVOR), "what": "GCE access token (cache hit)"},
            "email": {"name": "email", "path": EMAIL_PATH, "headers": dict(FLAVOR),
                      "require": dict(FLAVOR), "what": "GCE email (identity lookup, no credential)"},
            "project-id": {"name": "project-id", "path": PROJECT_PATH, "headers": dict(FLAVOR),
                           "require": dict(FLAVOR), "what": "GCE project-id (no caller lookup)"},
        }
        unknown = [w for w in wanted if w not in table]
        if unknown:
            raise BenchFailure(f"unknown --paths {unknown}; choose from {sorted(table)}")
        out = [table[w] for w in wanted]
        if self.args.aws:
            out.append({"name": "imds-creds", "path": IMDS_CREDS_PATH, "headers": {},
                        "require": {IMDS_TOKEN_HEADER: ""},
                        "what": "IMDSv2 role credentials (cache hit)"})
        return out

    def wait_credentials(self, paths: list[dict]) -> None:
        """Until every credential path answers 200 (prefetch done or minted once)."""
        if self.args.aws:
            deadline = time.monotonic() + 20
            while True:
                r = curl(self.pod, f"http://{netns.METADATA_IP}{IMDS_TOKEN_PATH}", method="PUT",
                         headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
                if r["status"] == 200:
                    self.imds_token = r["body"].decode()
                    break
                if time.monotonic() > deadline:
                    raise BenchFailure(f"IMDS PUT token answered {r['status']}: {r['body'][:300]!r}")
                time.sleep(0.2)
            for p in paths:
                if p["name"].startswith("imds"):
                    p["headers"] = {IMDS_TOKEN_HEADER: self.imds_token}
        if any(p["name"] == "token" for p in paths):
            self.served.add((NAMESPACE, SA))
        for p in paths:
            deadline = time.monotonic() + 20
            while True:
                r = curl(self.pod, f"http://{netns.METADATA_IP}{p['path']}", headers=p["headers"])
                if r["status"] == 200:
                    break
                if time.monotonic() > deadline:
                    hint = (" (token paths answer 404 until the credential cache is integrated; "
                            "try --paths email,project-id)" if r["status"] == 404 else "")
                    raise BenchFailure(f"{p['path']} answered {r['status']}{hint}: "
                                       f"{r['body'][:300]!r}\n{self.mb.log_tail()}")
                time.sleep(0.2)

    def start_nginx(self, paths: list[dict]) -> None:
        a = self.args
        locations = []
        for p in paths:
            ref = curl(self.pod, f"http://{netns.METADATA_IP}{p['path']}", headers=p["headers"])
            assert ref["status"] == 200, ref
            p["reference"] = ref
            extra = {k: v for k, v in GCE_HEADERS.items()} if p["path"].startswith("/computeMetadata") \
                else {}
            locations.append({"path": p["path"], "body": ref["body"],
                              "content_type": ref["headers"].get("content-type", "text/plain"),
                              "headers": extra, "require": p["require"]})
        workers = a.nginx_workers or (len(parse_cpus(self.server_cpus)) if self.server_cpus else 1)
        self.nginx = Nginx(self.workdir, self.node.host_ip, workers, self.server_cpus).start(locations)
        log(f"nginx ready on {self.nginx.base} ({workers} worker(s), pids {self.nginx.pids()})")
        # Same bytes: body, content type, flavor header; token bodies differ only
        # in the expires_in countdown.
        for p in paths:
            ref = p["reference"]
            got = curl(self.pod, self.nginx.base + p["path"], headers=p["headers"])
            if got["status"] != 200:
                raise BenchFailure(f"nginx answered {got['status']} on {p['path']}")
            for h in ("content-type", "metadata-flavor"):
                if ref["headers"].get(h) != got["headers"].get(h):
                    raise BenchFailure(f"{p['path']}: header {h} differs: "
                                       f"{ref['headers'].get(h)!r} vs {got['headers'].get(h)!r}")
            if got["body"] != ref["body"]:
                if p["name"] == "token":
                    mine, theirs = json.loads(ref["body"]), json.loads(got["body"])
                    mine.pop("expires_in"), theirs.pop("expires_in")
                    same = mine == theirs
                else:
                    same = False
                if not same:
                    raise BenchFailure(f"{p['path']}: nginx body differs from metabridge's")
            refused = curl(self.pod, self.nginx.base + p["path"])
            if refused["status"] == 200:
                raise BenchFailure(f"nginx must refuse {p['path']} without its header")
            p["body_len"] = len(ref["body"])

    def targets(self) -> list[dict]:
        t = [{"name": "metabridge", "base": f"http://{netns.METADATA_IP}",
              "pids": lambda: [self.mb.proc.pid]},
             {"name": "nginx", "base": self.nginx.base, "pids": self.nginx.pids}]
        if self.args.direct:
            t.append({"name": "metabridge-direct", "base": self.mb.url,
                      "pids": lambda: [self.mb.proc.pid]})
        return t

    # -- load ------------------------------------------------------------------
    def load(self, paths: list[dict], *, connections: int, threads: int,
             duration: float, rounds: int, kind: str) -> None:
        a = self.args
        targets = self.targets()
        total = rounds * len(paths) * len(targets)
        n = 0
        if a.warmup > 0:
            for p in paths:
                for t in targets:
                    run_wrk(self.pod, t["base"] + p["path"], p["headers"], duration=a.warmup,
                            connections=connections, threads=threads, cpus=self.client_cpus,
                            pids=t["pids"]())
        for r in range(rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for p in paths:
                for t in order:
                    n += 1
                    perf_out = None
                    if a.perf and kind == "load" and r == 0:
                        perf_out = self.workdir / f"perf-{p['name']}-{t['name']}.data"
                    res = run_wrk(self.pod, t["base"] + p["path"], p["headers"],
                                  duration=duration, connections=connections, threads=threads,
                                  cpus=self.client_cpus, pids=t["pids"](), perf_out=perf_out)
                    if perf_out is not None:
                        self.results.setdefault("perf", {})[f"{p['name']} / {t['name']}"] = \
                            perf_summary(perf_out)
                    res.update({"kind": kind, "round": r + 1, "path": p["name"],
                                "target": t["name"], "connections": connections})
                    self.results["runs"].append(res)
                    log(f"[{kind} {n}/{total}] round {r + 1} {p['name']:<10} {t['name']:<17} "
                        f"{res['rps']:>9.0f} req/s  p50 {res['p50_us'] / 1000:.2f} ms  "
                        f"p99 {res['p99_us'] / 1000:.2f} ms  cpu {res['cpu_us_per_req'] or 0:.1f} "
                        f"us/req  server {res['server_util'] * 100:.0f}% busy  others {res['other_cpus']:.2f} CPUs  "
                        f"non-2xx {res['status_errors']}  errors {res['errors']}")
                    if res["status_errors"]:
                        raise BenchFailure(f"{t['name']} answered {res['status_errors']} non-2xx "
                                           f"responses on {p['path']}: the comparison is void")
                    if not self.mb.running:
                        raise BenchFailure(f"metabridge died:\n{self.mb.log_tail()}")

    # -- cold path -------------------------------------------------------------
    def cold(self) -> None:
        a = self.args
        google = self.google
        prefetch, miss = [], []
        for i in range(a.cold_samples):
            sa = f"prefetch-{i}"
            gsa = self.grant(NAMESPACE, sa)
            self.served.add((NAMESPACE, sa))
            registered = time.time()
            pod = self.tb.add_pod(f"prefetch-{i}", NAMESPACE, sa, {GSA_ANNOTATION: gsa})
            deadline = time.monotonic() + 15
            done = None
            while done is None and time.monotonic() < deadline:
                done = next((c for c in google.calls_to("generateAccessToken")
                             if c.get("target") == gsa and c["status"] == 200), None)
                time.sleep(0.01)
            if done is None:
                raise BenchFailure(f"no prefetch for {sa} within 15s:\n{self.mb.log_tail()}")
            time.sleep(0.05)
            sts_before = len(google.calls_to("sts"))
            r = curl(pod, f"http://{netns.METADATA_IP}{TOKEN_PATH}", headers=FLAVOR)
            prefetch.append({"status": r["status"], "ms": r["total"] * 1000,
                             "connect_ms": r["connect"] * 1000,
                             "prefetch_done_after_ms": (done["time"] + done.get("duration", 0)
                                                        - registered) * 1000,
                             "upstream_during_request": len(google.calls_to("sts")) - sts_before})
            self.tb.delete_pod(pod)
        for i in range(a.cold_samples):
            sa = f"miss-{i}"
            gsa = self.grant(NAMESPACE, sa)
            self.served.add((NAMESPACE, sa))
            pod = self.tb.add_pod(f"miss-{i}", NAMESPACE, sa, register=False)
            # The SA and the pod appear, and the pod calls at once.
            self.tb.ensure_service_account(NAMESPACE, sa, {GSA_ANNOTATION: gsa})
            pod.uid = self.tb.register_pod(pod, f"miss-{i}", NAMESPACE, sa)
            self.tb.kube_pods[pod.name] = (NAMESPACE, f"miss-{i}")
            sts_before = len(google.calls_to("sts"))
            r = curl(pod, f"http://{netns.METADATA_IP}{TOKEN_PATH}", headers=FLAVOR)
            miss.append({"status": r["status"], "ms": r["total"] * 1000,
                         "connect_ms": r["connect"] * 1000,
                         "upstream_during_request": len(google.calls_to("sts")) - sts_before,
                         "body": r["body"][:200].decode(errors="replace") if r["status"] != 200
                         else ""})
            self.tb.delete_pod(pod)
        self.results["cold"] = {"prefetch": prefetch, "miss": miss}
        for name, samples in (("prefetch", prefetch), ("miss", miss)):
            bad = [s for s in samples if s["status"] != 200]
            if bad:
                log(f"WARNING: cold {name}: non-200 first answers: {bad}")

    # -- upstream accounting ---------------------------------------------------
    def upstream(self) -> list[str]:
        problems = []
        sts = self.google.calls_to("sts")
        per: dict[str, int] = {}
        for c in sts:
            key = c.get("principal") or f"<failed:{c['status']}>"
            per[key] = per.get(key, 0) + 1
        expected = {principal(ns, sa) for ns, sa in self.identities}
        failed = [c for c in sts if c["status"] != 200]
        if failed:
            problems.append(f"{len(failed)} failed STS calls: "
                            f"{[(c['status'], c.get('error')) for c in failed][:5]}")
        # Exactly one exchange for every identity whose token was served; at
        # most one for the others (prefetch may or may not have minted them).
        served = {principal(ns, sa) for ns, sa in self.served}
        for p in sorted(expected):
            n = per.get(p, 0)
            if n > 1 or (p in served and n != 1):
                problems.append(f"{n} STS calls for {p.rsplit('/', 1)[1]} (want 1)")
        extra = set(per) - expected
        if extra:
            problems.append(f"STS calls for unexpected identities: {sorted(extra)}")
        gat = self.google.calls_to("generateAccessToken")
        gat_per: dict[str, int] = {}
        for c in gat:
            gat_per[c.get("target")] = gat_per.get(c.get("target"), 0) + 1
        for target, count in gat_per.items():
            if count != 1:
                problems.append(f"{count} generateAccessToken calls for {target} (want 1)")
        up = {"identities": len(expected), "sts_calls": len(sts),
              "generate_access_token_calls": len(gat),
              "kube_token_requests": len(self.kube.token_requests)}
        if self.aws is not None:
            assume = self.aws.calls_for("AssumeRoleWithWebIdentity")
            up["aws_assume_role_calls"] = len(assume)
            up["aws_identities"] = len(self.aws_identities)
            if len(assume) != len(self.aws_identities) or any(c["status"] != 200 for c in assume):
                problems.append(f"{len(assume)} AssumeRoleWithWebIdentity calls for "
                                f"{len(self.aws_identities)} AWS identities")
        try:
            metrics = self.mb.metrics()
            up["iptables_repairs"] = sum(v for (n, _), v in metrics.items()
                                         if n == "metabridge_iptables_repairs_total")
            up["cache_metrics"] = {n + ("{" + ",".join(f"{k}={v}" for k, v in ls) + "}" if ls else ""): v
                                   for (n, ls), v in metrics.items()
                                   if n.startswith("metabridge_cache") and not n.endswith("_bucket")}
        except (AssertionError, ValueError) as e:
            log(f"could not read metabridge's metrics: {e}")
        self.results["upstream"] = up
        return problems

    # -- teardown --------------------------------------------------------------
    def close(self) -> None:
        for step in (lambda: self.nginx and self.nginx.stop(),
                     lambda: self.mb and self.mb.running and self.mb.stop(),
                     lambda: self.tb and self.tb.close(),
                     lambda: self.node and self.node.close(),
                     lambda: self.kube and self.kube.stop(),
                     lambda: self.google and self.google.stop(),
                     lambda: self.aws and self.aws.stop()):
            try:
                step()
            except Exception as e:  # keep tearing down
                log(f"teardown: {e!r}")
        if not self.args.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ------------------------------------------------------------------ report --


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def report(results: dict, args, meta: dict) -> str:
    runs = results["runs"]
    out = []
    w = out.append
    w(f"## metabridge vs nginx — {meta['date']}")
    w("")
    w(f"- machine: {meta['machine']['nproc']} CPUs ({meta['machine']['cpu']}), kernel "
      f"{meta['machine']['kernel']}, load before {' '.join(meta['machine']['loadavg'])}, "
      f"CPU steal during the run {meta['steal'] * 100:.1f}%")
    if runs:
        others = [r["other_cpus"] for r in runs]
        w(f"- other work on the machine during the runs (CPUs busy outside the server and wrk): "
          f"median {med(others):.2f}, max {max(others):.2f}")
    w(f"- {meta['machine']['nginx']}; {meta['machine']['wrk']}")
    w(f"- servers pinned to CPUs {meta['server_cpus'] or 'not pinned'}, wrk (+ harness) to "
      f"{meta['client_cpus'] or 'not pinned'}; nginx workers: {meta['nginx_workers']}")
    w(f"- command: `{meta['command']}`")
    w("")
    for kind, conns in (("load", args.connections), ("c1", 1)):
        sel = [r for r in runs if r["kind"] == kind]
        if not sel:
            continue
        rounds = max(r["round"] for r in sel)
        w(f"### {'Under load' if kind == 'load' else 'Single connection'}: wrk -c {conns} "
          f"-t {min(args.threads, conns)}, {args.duration if kind == 'load' else args.single_duration:g}"
          f" s x {rounds} rounds (median of rounds; req/s range in brackets)")
        w("")
        w("| path | target | req/s | p50 ms | p99 ms | server CPU µs/req | server CPU use | "
          "bytes/resp | req/s vs nginx | CPU/req vs nginx |")
        w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for path in dict.fromkeys(r["path"] for r in sel):
            for target in dict.fromkeys(r["target"] for r in sel):
                rs = [r for r in sel if r["path"] == path and r["target"] == target]
                if not rs:
                    continue
                ratio = cpu_ratio = ""
                if target != "nginx":
                    ratios, cpu_ratios = [], []
                    for rnd in range(1, rounds + 1):
                        a = [r for r in rs if r["round"] == rnd]
                        b = [r for r in sel if r["path"] == path and r["target"] == "nginx"
                             and r["round"] == rnd]
                        if a and b:
                            ratios.append(a[0]["rps"] / b[0]["rps"])
                            if a[0]["cpu_us_per_req"] and b[0]["cpu_us_per_req"]:
                                cpu_ratios.append(a[0]["cpu_us_per_req"] / b[0]["cpu_us_per_req"])
                    ratio = (f"**{med(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f})"
                             if ratios else "")
                    cpu_ratio = (f"{med(cpu_ratios):.2f} ({min(cpu_ratios):.2f}–"
                                 f"{max(cpu_ratios):.2f})" if cpu_ratios else "")
                rps = [r["rps"] for r in rs]
                w(f"| {path} | {target} | {med(rps):,.0f} [{min(rps):,.0f}–{max(rps):,.0f}] | "
                  f"{med([r['p50_us'] for r in rs]) / 1000:.3f} | "
                  f"{med([r['p99_us'] for r in rs]) / 1000:.3f} | "
                  f"{med([r['cpu_us_per_req'] for r in rs]):.1f} | "
                  f"{med([r['server_util'] for r in rs]) * 100:.0f}% | "
                  f"{med([r['bytes_per_resp'] for r in rs]):.0f} | {ratio} | {cpu_ratio} |")
        w("")
    cold = results.get("cold") or {}
    if cold:
        w("### Cold path: first token request of a new pod (curl time_total, ms)")
        w("")
        w("| case | n | median ms | min ms | max ms | statuses | STS calls during the request |")
        w("|---|---:|---:|---:|---:|---|---:|")
        for name, label in (("prefetch", "new pod, prefetch done (hit)"),
                            ("miss", "new SA + pod, called at once (miss)")):
            s = cold.get(name) or []
            if not s:
                continue
            ms = [x["ms"] for x in s]
            statuses = ",".join(sorted({str(x["status"]) for x in s}))
            w(f"| {label} | {len(s)} | {med(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} | "
              f"{statuses} | {sum(x['upstream_during_request'] for x in s)} |")
        pf = [x["prefetch_done_after_ms"] for x in cold.get("prefetch", [])]
        if pf:
            w("")
            w(f"Prefetch finished {med(pf):.0f} ms (median; max {max(pf):.0f}) after the pod "
              f"was registered in the API server.")
        w("")
    up = results.get("upstream") or {}
    if up:
        w("### Upstream calls during the whole run")
        w("")
        w(f"{up['identities']} Google identities → {up['sts_calls']} STS exchanges, "
          f"{up['generate_access_token_calls']} generateAccessToken, "
          f"{up['kube_token_requests']} Kubernetes TokenRequests"
          + (f"; {up['aws_identities']} AWS identities → {up['aws_assume_role_calls']} "
             f"AssumeRoleWithWebIdentity" if "aws_identities" in up else "")
          + f" (total requests served under load: {sum(r['requests'] for r in runs):,}).")
        if up.get("iptables_repairs"):
            w(f"metabridge repaired its interception rules {up['iptables_repairs']:.0f} time(s) "
              f"during the run (other nat PREROUTING users on this machine; noise, not load).")
        if up.get("cache_metrics"):
            w("")
            w("Cache metrics at the end: " + ", ".join(
                f"`{k}` {v:g}" for k, v in sorted(up["cache_metrics"].items())))
        w("")
    for name, summary in (results.get("perf") or {}).items():
        w(f"### perf (self time, round 1): {name}")
        w("")
        w("```")
        w(summary)
        w("```")
        w("")
    w("### Raw runs")
    w("")
    w("| kind | round | path | target | requests | req/s | p50 µs | p90 µs | p99 µs | "
      "p99.9 µs | max µs | server CPU s | wrk CPU s | other CPUs busy | errors |")
    w("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        w(f"| {r['kind']} | {r['round']} | {r['path']} | {r['target']} | {r['requests']} | "
          f"{r['rps']:.0f} | {r['p50_us']:.0f} | {r['p90_us']:.0f} | {r['p99_us']:.0f} | "
          f"{r['p999_us']:.0f} | {r['max_us']:.0f} | {r['server_cpu_s']:.2f} | "
          f"{r['client_cpu_s']:.2f} | {r['other_cpus']:.2f} | {r['errors']} |")
    return "\n".join(out) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10, help="seconds per loaded run (10)")
    ap.add_argument("--connections", type=int, default=32, help="wrk -c under load (32)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per target (3)")
    ap.add_argument("--warmup", type=float, default=2, help="unrecorded seconds per target and "
                    "path before the rounds (2; 0 = none)")
    ap.add_argument("--single-duration", type=float, default=None,
                    help="seconds per single-connection run (default duration/2; 0 = skip)")
    ap.add_argument("--paths", default="token,email,project-id",
                    help="GCE paths to measure (token,email,project-id)")
    ap.add_argument("--aws", action="store_true", help="also the IMDSv2 credentials path")
    ap.add_argument("--direct", action="store_true",
                    help="also metabridge at its listener, without the DNAT")
    ap.add_argument("--cold-samples", type=int, default=5, help="pods per cold-path case (5)")
    ap.add_argument("--server-cpus", help="taskset list for metabridge and nginx")
    ap.add_argument("--client-cpus", help="taskset list for wrk and the harness")
    ap.add_argument("--no-pin", action="store_true", help="no CPU pinning at all")
    ap.add_argument("--nginx-workers", type=int, help="default: number of server CPUs (1 unpinned)")
    ap.add_argument("--perf", action="store_true",
                    help="profile the servers (perf record) during round 1 and print the "
                         "top symbols")
    ap.add_argument("--json-out", help="write the raw results as JSON here")
    ap.add_argument("--markdown-out", help="write the report (markdown) here too")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs and nginx.conf")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.single_duration is None:
        args.single_duration = args.duration / 2
    return args


def main() -> int:
    args = parse_args()

    if not os.environ.get("METABRIDGE_BIN"):
        os.environ["METABRIDGE_BIN"] = str(REPO / "target" / "release" / "metabridge")
    binary = Path(os.environ["METABRIDGE_BIN"])
    if not binary.exists():
        print(f"{binary} not found: run `cargo build --release` (or set METABRIDGE_BIN)",
              file=sys.stderr)
        return 2
    if "release" not in binary.parts:
        log(f"WARNING: {binary} does not look like a release build")

    meta = {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine(), "binary": str(binary),
            "command": "sudo python3 benches/metadata_bench.py " + " ".join(sys.argv[1:])}
    bench = Bench(args)
    problems: list[str] = []
    steal_before = cpu_times()
    try:
        bench.setup()
        paths = bench.paths()
        bench.wait_credentials(paths)
        bench.start_nginx(paths)
        meta.update(server_cpus=bench.server_cpus, client_cpus=bench.client_cpus,
                    nginx_workers=bench.nginx.workers)
        bench.load(paths, connections=args.connections, threads=args.threads,
                   duration=args.duration, rounds=args.rounds, kind="load")
        if args.single_duration > 0:
            bench.load(paths, connections=1, threads=1, duration=args.single_duration,
                       rounds=args.rounds, kind="c1")
        if args.cold_samples > 0:
            bench.cold()
        problems = bench.upstream()
        meta["steal"] = steal_share(steal_before, cpu_times())
        warnings = [ln for ln in bench.mb.log_text().splitlines()
                    if " WARN " in ln or " ERROR " in ln]
        text = report(bench.results, args, meta)
        if warnings:
            text += f"\nmetabridge logged {len(warnings)} warnings/errors, e.g.:\n" + \
                "\n".join("    " + ln for ln in warnings[:5]) + "\n"
        print(text)
        if args.markdown_out:
            Path(args.markdown_out).write_text(text)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"meta": meta, **bench.results}, indent=1,
                                                      default=str))
    except BenchFailure as e:
        print(f"\nBENCH FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    if problems:
        print("\n" + "!" * 72 + "\nBENCH FAILED: upstream calls are not one per identity:\n  "
              + "\n  ".join(problems) + "\n" + "!" * 72, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
