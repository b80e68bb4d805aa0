#!/usr/bin/env python3
"""A local demonstration of the real metabridge daemon on a simulated node.

The cluster is the fake kube-apiserver (tests/support/fake_kube.py), the clouds
are the fakes beside it, pods are network namespaces (tests/support/netns.py)
and metabridge runs in the root namespace with the iptables rules it installs
itself. Every pod then asks 169.254.169.254 what it would ask a real metadata
server, and the demo prints what it was told. Everything is torn down at the
end, also on Ctrl-C or an error.

To show another API, add a function to SECTIONS: it gets the demo context and
one caller and returns the lines to print.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support import netns  # noqa: E402
from support.metabridge import WHOAMI_PATH  # noqa: E402
from support.testbed import METADATA_URL, Testbed  # noqa: E402

GSA = "iam.gke.io/gcp-service-account"
ROLE = "eks.amazonaws.com/role-arn"

# (name, namespace, service account, its annotations, hostNetwork)
PODS = [
    ("web-7d4b9", "shop", "storefront",
     {GSA: "storefront@demo-project.iam.gserviceaccount.com"}, False),
    ("exporter-5c8f2", "billing", "exporter",
     {ROLE: "arn:aws:iam::123456789012:role/billing-exporter"}, False),
    ("node-agent-x2k4p", "kube-system", "node-agent", {}, True),
]


@dataclass
class Demo:
    testbed: Testbed
    metabridge: object = None
    clouds: dict = field(default_factory=dict)
    callers: list = field(default_factory=list)  # (label, caller, hostNetwork, where, sa, annotations)


def _answer(result) -> str:
    if result.status is None:
        return f"no answer ({result.error})"
    body = result.text.strip()
    try:
        body = json.dumps(json.loads(body), sort_keys=True)
    except ValueError:
        pass
    return f"HTTP {result.status}  {body}"


def section_whoami(demo: Demo, caller, host_network: bool) -> list[str]:
    tb = demo.testbed
    lines = []
    if host_network:
        # Node traffic is never redirected; ask the listener directly to show
        # that a hostNetwork pod (the node's own IP) is refused, not mapped.
        via = caller.http_get(METADATA_URL + WHOAMI_PATH, timeout=2)
        lines.append(f"169.254.169.254  → {_answer(via)}  (node traffic is not intercepted)")
        direct = tb.whoami(caller, direct=demo.metabridge)
        lines.append(f"listener direct  → {_answer(direct)}")
    else:
        lines.append(f"GET {WHOAMI_PATH} → {_answer(tb.whoami(caller))}")
    return lines


AWS_REGION = "us-east-1"
IMDS_CREDS = "/latest/meta-data/iam/security-credentials/"

# Runs in the pod: boto3's default chain, no configuration at all. (botocore
# never takes the client region from IMDS, so the signing region is given.)
_BOTO3_WHOAMI = """
import sys, boto3
session = boto3.Session()
creds = session.get_credentials()
if creds is None:
    print("no credentials found")
else:
    sts = session.client("sts", endpoint_url=sys.argv[1], region_name=sys.argv[2])
    print(f"{sts.get_caller_identity()['Arn']} (credentials from: {creds.method})")
"""


def imds_flags(demo: Demo, fake_aws) -> list[str]:
    """Trust in the fake AWS: the cluster's issuer, and for each pod's role
    annotation a role whose trust policy names that service account. Returns
    the flags that enable metabridge's IMDS API against the fake."""
    kube = demo.testbed.kube
    fake_aws.add_oidc_provider(kube.issuer, client_ids=["sts.amazonaws.com"])
    provider = kube.issuer.split("://", 1)[1]
    for _, ns, sa, ann, _ in PODS:
        if ROLE in ann:
            fake_aws.add_role(ann[ROLE].rsplit("/", 1)[1], provider=kube.issuer,
                              conditions={f"{provider}:sub": f"system:serviceaccount:{ns}:{sa}"})
    return ["--aws-region", AWS_REGION, "--aws-sts-url", fake_aws.url]


def section_imds(demo: Demo, caller, host_network: bool) -> list[str]:
    """IMDSv2 as an AWS SDK does it: a session token, the role name, the
    role's credentials (secrets elided), then boto3 with no configuration."""
    fake_aws = demo.clouds.get("aws")
    if fake_aws is None:
        return []
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}
    if host_network:
        direct = caller.http_get(demo.metabridge.url + "/latest/api/token",
                                 method="PUT", headers=ttl, timeout=2)
        return [f"IMDS PUT /latest/api/token (listener direct) → {_answer(direct)}"]
    put = caller.http_get(METADATA_URL + "/latest/api/token", method="PUT", headers=ttl)
    if put.status != 200:
        return [f"IMDS PUT /latest/api/token → {_answer(put)}"]
    lines = [f"IMDS PUT /latest/api/token → HTTP 200, a session token "
             f"(TTL {put.headers.get('x-aws-ec2-metadata-token-ttl-seconds')} s)"]
    auth = {"X-aws-ec2-metadata-token": put.text}
    role = caller.http_get(METADATA_URL + IMDS_CREDS, headers=auth)
    lines.append(f"     GET {IMDS_CREDS} → {_answer(role)}")
    if role.status != 200:
        return lines
    path = IMDS_CREDS + role.text
    for _ in range(20):  # a cold cache answers 503 until STS has answered
        creds = caller.http_get(METADATA_URL + path, headers=auth)
        if creds.status != 503:
            break
        time.sleep(0.25)
    try:
        shown = json.loads(creds.body)
        for secret in ("SecretAccessKey", "Token"):
            if secret in shown:
                shown[secret] = "…"
        shown = json.dumps(shown, ensure_ascii=False)
        lines.append(f"     GET {path} → HTTP {creds.status}  {shown}")
    except ValueError:
        lines.append(f"     GET {path} → {_answer(creds)}")
    proc = caller.run([sys.executable, "-c", _BOTO3_WHOAMI,
                       fake_aws.url_for(demo.testbed.host_ip), AWS_REGION], timeout=60)
    said = proc.stdout.strip() or (proc.stderr.strip().splitlines() or ["?"])[-1]
    lines.append(f"     boto3, no configuration: sts.get_caller_identity() → {said}")
    return lines


GCP_PROJECT_ID = "demo-project"
GCP_PROJECT_NUMBER = "314159265358"
GCP_POOL = "eks-pool"
ID_TOKEN_AUDIENCE = "https://reports.example.com/"

# Runs in the pod: google-auth, unmodified, no configuration at all; it finds
# the metadata server by IP and fetches by metadata.google.internal.
_GOOGLE_AUTH = """
import json, sys
import google.auth, google.oauth2.id_token
from google.auth.transport.requests import Request
out = {}
try:
    creds, project = google.auth.default()
    out["default"] = f"{type(creds).__module__}.{type(creds).__name__}, project {project}"
    creds.refresh(Request())
    out["token"], out["email"] = creds.token, creds.service_account_email
    out["expiry"] = creds.expiry.isoformat() + "Z"
    out["id_token"] = google.oauth2.id_token.fetch_id_token(Request(), sys.argv[1])
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def gce_flags(demo: Demo, google) -> list[str]:
    """Trust in the fake Google: a workload identity provider for the
    cluster's issuer, and for each pod's Google SA annotation that SA, granted
    to the pod's service account. metadata.google.internal is served by a
    cluster DNS as the chart's CoreDNS block does. Returns the flags that
    enable metabridge's GCE API against the fake."""
    from support import dns

    kube = demo.testbed.kube
    provider = google.add_oidc_provider(GCP_PROJECT_NUMBER, GCP_POOL, "eks-oidc", kube.issuer)
    pool = provider.rsplit("/providers/", 1)[0]
    for _, ns, sa, ann, _ in PODS:
        if GSA in ann:
            google.add_service_account(ann[GSA])
            google.grant_workload_identity_user(
                ann[GSA],
                f"principal://iam.googleapis.com/{pool}/subject/system:serviceaccount:{ns}:{sa}")
    dns.cleanup_stale()
    # stop() (with the other fakes) also removes the pods' /etc/netns files.
    demo.clouds["cluster-dns"] = dns.ClusterDns(demo.testbed.host_ip).start()
    return ["--gcp-workload-identity-provider", provider, "--gcp-project-id", GCP_PROJECT_ID,
            "--gcp-sts-url", google.url, "--gcp-iamcredentials-url", google.url]


def section_gce(demo: Demo, caller, host_network: bool) -> list[str]:
    """google-auth in the pod: default credentials, a token, an ID token; and
    whom Google saw."""
    google, cluster_dns = demo.clouds.get("google"), demo.clouds.get("cluster-dns")
    if google is None or cluster_dns is None:
        return []
    if host_network:
        return []  # node traffic is not intercepted (see whoami above)
    cluster_dns.configure_pod(caller)
    proc = caller.run([sys.executable, "-c", _GOOGLE_AUTH, ID_TOKEN_AUDIENCE], timeout=60)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [f"GCE google-auth did not run: {proc.stderr.strip()[-300:]}"]
    lines = [f"GCE google.auth.default() → {out.get('default', '-')}"]
    if "token" in out:
        lines.append(f"    refresh() → {out['token'][:14]}… as {out['email']}, "
                     f"expires {out['expiry']}")
        lines.append(f"    Google sees {google.principal_of(out['token'])}")
    if "id_token" in out:
        import jwt

        claims = jwt.decode(out["id_token"], options={"verify_signature": False})
        lines.append(f"    fetch_id_token() → JWT aud={claims.get('aud')} "
                     f"email={claims.get('email')}")
    if "error" in out:
        lines.append("    " + textwrap.shorten(out["error"], 400))
    return lines


SECTIONS = [("whoami", section_whoami), ("gce", section_gce), ("imds", section_imds)]


def start_clouds(demo: Demo) -> list[str]:
    """Start the cloud fakes that exist; return extra metabridge flags."""
    args: list[str] = []
    try:
        from support.fake_google import FakeGoogle
        demo.clouds["google"] = FakeGoogle().start()
        args += gce_flags(demo, demo.clouds["google"])
    except ImportError:
        pass
    try:
        from support.fake_aws import FakeAwsSts
        demo.clouds["aws"] = FakeAwsSts().start()
        args += imds_flags(demo, demo.clouds["aws"])
    except ImportError:
        pass
    return args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the work directory with metabridge's log")
    opts = parser.parse_args()

    try:
        netns.check_environment()
    except netns.TestbedError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    netns.cleanup_stale()

    from support.fake_kube import FakeKube

    workdir = Path(tempfile.mkdtemp(prefix="metabridge-demo-"))
    kube = node = tb = None
    demo = None
    ok = False
    try:
        node = netns.Node()
        kube = FakeKube().start()
        kube.add_node(node.name, addresses=[node.host_ip])
        tb = Testbed(kube, node, workdir)
        demo = Demo(tb)
        extra = start_clouds(demo)

        print(f"node {node.name}: node IP {node.host_ip}, pods are network namespaces "
              f"behind {node.interface_pattern} veths")
        print(f"  fake kube-apiserver  {kube.url}")
        for name, fake in demo.clouds.items():
            print(f"  fake {name:<15} {fake.url}")

        for name, ns, sa, ann, host_network in PODS:
            if host_network:
                caller = tb.add_host_network_pod(name, ns, sa, ann)
                where = f"hostNetwork, {caller.ip}"
            else:
                caller = tb.add_pod(name, ns, sa, ann)
                where = f"netns {caller.netns}, {caller.ip}"
            demo.callers.append((f"{ns}/{name}", caller, host_network, where, sa, ann))

        stranger = tb.add_pod("stranger", register=False)
        demo.callers.append(("(no pod in the cluster)", stranger, False,
                             f"netns {stranger.netns}, {stranger.ip}", "-", {}))

        demo.metabridge = tb.start_metabridge(*extra)
        print(f"\nmetabridge is ready (listen {demo.metabridge.listen}); its rules:")
        for line in netns.nat_rules("PREROUTING"):
            if node.chain in line:
                print(f"  {line}")
        for line in netns.nat_rules(node.chain):
            if line.startswith("-A"):
                print(f"  {line}")

        for label, caller, host_network, where, sa, ann in demo.callers:
            print(f"\n{label}  ({where}; serviceAccount {sa}"
                  f"{', ' + ', '.join(f'{k}={v}' for k, v in ann.items()) if ann else ''})")
            for title, fn in SECTIONS:
                for line in fn(demo, caller, host_network):
                    print(textwrap.indent(line, "  "))

        code = demo.metabridge.stop()
        left = [line for line in netns.nat_rules() if node.chain in line]
        print(f"\nmetabridge stopped (exit {code}); rules left behind: {len(left)}")
        ok = code == 0 and not left
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        if tb is not None:
            if not ok:
                for mb in tb.daemons:
                    print(f"\n--- {mb.name} log (last lines) ---\n{mb.log_tail(40)}",
                          file=sys.stderr)
            tb.close()
        if demo is not None:
            for fake in demo.clouds.values():
                fake.stop()
        if kube is not None:
            kube.stop()
        if node is not None:
            node.close()
        if not opts.keep_logs:
            for p in sorted(workdir.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            workdir.rmdir()
        else:
            print(f"logs kept in {workdir}")
    print("torn down: namespaces, links, rules and fakes removed" if ok else "demo failed")
    return 0 if ok else 1


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
