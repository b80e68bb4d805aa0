"""Self-tests of the fake kube-apiserver (tests/support/fake_kube.py).

Everything goes over real HTTP, the way kube-rs talks to it.
Run: cd /work/main && python -m pytest tests/support_tests/test_fake_kube.py -q
"""

from __future__ import annotations

import base64
import http.client
import json
import queue
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import jwt
import pytest
import requests
from requests.structures import CaseInsensitiveDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.fake_kube import FakeKube  # noqa: E402

TOKEN = "fake-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def kube():
    k = FakeKube()
    k.bookmark_interval = 0.2
    k.start()
    try:
        yield k
    finally:
        k.stop()


def get(kube, path, headers=None, **kw):
    h = dict(AUTH)
    h.update(headers or {})
    return requests.get(kube.url + path, headers=h, timeout=10, **kw)


def post_token(kube, ns, sa, body, headers=None):
    h = dict(AUTH)
    h.update(headers or {})
    return requests.post(f"{kube.url}/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token?",
                         data=json.dumps(body), headers={**h, "Content-Type": "application/json"}, timeout=10)


def names(resp):
    assert resp.status_code == 200, resp.text
    return [i["metadata"]["name"] for i in resp.json()["items"]]


class Stream:
    """A watch stream over a raw socket; the chunked framing is parsed strictly
    on a background thread and events are queued line by line."""

    def __init__(self, kube, path, headers=None):
        h = {"Host": "fake-kube", **AUTH, **(headers or {})}
        self.sock = socket.create_connection(("127.0.0.1", kube.port), timeout=30)
        self.sock.sendall((f"GET {path} HTTP/1.1\r\n"
                           + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode())
        self.f = self.sock.makefile("rb")
        self.status = int(self.f.readline().split()[1])
        self.headers = CaseInsensitiveDict()
        while True:
            line = self.f.readline().decode().rstrip("\r\n")
            if not line:
                break
            k, _, v = line.partition(":")
            self.headers[k.strip()] = v.strip()
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.done = threading.Event()
        self.error = None  # set when the stream was cut instead of ended cleanly
        assert self.headers.get("Transfer-Encoding") == "chunked", (self.status, dict(self.headers))
        assert "Content-Length" not in self.headers
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        buf = b""
        try:
            while True:
                size_line = self.f.readline()
                if not size_line:
                    raise EOFError("stream cut before the terminating chunk")
                size = int(size_line.strip(), 16)
                if size == 0:
                    assert self.f.readline() == b"\r\n"
                    return
                data = self.f.read(size)
                assert len(data) == size and self.f.readline() == b"\r\n", "bad chunk framing"
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line:
                        self.events.put(json.loads(line))
        except Exception as e:
            self.error = e
        finally:
            self.done.set()

    def next(self, timeout=5.0, skip_bookmarks=True) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no watch event in time")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                raise AssertionError("no watch event in time") from None
            if skip_bookmarks and ev["type"] == "BOOKMARK":
                continue
            return ev

    def no_event(self, wait=0.5, skip_bookmarks=True):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return
            if not (skip_bookmarks and ev["type"] == "BOOKMARK"):
                raise AssertionError(f"unexpected event {ev['type']} {ev['object']['metadata']}")

    def wait_end(self, timeout=5.0) -> bool:
        return self.done.wait(timeout)

    def close(self):
        # NB: shutdown() unblocks the reader thread; closing the buffered file
        # from here would wait for its lock instead.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.done.wait(2)
        self.sock.close()


def pod_ev(ev):
    return ev["type"], ev["object"]["metadata"]["name"]


def cluster(kube):
    kube.add_node("node-a", addresses=["10.0.0.1"])
    kube.add_node("node-b", addresses=["10.0.0.2"])
    kube.add_service_account("apps", "runner", annotations={"iam.gke.io/gcp-service-account": "x@p.iam.gserviceaccount.com"})
    kube.add_service_account("apps", "default")
    kube.add_pod("apps", "web", node="node-a", ips=["10.1.0.5", "fd00::5"], service_account="runner",
                 labels={"app": "web", "tier": "front"})
    kube.add_pod("apps", "v6first", node="node-a", ips=["fd00::6", "10.1.0.6"])
    kube.add_pod("apps", "agent", node="node-a", host_network=True, labels={"app": "agent"})
    kube.add_pod("kube-system", "dns", node="node-b", ips=["10.1.1.9"], labels={"app": "dns"})
    kube.add_pod("apps", "done", node="node-b", ips=["10.1.1.10"], phase="Succeeded")


# -- discovery, auth, availability ----------------------------------------------


def test_discovery_is_anonymous_and_describes_the_jwks(kube):
    r = requests.get(kube.url + "/.well-known/openid-configuration", timeout=5)
    assert r.status_code == 200
    assert "max-age=3600" in r.headers["Cache-Control"]
    assert r.json() == {
        "issuer": kube.issuer,
        "jwks_uri": kube.jwks_url,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    assert kube.issuer == kube.url and kube.jwks_url == kube.url + "/openid/v1/jwks"
    j = requests.get(kube.jwks_url, timeout=5)
    assert j.status_code == 200 and "max-age=3600" in j.headers["Cache-Control"]
    (key,) = j.json()["keys"]
    assert set(key) == {"use", "kty", "kid", "alg", "n", "e"}
    assert (key["use"], key["kty"], key["alg"], key["e"]) == ("sig", "RSA", "RS256", "AQAB")


def test_discovery_under_an_issuer_path():
    with FakeKube(issuer="https://oidc.example.com/id/ABC") as k:
        r = requests.get(k.url + "/id/ABC/.well-known/openid-configuration", timeout=5)
        assert r.status_code == 200 and r.json()["issuer"] == "https://oidc.example.com/id/ABC"
        assert requests.get(k.url + "/.well-known/openid-configuration", timeout=5).json()["jwks_uri"] == k.jwks_url


def test_auth_is_required_and_failures_are_401_status(kube):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = requests.get(kube.url + "/api/v1/pods", headers=headers, timeout=5)
        assert r.status_code == 401
        assert r.json() == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    # A wrong token fails even on the anonymous paths (authentication runs first).
    r = requests.get(kube.url + "/openid/v1/jwks", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert r.status_code == 401
    assert requests.post(kube.url + "/api/v1/namespaces/a/serviceaccounts/b/token", data="{}",
                         timeout=5).status_code == 401
    assert get(kube, "/api/v1/pods").status_code == 200
    assert get(kube, "/api/v1/pods", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert kube.token_requests == []  # unauthenticated requests never reach the registry


def test_set_unavailable_answers_503_everywhere_and_cuts_watches(kube):
    w = Stream(kube, "/api/v1/pods?watch=true&resourceVersion=0")
    assert w.status == 200
    kube.set_unavailable(True)
    assert w.wait_end(3), "open watch should be cut"
    assert isinstance(w.error, EOFError)  # cut mid-stream, like a dropped connection
    for path in ("/api/v1/pods", "/version", "/.well-known/openid-configuration"):
        r = get(kube, path)
        assert r.status_code == 503
        body = r.json()
        assert (body["kind"], body["reason"], body["code"]) == ("Status", "ServiceUnavailable", 503)
    kube.set_unavailable(False)
    assert get(kube, "/api/v1/pods").status_code == 200
    assert ("GET", "/version") in kube.request_log


def test_unknown_paths_and_methods(kube):
    r = get(kube, "/api/v1/configmaps")
    assert r.status_code == 404
    assert r.json()["reason"] == "NotFound" and r.json()["kind"] == "Status"
    assert get(kube, "/apis/apps/v1/deployments").status_code == 404
    r = get(kube, "/nonsense")
    assert r.status_code == 404 and r.text == "404 page not found\n"
    r = requests.delete(kube.url + "/api/v1/namespaces/a/pods/b", headers=AUTH, timeout=5)
    assert r.status_code == 405 and r.json()["reason"] == "MethodNotAllowed"
    r = get(kube, "/api/v1/namespaces/a/serviceaccounts/b/token")
    assert r.status_code == 405
    v = get(kube, "/version")
    assert v.status_code == 200 and v.json()["major"] == "1"
    assert requests.get(kube.url + "/version", timeout=5).status_code == 200  # public info


def test_http11_framing_keepalive_and_content_length(kube):
    cluster(kube)
    conn = http.client.HTTPConnection("127.0.0.1", kube.port, timeout=5)
    for _ in range(2):  # two requests on one connection
        conn.request("GET", "/api/v1/nodes", headers=AUTH)
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200 and r.version == 11
        assert int(r.getheader("Content-Length")) == len(body)
        assert r.getheader("Content-Type") == "application/json"
    conn.close()

    s = socket.create_connection(("127.0.0.1", kube.port), timeout=5)
    s.sendall(b"GET /api/v1/pods?watch=true&timeoutSeconds=1 HTTP/1.1\r\nHost: x\r\n"
              b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = s.recv(65536)
        assert chunk, "connection closed before the terminating chunk"
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    # First chunk: hex size, CRLF, one JSON event ending in a newline.
    size_line, _, rest = body.partition(b"\r\n")
    size = int(size_line, 16)
    event = rest[:size]
    assert event.endswith(b"\n") and json.loads(event)["type"] == "ADDED"


# -- get / list / field selectors ------------------------------------------------


def test_get_returns_full_objects_and_404_status(kube):
    cluster(kube)
    r = get(kube, "/api/v1/namespaces/apps/pods/web")
    assert r.status_code == 200
    pod = r.json()
    assert (pod["kind"], pod["apiVersion"]) == ("Pod", "v1")
    meta = pod["metadata"]
    assert {"name", "namespace", "uid", "resourceVersion", "creationTimestamp", "labels"} <= set(meta)
    assert meta["resourceVersion"].isdigit() and meta["creationTimestamp"].endswith("Z")
    assert pod["spec"]["nodeName"] == "node-a" and pod["spec"]["serviceAccountName"] == "runner"
    assert "hostNetwork" not in pod["spec"]  # omitempty, like the real serializer
    st = pod["status"]
    assert st["phase"] == "Running" and st["podIP"] == "10.1.0.5" and st["hostIP"] == "10.0.0.1"
    assert st["podIPs"] == [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]

    agent = get(kube, "/api/v1/namespaces/apps/pods/agent").json()
    assert agent["spec"]["hostNetwork"] is True and agent["status"]["podIPs"] == [{"ip": "10.0.0.1"}]

    sa = get(kube, "/api/v1/namespaces/apps/serviceaccounts/runner").json()
    assert sa["kind"] == "ServiceAccount"
    assert sa["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "x@p.iam.gserviceaccount.com"}
    node = get(kube, "/api/v1/nodes/node-a").json()
    assert node["kind"] == "Node" and node["status"]["addresses"][0] == {"type": "InternalIP", "address": "10.0.0.1"}

    r = get(kube, "/api/v1/namespaces/apps/pods/nope")
    assert r.status_code == 404
    assert r.json() == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": 'pods "nope" not found', "reason": "NotFound",
                        "details": {"name": "nope", "kind": "pods"}, "code": 404}


def test_list_shape_and_field_selectors(kube):
    cluster(kube)
    r = get(kube, "/api/v1/pods")
    body = r.json()
    assert (body["kind"], body["apiVersion"]) == ("PodList", "v1")
    assert body["metadata"]["resourceVersion"] == kube.resource_version
    assert all("kind" not in i and "apiVersion" not in i for i in body["items"])
    assert names(r) == ["agent", "done", "v6first", "web", "dns"]  # etcd key order: ns/name

    def sel(s, path="/api/v1/pods"):
        return sorted(names(get(kube, path, params={"fieldSelector": s})))

    assert sel("spec.nodeName=node-a") == ["agent", "v6first", "web"]
    assert sel("spec.nodeName==node-b") == ["dns", "done"]
    assert sel("spec.nodeName!=node-a") == ["dns", "done"]
    assert sel("status.podIP=10.1.0.5") == ["web"]
    assert sel("status.podIP=fd00::5") == []            # second IP: not selectable
    assert sel("status.podIP=fd00::6") == ["v6first"]
    assert sel("status.podIP=10.1.0.6") == []
    assert sel("spec.nodeName=node-a,status.podIP=10.0.0.1") == ["agent"]
    assert sel("spec.hostNetwork=true") == ["agent"]
    assert sel("status.phase=Running,spec.nodeName=node-b") == ["dns"]
    assert sel("metadata.namespace=kube-system") == ["dns"]
    assert sel("metadata.name=web,metadata.namespace=apps") == ["web"]
    assert sel("spec.serviceAccountName=runner") == ["web"]
    assert sel("spec.restartPolicy=Always,spec.schedulerName=default-scheduler") == \
        ["agent", "dns", "done", "v6first", "web"]
    assert sel("status.nominatedNodeName=") == ["agent", "dns", "done", "v6first", "web"]
    assert sel("spec.host=node-b") == ["dns", "done"]   # legacy alias
    assert sel("spec.nodeName=node-a", "/api/v1/namespaces/kube-system/pods") == []

    r = get(kube, "/api/v1/pods", params={"fieldSelector": "status.hostIP=10.0.0.1"})
    assert r.status_code == 400
    assert r.json() == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "field label not supported: status.hostIP", "reason": "BadRequest",
                        "code": 400}
    r = get(kube, "/api/v1/serviceaccounts", params={"fieldSelector": "spec.nodeName=x"})
    assert r.status_code == 400
    assert r.json()["message"] == '"spec.nodeName" is not a known field selector: only "metadata.name", "metadata.namespace"'
    assert sel("metadata.namespace=apps", "/api/v1/serviceaccounts") == ["default", "runner"]
    assert sel("metadata.name=node-b", "/api/v1/nodes") == ["node-b"]
    r = get(kube, "/api/v1/nodes", params={"fieldSelector": "metadata.namespace="})
    assert r.status_code == 400 and r.json()["message"] == "field label not supported: metadata.namespace"
    assert get(kube, "/api/v1/pods", params={"fieldSelector": "garbage"}).status_code == 400

    def lsel(s):
        return sorted(names(get(kube, "/api/v1/pods", params={"labelSelector": s})))

    assert lsel("app=web") == ["web"]
    assert lsel("app!=web") == ["agent", "dns", "done", "v6first"]
    assert lsel("app in (dns,agent)") == ["agent", "dns"]
    assert lsel("tier") == ["web"]
    assert lsel("app,!tier") == ["agent", "dns"]
    assert ("GET", "/api/v1/pods?fieldSelector=status.podIP%3D10.1.0.5") in kube.request_log


def test_pagination_is_a_consistent_snapshot(kube):
    for i in range(5):
        kube.add_pod("ns", f"p{i}", node="n", ips=[f"10.2.0.{i}"])
    r = get(kube, "/api/v1/pods", params={"limit": 2}).json()
    rv = r["metadata"]["resourceVersion"]
    assert [i["metadata"]["name"] for i in r["items"]] == ["p0", "p1"]
    assert r["metadata"]["remainingItemCount"] == 3
    kube.add_pod("ns", "p10", node="n")          # after the snapshot: not in this list
    kube.delete_pod("ns", "p3")                  # deleted after the snapshot: still listed
    seen = [i["metadata"]["name"] for i in r["items"]]
    token = r["metadata"]["continue"]
    pages = 1
    while token:
        r = get(kube, "/api/v1/pods", params={"limit": 2, "continue": token}).json()
        assert r["metadata"]["resourceVersion"] == rv
        seen += [i["metadata"]["name"] for i in r["items"]]
        token = r["metadata"].get("continue")
        pages += 1
    assert seen == ["p0", "p1", "p2", "p3", "p4"] and pages == 3
    assert sorted(names(get(kube, "/api/v1/pods"))) == ["p0", "p1", "p10", "p2", "p4"]

    # Selectors page over matching items; no remainingItemCount with selectors.
    r = get(kube, "/api/v1/pods", params={"limit": 1, "fieldSelector": "status.podIP=10.2.0.4"}).json()
    assert [i["metadata"]["name"] for i in r["items"]] == ["p4"] and "continue" not in r["metadata"]

    r = get(kube, "/api/v1/pods", params={"limit": 2}).json()
    token = r["metadata"]["continue"]
    bad = get(kube, "/api/v1/pods", params={"limit": 2, "continue": token, "resourceVersion": "5"})
    assert bad.status_code == 400
    assert bad.json()["message"] == "specifying resource version is not allowed when using continue"
    kube.compact()
    gone = get(kube, "/api/v1/pods", params={"limit": 2, "continue": token})
    assert gone.status_code == 410
    assert gone.json()["reason"] == "Expired" and gone.json()["message"].startswith(
        "The provided continue parameter is too old")
    assert get(kube, "/api/v1/pods", params={"limit": 2, "continue": "!!notatoken"}).status_code == 400


def test_list_resource_version_semantics(kube):
    kube.add_pod("ns", "a", node="n", ips=["10.3.0.1"])
    rv = int(get(kube, "/api/v1/pods").json()["metadata"]["resourceVersion"])
    kube.update_pod("ns", "a", ips=["10.3.0.2"])
    kube.add_pod("ns", "b", node="n")

    exact = get(kube, "/api/v1/pods", params={"resourceVersion": rv, "resourceVersionMatch": "Exact"}).json()
    assert exact["metadata"]["resourceVersion"] == str(rv)
    assert [(i["metadata"]["name"], i["status"]["podIP"]) for i in exact["items"]] == [("a", "10.3.0.1")]

    newer = get(kube, "/api/v1/pods", params={"resourceVersion": rv, "resourceVersionMatch": "NotOlderThan"}).json()
    assert int(newer["metadata"]["resourceVersion"]) > rv and len(newer["items"]) == 2
    assert len(get(kube, "/api/v1/pods", params={"resourceVersion": "0"}).json()["items"]) == 2

    r = get(kube, "/api/v1/pods", params={"resourceVersionMatch": "Exact"})
    assert r.status_code == 422
    body = r.json()
    assert body["reason"] == "Invalid" and body["message"] == (
        'ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: Forbidden: '
        "resourceVersionMatch is forbidden unless resourceVersion is provided")
    assert body["details"]["causes"][0]["reason"] == "FieldValueForbidden"
    assert get(kube, "/api/v1/pods", params={"sendInitialEvents": "true"}).status_code == 422

    kube.compact()
    r = get(kube, "/api/v1/pods", params={"resourceVersion": rv, "resourceVersionMatch": "Exact"})
    assert r.status_code == 410
    assert r.json()["message"] == "The resourceVersion for the provided list is too old."

    kube.too_large_rv_wait = 0.2
    future = int(kube.resource_version) + 10
    r = get(kube, "/api/v1/pods", params={"resourceVersion": future, "resourceVersionMatch": "NotOlderThan"})
    assert r.status_code == 504
    assert r.json()["message"] == f"Timeout: Too large resource version: {future}, current: {kube.resource_version}"
    assert r.json()["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"


def test_metadata_only_requests(kube):
    cluster(kube)
    h = {"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"}
    body = get(kube, "/api/v1/namespaces/apps/serviceaccounts", headers=h).json()
    assert body["kind"] == "PartialObjectMetadataList"
    assert {i["kind"] for i in body["items"]} == {"PartialObjectMetadata"}
    assert all(set(i) == {"kind", "apiVersion", "metadata"} for i in body["items"])
    one = get(kube, "/api/v1/namespaces/apps/pods/web",
              headers={"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"}).json()
    assert one["kind"] == "PartialObjectMetadata" and "spec" not in one


# -- watch ------------------------------------------------------------------------


def test_watch_from_resource_version_sees_events_in_order(kube):
    kube.add_service_account("apps", "default")
    rv = get(kube, "/api/v1/pods").json()["metadata"]["resourceVersion"]
    kube.add_pod("apps", "a", node="node-a", ips=["10.4.0.1"])  # before the watch, after rv
    w = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dnode-a")
    assert w.status == 200 and w.headers["Content-Type"] == "application/json"
    kube.update_pod("apps", "a", phase="Running", ips=["10.4.0.2"])
    kube.mark_pod_deleting("apps", "a")
    kube.add_pod("apps", "elsewhere", node="node-b")               # filtered out
    kube.delete_pod("apps", "a")

    evs = [w.next() for _ in range(4)]
    assert [pod_ev(e) for e in evs] == [("ADDED", "a"), ("MODIFIED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in evs]
    assert rvs == sorted(rvs) and len(set(rvs)) == 4 and rvs[0] > int(rv)
    assert all(e["object"]["kind"] == "Pod" and e["object"]["apiVersion"] == "v1" for e in evs)
    assert evs[1]["object"]["status"]["podIP"] == "10.4.0.2"
    assert "deletionTimestamp" in evs[2]["object"]["metadata"]
    assert evs[2]["object"]["metadata"]["deletionGracePeriodSeconds"] == 30
    assert "deletionTimestamp" in evs[3]["object"]["metadata"]      # last state, new RV
    w.no_event(0.3)
    w.close()
    assert any("fieldSelector=spec.nodeName%3Dnode-a" in p for _, p in kube.request_log)


def test_watch_without_resource_version_starts_with_current_state(kube):
    kube.add_pod("apps", "one", node="node-a", ips=["10.5.0.1"])
    kube.add_pod("apps", "two", node="node-a", ips=["10.5.0.2"])
    for rv in ("", "&resourceVersion=0"):
        w = Stream(kube, f"/api/v1/namespaces/apps/pods?watch=1{rv}")
        assert sorted([pod_ev(w.next()), pod_ev(w.next())]) == [("ADDED", "one"), ("ADDED", "two")]
        w.no_event(0.3)
        w.close()


def test_watch_field_selector_transitions_yield_added_and_deleted(kube):
    kube.add_pod("apps", "mover", node="node-a", ips=["10.6.0.1"])
    rv = kube.resource_version
    wa = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dnode-a")
    wb = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dnode-b")
    wr = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={rv}&fieldSelector=status.phase%3DRunning")
    kube.update_pod("apps", "mover", node="node-b")
    ev = wa.next()
    assert pod_ev(ev) == ("DELETED", "mover")
    # Old content, new resourceVersion (cacheWatcher semantics).
    assert ev["object"]["spec"]["nodeName"] == "node-a"
    assert ev["object"]["metadata"]["resourceVersion"] == kube.resource_version
    assert pod_ev(wb.next()) == ("ADDED", "mover")
    assert pod_ev(wr.next()) == ("MODIFIED", "mover")
    kube.update_pod("apps", "mover", phase="Succeeded")
    assert pod_ev(wb.next()) == ("MODIFIED", "mover")
    assert pod_ev(wr.next()) == ("DELETED", "mover")
    wa.no_event(0.2)
    for w in (wa, wb, wr):
        w.close()


def test_watch_single_object_path(kube):
    kube.add_pod("apps", "one", node="n", ips="10.7.0.1")
    kube.add_pod("apps", "two", node="n", ips=["10.7.0.2"])
    w = Stream(kube, "/api/v1/namespaces/apps/pods/one?watch=true")
    assert pod_ev(w.next()) == ("ADDED", "one")
    kube.update_pod("apps", "two", phase="Failed")
    kube.update_pod("apps", "one", phase="Failed")
    ev = w.next()
    assert pod_ev(ev) == ("MODIFIED", "one") and ev["object"]["status"]["phase"] == "Failed"
    w.close()


def test_watch_bookmarks_and_timeout(kube):
    kube.bookmark_interval = 0.2
    rv = kube.resource_version
    w = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2")
    start = time.monotonic()
    first = w.next(skip_bookmarks=False)
    assert first == {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                                     "metadata": {"resourceVersion": rv}}}
    kube.add_pod("apps", "x", node="n")
    ev = w.next()
    assert pod_ev(ev) == ("ADDED", "x")
    assert w.wait_end(4), "timeoutSeconds must end the stream"
    elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 3.5 and w.error is None
    rest = []
    while not w.events.empty():
        rest.append(w.events.get())
    assert rest and rest[-1]["type"] == "BOOKMARK"                 # one right before the close
    assert rest[-1]["object"]["metadata"]["resourceVersion"] == ev["object"]["metadata"]["resourceVersion"]

    assert get(kube, "/api/v1/pods?watch=true&resourceVersion=abc").status_code == 400
    kube.too_large_rv_wait = 0.2
    future = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={int(kube.resource_version) + 5}")
    err = future.next(skip_bookmarks=False)
    assert err["type"] == "ERROR" and err["object"]["code"] == 504 and err["object"]["reason"] == "Timeout"
    assert future.wait_end(2)

    # No bookmarks unless asked for.
    w2 = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={kube.resource_version}&timeoutSeconds=1")
    assert w2.wait_end(3)
    assert w2.events.empty()


def test_watch_send_initial_events_ends_with_annotated_bookmark(kube):
    kube.add_service_account("a", "one")
    kube.add_service_account("b", "two")
    w = Stream(kube, "/api/v1/serviceaccounts?watch=true&sendInitialEvents=true"
                     "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&resourceVersion=")
    assert [pod_ev(w.next()) for _ in range(2)] == [("ADDED", "one"), ("ADDED", "two")]
    bm = w.next(skip_bookmarks=False)
    assert bm["type"] == "BOOKMARK" and bm["object"]["kind"] == "ServiceAccount"
    assert bm["object"]["metadata"] == {"resourceVersion": kube.resource_version,
                                        "annotations": {"k8s.io/initial-events-end": "true"}}
    kube.update_service_account("a", "one", {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"})
    ev = w.next()
    assert pod_ev(ev) == ("MODIFIED", "one")
    assert ev["object"]["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}
    kube.delete_service_account("b", "two")
    assert pod_ev(w.next()) == ("DELETED", "two")
    w.close()
    r = get(kube, "/api/v1/serviceaccounts?watch=true&sendInitialEvents=true")
    assert r.status_code == 422 and "sendInitialEvents requires setting resourceVersionMatch" in r.json()["message"]


def test_watch_from_compacted_resource_version_is_410(kube):
    rv = get(kube, "/api/v1/pods").json()["metadata"]["resourceVersion"]
    ok = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={rv}")
    ok.no_event(0.2)
    kube.compact()
    w = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true")
    assert w.status == 200
    ev = w.next(skip_bookmarks=False)
    assert ev == {"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {rv} ({kube.resource_version})",
        "reason": "Expired", "code": 410}}
    assert w.wait_end(2) and w.events.empty()
    # A fresh list gives a usable resourceVersion again.
    rv2 = get(kube, "/api/v1/pods").json()["metadata"]["resourceVersion"]
    w2 = Stream(kube, f"/api/v1/pods?watch=true&resourceVersion={rv2}")
    kube.add_pod("apps", "after", node="n")
    assert pod_ev(w2.next()) == ("ADDED", "after")
    # The watch opened before compaction keeps streaming.
    assert pod_ev(ok.next()) == ("ADDED", "after")
    w2.close()
    ok.close()


def test_close_watches_ends_streams_cleanly(kube):
    streams = [Stream(kube, "/api/v1/pods?watch=true"), Stream(kube, "/api/v1/serviceaccounts?watch=true")]
    time.sleep(0.1)
    kube.close_watches()
    for s in streams:
        assert s.wait_end(2)
        assert s.error is None  # a clean end of the chunked body, not a cut
    w = Stream(kube, "/api/v1/pods?watch=true")
    kube.add_pod("apps", "new", node="n")
    assert pod_ev(w.next()) == ("ADDED", "new")
    w.close()


def test_stop_closes_everything_promptly():
    k = FakeKube().start()
    w = Stream(k, "/api/v1/pods?watch=true")
    idle = http.client.HTTPConnection("127.0.0.1", k.port, timeout=5)
    idle.request("GET", "/version")
    idle.getresponse().read()
    start = time.monotonic()
    k.stop()
    assert time.monotonic() - start < 2
    assert w.wait_end(2)
    assert idle.sock.recv(1) == b""  # idle keep-alive connections are closed too
    with pytest.raises(requests.ConnectionError):
        requests.get(k.url + "/version", timeout=2)


# -- TokenRequest ---------------------------------------------------------------


def token_cluster(kube):
    kube.add_node("node-a", addresses=["10.0.0.1"])
    sa = kube.add_service_account("apps", "runner")
    pod = kube.add_pod("apps", "web", node="node-a", ips=["10.1.0.5"], service_account="runner")
    return sa, pod


def test_token_request_success_claims_and_signature(kube):
    sa, pod = token_cluster(kube)
    node_uid = get(kube, "/api/v1/nodes/node-a").json()["metadata"]["uid"]
    ref = {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": pod["metadata"]["uid"]}
    req = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
           "spec": {"audiences": ["sts.amazonaws.com"], "expirationSeconds": 1200, "boundObjectRef": ref}}
    before = int(time.time())
    r = post_token(kube, "apps", "runner", req)
    assert r.status_code == 201, r.text
    out = r.json()
    assert (out["kind"], out["apiVersion"]) == ("TokenRequest", "authentication.k8s.io/v1")
    assert out["metadata"]["name"] == "runner" and out["metadata"]["namespace"] == "apps"
    assert out["spec"] == {"audiences": ["sts.amazonaws.com"], "expirationSeconds": 1200, "boundObjectRef": ref}
    token = out["status"]["token"]

    # Verify with the JWKS actually served, as a relying party (AWS, Google STS) would.
    signing_key = jwt.PyJWKClient(kube.jwks_url).get_signing_key_from_jwt(token)
    claims = jwt.decode(token, signing_key.key, algorithms=["RS256"], audience="sts.amazonaws.com",
                        issuer=kube.issuer)
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": signing_key.key_id}
    assert set(claims) == {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "kubernetes.io"}
    assert claims["sub"] == "system:serviceaccount:apps:runner"
    assert claims["aud"] == ["sts.amazonaws.com"]
    assert claims["iat"] == claims["nbf"] and before <= claims["iat"] <= time.time()
    assert claims["exp"] - claims["iat"] == 1200
    assert uuid.UUID(claims["jti"]).version == 4
    assert claims["kubernetes.io"] == {
        "namespace": "apps",
        "serviceaccount": {"name": "runner", "uid": sa["metadata"]["uid"]},
        "pod": {"name": "web", "uid": pod["metadata"]["uid"]},
        "node": {"name": "node-a", "uid": node_uid},
    }
    exp_ts = out["status"]["expirationTimestamp"]
    assert exp_ts == datetime.fromtimestamp(claims["exp"], tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert kube.verify_token(token, "sts.amazonaws.com")["sub"] == claims["sub"]
    with pytest.raises(jwt.InvalidAudienceError):
        kube.verify_token(token, "someone-else")

    (rec,) = kube.token_requests
    assert {k: rec[k] for k in ("namespace", "service_account", "audiences", "expiration_seconds",
                                "bound_object_ref", "status_code")} == {
        "namespace": "apps", "service_account": "runner", "audiences": ["sts.amazonaws.com"],
        "expiration_seconds": 1200, "bound_object_ref": ref, "status_code": 201}
    assert ("POST", "/api/v1/namespaces/apps/serviceaccounts/runner/token") in kube.request_log


def test_token_request_defaults_and_node_without_object(kube):
    kube.add_service_account("apps", "default")
    pod = kube.add_pod("apps", "p", node="ghost-node", ips=["10.1.0.9"])
    r = post_token(kube, "apps", "default", {"spec": {"boundObjectRef": {
        "kind": "Pod", "apiVersion": "v1", "name": "p"}}})
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["spec"]["expirationSeconds"] == 3600 and out["spec"]["audiences"] == [kube.issuer]
    claims = kube.verify_token(out["status"]["token"], kube.issuer)
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["kubernetes.io"]["node"] == {"name": "ghost-node"}
    assert claims["kubernetes.io"]["pod"]["uid"] == pod["metadata"]["uid"]
    # Unbound: no pod/node claims.
    r = post_token(kube, "apps", "default", {"spec": {"audiences": ["a", "b"]}})
    claims = kube.verify_token(r.json()["status"]["token"], "b")
    assert claims["aud"] == ["a", "b"] and set(claims["kubernetes.io"]) == {"namespace", "serviceaccount"}
    assert kube.token_requests[0]["audiences"] == [] and kube.token_requests[0]["expiration_seconds"] is None


def test_token_request_max_expiration_is_shortened_with_warning(kube):
    token_cluster(kube)
    kube.max_token_expiration_seconds = 900
    r = post_token(kube, "apps", "runner", {"spec": {"audiences": ["x"], "expirationSeconds": 7200}})
    assert r.status_code == 201
    assert r.headers["Warning"] == '299 - "requested expiration of 7200 seconds shortened to 900 seconds"'
    claims = kube.verify_token(r.json()["status"]["token"], "x")
    assert claims["exp"] - claims["iat"] == 900 and r.json()["spec"]["expirationSeconds"] == 900


@pytest.mark.parametrize("case", [
    "too_short", "too_long", "missing_sa", "missing_pod", "other_sa", "uid_mismatch", "bad_kind", "name_mismatch",
])
def test_token_request_errors(kube, case):
    _, pod = token_cluster(kube)
    kube.add_service_account("apps", "other")
    ref = {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": pod["metadata"]["uid"]}
    sa, body = "runner", {"spec": {"audiences": ["x"], "boundObjectRef": ref}}
    expect: dict = {}
    if case == "too_short":
        body["spec"]["expirationSeconds"] = 599
        expect = {"code": 422, "reason": "Invalid", "message":
                  'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: '
                  "Invalid value: 599: may not specify a duration less than 10 minutes",
                  "details": {"group": "authentication.k8s.io", "kind": "TokenRequest", "causes": [{
                      "reason": "FieldValueInvalid", "field": "spec.expirationSeconds",
                      "message": "Invalid value: 599: may not specify a duration less than 10 minutes"}]}}
    elif case == "too_long":
        body["spec"]["expirationSeconds"] = 2**32 + 1
        expect = {"code": 422, "reason": "Invalid", "message":
                  'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: '
                  f"Invalid value: {2**32 + 1}: may not specify a duration larger than 2^32 seconds"}
    elif case == "missing_sa":
        sa = "ghost"
        body["spec"]["expirationSeconds"] = 1  # the lookup fails before validation
        expect = {"code": 404, "reason": "NotFound", "message": 'serviceaccounts "ghost" not found',
                  "details": {"name": "ghost", "kind": "serviceaccounts"}}
    elif case == "missing_pod":
        ref["name"] = "gone"
        expect = {"code": 404, "reason": "NotFound", "message": 'pods "gone" not found',
                  "details": {"name": "gone", "kind": "pods"}}
    elif case == "other_sa":
        sa = "other"
        expect = {"code": 400, "reason": "BadRequest", "message":
                  'cannot bind token for serviceaccount "other" to pod running with different serviceaccount name.'}
    elif case == "uid_mismatch":
        ref["uid"] = "00000000-0000-0000-0000-000000000000"
        expect = {"code": 409, "reason": "Conflict", "message":
                  'Operation cannot be fulfilled on Pod "web": the UID in the bound object reference '
                  "(00000000-0000-0000-0000-000000000000) does not match the UID in record. "
                  "The object might have been deleted and then recreated",
                  "details": {"name": "web", "kind": "Pod"}}
    elif case == "bad_kind":
        ref["kind"] = "ConfigMap"
        expect = {"code": 400, "reason": "BadRequest",
                  "message": "cannot bind token to object of type /v1, Kind=ConfigMap"}
    elif case == "name_mismatch":
        body["metadata"] = {"name": "someone-else"}
        expect = {"code": 422, "reason": "Invalid", "message":
                  'TokenRequest.authentication.k8s.io "runner" is invalid: metadata.name: '
                  'Invalid value: "someone-else": must match the service account name if specified'}

    r = post_token(kube, "apps", sa, body)
    assert r.status_code == expect["code"], r.text
    st = r.json()
    assert (st["kind"], st["apiVersion"], st["status"], st["metadata"]) == ("Status", "v1", "Failure", {})
    assert st["code"] == expect["code"] and st["reason"] == expect["reason"]
    assert st["message"] == expect["message"]
    if "details" in expect:
        assert st["details"] == expect["details"]
    assert kube.token_requests[-1]["status_code"] == expect["code"]
    assert "token" not in kube.token_requests[-1]


def test_fail_token_requests_injects_then_recovers(kube):
    token_cluster(kube)
    kube.fail_token_requests(500, count=2)
    kube.fail_token_requests(403)
    codes = [post_token(kube, "apps", "runner", {"spec": {"audiences": ["x"]}}) for _ in range(4)]
    assert [r.status_code for r in codes] == [500, 500, 403, 201]
    assert codes[0].json()["reason"] == "InternalError"
    assert codes[2].json()["reason"] == "Forbidden" and "serviceaccounts/token" in codes[2].json()["message"]
    assert [t["status_code"] for t in kube.token_requests] == [500, 500, 403, 201]
    kube.fail_token_requests(429)
    r = post_token(kube, "apps", "runner", {"spec": {"audiences": ["x"]}})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"


def test_sign_and_verify_roundtrip_and_tamper(kube):
    now = int(time.time())
    tok = kube.sign_jwt({"iss": kube.issuer, "sub": "s", "aud": ["a"], "iat": now, "nbf": now, "exp": now + 60})
    assert kube.verify_token(tok, "a")["sub"] == "s"
    head, payload, sig = tok.split(".")
    forged = base64.urlsafe_b64encode(json.dumps(
        {"iss": kube.issuer, "sub": "root", "aud": ["a"], "iat": now, "nbf": now, "exp": now + 60}).encode()
    ).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        kube.verify_token(f"{head}.{forged}.{sig}", "a")
    expired = kube.sign_jwt({"iss": kube.issuer, "sub": "s", "aud": ["a"], "iat": now - 100, "nbf": now - 100,
                             "exp": now - 50})
    with pytest.raises(jwt.ExpiredSignatureError):
        kube.verify_token(expired, "a")
    with FakeKube() as other:  # a different cluster's key is rejected
        with pytest.raises(jwt.InvalidTokenError):
            other.verify_token(tok, "a")


def test_write_kubeconfig(kube, tmp_path):
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    cfg = json.loads(Path(path).read_text())
    ctx = next(c for c in cfg["contexts"] if c["name"] == cfg["current-context"])["context"]
    cluster_ = next(c for c in cfg["clusters"] if c["name"] == ctx["cluster"])["cluster"]
    user = next(u for u in cfg["users"] if u["name"] == ctx["user"])["user"]
    assert cluster_["server"] == kube.url and user["token"] == TOKEN
    r = requests.get(cluster_["server"] + "/api/v1/nodes", headers={"Authorization": f"Bearer {user['token']}"},
                     timeout=5)
    assert r.status_code == 200 and r.json()["kind"] == "NodeList"


def test_concurrent_writes_tokens_and_watch_stay_consistent(kube):
    kube.add_service_account("load", "default")
    rv = kube.resource_version
    w = Stream(kube, f"/api/v1/namespaces/load/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true")
    errors = []

    def writer(i):
        try:
            kube.add_pod("load", f"p{i}", node="n", ips=[f"10.9.{i}.1"])
            kube.update_pod("load", f"p{i}", ips=[f"10.9.{i}.2"])
            r = post_token(kube, "load", "default", {"spec": {"audiences": ["x"], "boundObjectRef": {
                "kind": "Pod", "apiVersion": "v1", "name": f"p{i}"}}})
            assert r.status_code == 201, r.text
            kube.delete_pod("load", f"p{i}")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    evs = [w.next() for _ in range(36)]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in evs]
    assert rvs == sorted(rvs) and len(set(rvs)) == 36
    for i in range(12):
        assert [e["type"] for e in evs if e["object"]["metadata"]["name"] == f"p{i}"] == \
            ["ADDED", "MODIFIED", "DELETED"]
    w.no_event(0.3)
    assert len(kube.token_requests) == 12 and all(t["status_code"] == 201 for t in kube.token_requests)
    w.close()
