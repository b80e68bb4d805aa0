"""The whole simulated cluster of one test: FakeKube + a netns Node + metabridge.

    tb = Testbed(fake_kube, node, workdir)          # conftest's `testbed` fixture
    alice = tb.add_pod("alice", "team-a", "reader", {"iam.gke.io/gcp-service-account": "r@p.iam.gserviceaccount.com"})
    mb = tb.start_metabridge("--iptables-resync", "1s")   # started and ready
    tb.whoami(alice).json()["pod"] == "alice"
    tb.close()                                      # kills daemons, deletes pods

`add_pod` creates the network namespace **and** registers the pod in FakeKube
(Running, with the netns IP, on this node, with a fresh uid), creating or
updating its ServiceAccount. Everything made here is undone by `close()`, which
the fixture runs even when the test failed.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

from . import netns as _netns
from .metabridge import WHOAMI_PATH, Metabridge
from .netns import METADATA_IP, HostCaller, HttpResult, Node, Pod

METADATA_URL = f"http://{METADATA_IP}"


class Testbed:
    def __init__(self, fake_kube, node: Node, workdir: str | os.PathLike,
                 daemons: list | None = None):
        self.kube = fake_kube
        self.node = node
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = self.workdir / "kubeconfig"
        fake_kube.write_kubeconfig(str(self.kubeconfig))
        # Shared with conftest so that a failing test prints every daemon's log.
        self.daemons: list[Metabridge] = daemons if daemons is not None else []
        self.service_accounts: dict[tuple[str, str], dict] = {}
        self.kube_pods: dict[str, tuple[str, str]] = {}  # netns pod name -> (ns, name)
        self._closed = False

    @property
    def host_ip(self) -> str:
        return self.node.host_ip

    # -- cluster objects ------------------------------------------------------
    def ensure_service_account(self, namespace: str, name: str,
                               annotations: dict | None = None) -> None:
        """Create the SA, or update its annotations when they are given and differ."""
        key = (namespace, name)
        if key not in self.service_accounts:
            self.kube.add_service_account(namespace, name, annotations=dict(annotations or {}))
            self.service_accounts[key] = dict(annotations or {})
        elif annotations is not None and annotations != self.service_accounts[key]:
            self.update_service_account(namespace, name, annotations)

    def update_service_account(self, namespace: str, name: str, annotations: dict) -> None:
        self.kube.update_service_account(namespace, name, dict(annotations))
        self.service_accounts[(namespace, name)] = dict(annotations)

    def register_pod(self, pod: Pod | HostCaller, name: str, namespace: str = "default",
                     sa: str = "default", *, ips: Sequence[str] | None = None,
                     host_network: bool = False, phase: str = "Running",
                     uid: str | None = None) -> str:
        """Register (another) Kubernetes pod for a netns pod; returns its uid."""
        uid = uid or str(uuid.uuid4())
        self.kube.add_pod(namespace, name, node=self.node.name,
                          ips=tuple(ips if ips is not None else (pod.ip,)),
                          service_account=sa, host_network=host_network,
                          phase=phase, uid=uid)
        return uid

    def add_pod(self, name: str, namespace: str = "default", sa: str = "default",
                annotations: dict | None = None, *, ip: str | None = None,
                register: bool = True, host_network: bool = False,
                phase: str = "Running") -> Pod:
        """A netns pod registered in FakeKube as namespace/name with SA `sa`.

        ip: reuse a (deleted) pod's IP. register=False: network only (a caller
        the cluster does not know). The returned Pod gets .namespace,
        .service_account and .uid (None when not registered)."""
        pod = self.node.add_pod(f"{namespace}.{name}"[:40] if namespace else name, ip=ip)
        pod.kube_name, pod.namespace, pod.service_account, pod.uid = name, namespace, sa, None
        if register:
            self.ensure_service_account(namespace, sa, annotations)
            pod.uid = self.register_pod(pod, name, namespace, sa,
                                        host_network=host_network, phase=phase)
            self.kube_pods[pod.name] = (namespace, name)
        return pod

    def add_host_network_pod(self, name: str = "host-agent", namespace: str = "kube-system",
                             sa: str = "default", annotations: dict | None = None) -> HostCaller:
        """A hostNetwork pod: registered with the node IP, calls from the root namespace."""
        caller = self.node.host_caller()
        self.ensure_service_account(namespace, sa, annotations)
        caller.kube_name, caller.namespace, caller.service_account = name, namespace, sa
        caller.uid = self.register_pod(caller, name, namespace, sa,
                                       ips=(self.node.host_ip,), host_network=True)
        return caller

    def delete_pod(self, pod: Pod, *, kube: bool = True) -> None:
        """Delete the pod from FakeKube (unless kube=False) and its netns."""
        key = self.kube_pods.pop(pod.name, None)
        if kube and key:
            self.kube.delete_pod(*key)
        pod.delete()

    # -- metabridge -----------------------------------------------------------
    def metabridge(self, *extra_args: str, name: str | None = None, **kw) -> Metabridge:
        """A Metabridge for this node (not started), torn down with the testbed."""
        mb = Metabridge(self.node, self.kubeconfig, self.workdir,
                        extra_args=list(extra_args),
                        name=name or f"metabridge-{len(self.daemons) + 1}", **kw)
        self.daemons.append(mb)
        return mb

    def start_metabridge(self, *extra_args: str, wait: bool = True,
                         timeout: float = 30, **kw) -> Metabridge:
        mb = self.metabridge(*extra_args, **kw).start()
        if wait:
            mb.wait_ready(timeout)
        return mb

    # -- calls ----------------------------------------------------------------
    def whoami(self, caller: Pod | HostCaller, *, direct: Metabridge | None = None,
               timeout: float = 5) -> HttpResult:
        """GET whoami from caller: through 169.254.169.254 (the DNAT), or
        straight to a daemon's listener with direct=mb (for root-ns callers)."""
        base = direct.url if direct is not None else METADATA_URL
        return caller.http_get(base + WHOAMI_PATH, timeout=timeout)

    def metadata_get(self, caller: Pod | HostCaller, path: str, *,
                     headers: dict | None = None, timeout: float = 5,
                     method: str = "GET") -> HttpResult:
        return caller.http_get(METADATA_URL + path, headers=headers, timeout=timeout,
                               method=method)

    # -- teardown -------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for mb in self.daemons:
            mb.close()
        for pod in list(self.node.pods.values()):
            pod.delete()


def whoami_identity(result: HttpResult) -> tuple[str, str] | None:
    """(namespace, pod) of a successful whoami answer, else None."""
    if result.status != 200:
        return None
    body = result.json()
    return body.get("namespace"), body.get("pod")


__all__ = ["Testbed", "METADATA_URL", "whoami_identity", "_netns"]
