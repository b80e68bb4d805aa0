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


# Later: section_gce (GET /computeMetadata/v1/instance/service-accounts/default/token
# with Metadata-Flavor: Google) and section_imds (IMDSv2 token + role credentials),
# started with the cloud fakes' URLs in METABRIDGE_ARGS below.
SECTIONS = [("whoami", section_whoami)]


def start_clouds(demo: Demo) -> list[str]:
    """Start the cloud fakes that exist; return extra metabridge flags."""
    args: list[str] = []
    try:
        from support.fake_google import FakeGoogle
        demo.clouds["google"] = FakeGoogle().start()
    except ImportError:
        pass
    try:
        from support.fake_aws import FakeAwsSts
        demo.clouds["aws"] = FakeAwsSts().start()
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
