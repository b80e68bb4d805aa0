"""End-to-end: the GCE metadata API with real Google clients in pods (issue 3).

The real metabridge binary runs on a node in a box with the GCE API enabled
against the fake Google (STS, IAM Credentials, Cloud Storage; tests/support/
fake_google.py), which verifies each pod's bound Kubernetes token against the
fake kube-apiserver's JWKS for real. Pods are network namespaces that reach
169.254.169.254 only through metabridge's DNAT, and resolve
``metadata.google.internal`` the way the chart makes pods resolve it on EKS: a
cluster DNS answering from the chart's CoreDNS block (tests/support/dns.py),
or ``hostAliases`` in the pod's /etc/hosts.

Inside the pods run the unmodified clients, with a clean environment (no
GOOGLE_* / GCE_* variables, an empty HOME): python google-auth
(``google.auth.default()``, ``refresh``, ``id_token.fetch_id_token``) and
google-cloud-storage; plain HTTP (curl) for the protocol's details.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import textwrap
import time
import urllib.parse

import jwt
import pytest

from support import dns
from support.fake_google import SCOPE_CLOUD_PLATFORM
from support.netns import wait_for

GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
PROJECT_ID = "demo-project"
PROJECT_NUMBER = "314159265358"
POOL = "eks-pool"
FLAVOR = {"Metadata-Flavor": "Google"}
V1 = "/computeMetadata/v1"
METADATA_HOST = "metadata.google.internal"
DEFAULT_SA = f"{V1}/instance/service-accounts/default"


def gsa_email(name: str) -> str:
    return f"{name}@{PROJECT_ID}.iam.gserviceaccount.com"


def pool_name() -> str:
    return f"projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/{POOL}"


def federated_principal(namespace: str, sa: str) -> str:
    return (f"principal://iam.googleapis.com/{pool_name()}"
            f"/subject/system:serviceaccount:{namespace}:{sa}")


class Gce:
    """One test's Google side: the provider, Google SAs and grants, the
    cluster DNS, pods with resolvable metadata.google.internal, metabridge."""

    def __init__(self, testbed, fake_google, fake_kube):
        self.testbed = testbed
        self.google = fake_google
        self.kube = fake_kube
        self.provider = fake_google.add_oidc_provider(PROJECT_NUMBER, POOL, "eks-oidc",
                                                      fake_kube.issuer)
        self.cluster_dns = dns.ClusterDns(testbed.host_ip).start()
        self.gsas: set[str] = set()
        self.metabridge = None

    @property
    def pod_google_url(self) -> str:
        return self.google.url_for(self.testbed.host_ip)

    def gce_args(self, provider: str | None = None) -> list[str]:
        return ["--gcp-workload-identity-provider", provider or self.provider,
                "--gcp-project-id", PROJECT_ID,
                "--gcp-sts-url", self.google.url,
                "--gcp-iamcredentials-url", self.google.url]

    def start(self, *extra: str, provider: str | None = None):
        self.metabridge = self.testbed.start_metabridge(*self.gce_args(provider), *extra)
        return self.metabridge

    def service_account(self, name: str, *, grant: list[str] = ()) -> str:
        """A Google SA in the fake; `grant` members get workloadIdentityUser on it."""
        email = gsa_email(name)
        if email not in self.gsas:
            self.google.add_service_account(email)
            self.gsas.add(email)
        for member in grant:
            self.google.grant_workload_identity_user(email, member)
        return email

    def add_pod(self, name: str, namespace: str, sa: str, *, gsa: str | None = None,
                grant: bool = True, annotations: dict | None = None, resolv: bool = True,
                host_aliases: bool = False):
        """A pod of KSA namespace/sa; gsa: annotate it with that Google SA
        (created, and granted to the KSA's federated principal unless
        grant=False). resolv: the pod uses the cluster DNS; host_aliases: its
        /etc/hosts lists metadata.google.internal (spec.hostAliases)."""
        ann = dict(annotations or {})
        if gsa is not None:
            members = [federated_principal(namespace, sa)] if grant else []
            ann[GSA_ANNOTATION] = self.service_account(gsa, grant=members)
        # No annotations given: an existing ServiceAccount keeps its own.
        pod = self.testbed.add_pod(name, namespace, sa, ann or None)
        aliases = [("169.254.169.254", [METADATA_HOST])] if host_aliases else []
        self.cluster_dns.configure_pod(pod, resolv=resolv, host_aliases=aliases)
        return pod

    def close(self) -> None:
        self.cluster_dns.stop()  # also removes the pods' /etc/netns files


@pytest.fixture
def gce(testbed, fake_google, fake_kube):
    dns.cleanup_stale()
    g = Gce(testbed, fake_google, fake_kube)
    try:
        yield g
    finally:
        dirs = [files.dir for files in g.cluster_dns.pod_files]
        g.close()
    left = [str(d) for d in dirs if d.exists()]
    assert not left, f"pod DNS files left behind: {left}"


# -- running clients in pods --------------------------------------------------


def run_python(pod, code: str, timeout: float = 60, **params) -> dict:
    """Run code in the pod (clean environment); it sets `out` (a dict), which
    comes back. PARAMS holds the keyword arguments."""
    script = ("import json as _json\n"
              f"PARAMS = _json.loads({json.dumps(json.dumps(params))})\n"
              "out = {}\n"
              + textwrap.dedent(code) +
              "\nprint('__OUT__' + _json.dumps(out, default=str))\n")
    proc = pod.python(script, timeout=timeout)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("__OUT__")]
    assert proc.returncode == 0 and marker, (
        f"python in {pod} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-5000:]}")
    return json.loads(marker[-1][len("__OUT__"):])


GOOGLE_AUTH = """
import google.auth
import google.oauth2.id_token
from google.auth.transport.requests import Request

credentials, project = google.auth.default()
out["class"] = type(credentials).__module__ + "." + type(credentials).__qualname__
out["project"] = project
try:
    credentials.refresh(Request())
    out["token"] = credentials.token
    out["email"] = credentials.service_account_email
    out["expiry"] = credentials.expiry.isoformat()
except Exception as e:
    out["refresh_error"] = f"{type(e).__name__}: {e}"
if PARAMS.get("audience"):
    try:
        out["id_token"] = google.oauth2.id_token.fetch_id_token(Request(), PARAMS["audience"])
    except Exception as e:
        out["id_token_error"] = f"{type(e).__name__}: {e}"
"""

LIST_BUCKETS = """
from google.cloud import storage
try:
    client = storage.Client(project=PARAMS["project"],
                            client_options={"api_endpoint": PARAMS["endpoint"]})
    out["buckets"] = sorted(b.name for b in client.list_buckets())
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
    out["code"] = getattr(e, "code", None)
"""


def google_auth(pod, audience: str | None = None) -> dict:
    return run_python(pod, GOOGLE_AUTH, audience=audience)


def token_via_http(testbed, pod, query: str = "", timeout: float = 10):
    return testbed.metadata_get(pod, f"{DEFAULT_SA}/token{query}", headers=FLAVOR,
                                timeout=timeout)


def get_token(testbed, pod, query: str = "") -> dict:
    r = token_via_http(testbed, pod, query)
    assert r.status == 200, f"token for {pod}: {r}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    return r.json()


def verify_id_token(fake_google, token: str, audience: str) -> dict:
    key = jwt.PyJWK(fake_google.jwks["keys"][0]).key
    return jwt.decode(token, key=key, algorithms=["RS256"], audience=audience,
                      issuer=fake_google.id_token_issuer)


def sts_calls(fake_google, ok_only: bool = False) -> list[dict]:
    calls = fake_google.calls_to("sts")
    return [c for c in calls if c["status"] == 200] if ok_only else calls


# -- 1. metadata.google.internal ----------------------------------------------


def test_metadata_google_internal_resolves_in_pods_through_the_charts_coredns_block(
        testbed, gce):
    """The cluster DNS answers from the chart's CoreDNS block: the name
    resolves (also through the ndots:5 search list) to 169.254.169.254, and a
    request by name reaches metabridge through the DNAT."""
    gce.start()
    pod = gce.add_pod("web", "shop", "storefront")
    out = run_python(pod, """
        import socket
        for name in ("metadata.google.internal", "metadata.google.internal.",
                     "metadata", "nothing.metadata.google.internal"):
            try:
                out[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 80)})
            except socket.gaierror as e:
                out[name] = f"gaierror: {e}"
    """)
    assert out["metadata.google.internal"] == ["169.254.169.254"], out
    assert out["metadata.google.internal."] == ["169.254.169.254"], out
    # The chart's block is `hosts` without fallthrough: nothing else exists.
    assert out["nothing.metadata.google.internal"].startswith("gaierror"), out
    assert out["metadata"].startswith("gaierror"), out
    asked = {q["client"] for q in gce.cluster_dns.questions(METADATA_HOST)}
    assert asked == {pod.ip}, gce.cluster_dns.queries
    # On the wire, as CoreDNS's hosts plugin answers: authoritative A with the
    # chart's TTL; NODATA for AAAA.
    _, ttl = dns.chart_hosts()
    a = dns.query(testbed.host_ip, METADATA_HOST + ".", dns.A)
    assert (a["rcode"], a["aa"], a["answers"]) == (
        dns.NOERROR, True, [(METADATA_HOST + ".", dns.A, ttl, "169.254.169.254")]), a
    aaaa = dns.query(testbed.host_ip, METADATA_HOST + ".", dns.AAAA)
    assert (aaaa["rcode"], aaaa["answers"]) == (dns.NOERROR, []), aaaa

    r = pod.http_get(f"http://{METADATA_HOST}{V1}/project/project-id", headers=FLAVOR)
    assert (r.status, r.text) == (200, PROJECT_ID), r
    assert r.headers.get("metadata-flavor") == "Google", r.headers
    r = pod.http_get(f"http://{METADATA_HOST}/", headers=FLAVOR)
    assert r.status == 200 and r.headers.get("metadata-flavor") == "Google", r


def test_metadata_google_internal_does_not_resolve_without_the_chart(testbed, gce):
    """The emulation can fail: a pod whose cluster DNS lacks the chart's block
    (a stock CoreDNS) gets NXDOMAIN; google-auth's ping (by IP) still finds
    the metadata server, but its fetches, by name, cannot connect
    (research/gce.md §4)."""
    gce.cluster_dns.zones.clear()  # the node's cluster DNS is now a stock one
    reply = dns.query(testbed.host_ip, METADATA_HOST)
    assert reply["rcode"] == dns.NXDOMAIN and not reply["answers"], reply
    gce.start()
    pod = gce.add_pod("web", "shop", "storefront")
    out = run_python(pod, """
        import requests
        from google.auth.compute_engine import _metadata
        from google.auth.transport.requests import Request
        out["ping"] = _metadata.ping(Request())
        out["root"] = _metadata._GCE_METADATA_HOST
        try:
            requests.get(_metadata._METADATA_ROOT + "project/project-id",
                         headers={"Metadata-Flavor": "Google"}, timeout=3)
        except requests.ConnectionError as e:
            out["error"] = str(e)
    """)
    assert out["ping"] is True and out["root"] == METADATA_HOST, out
    assert "Failed to resolve" in out.get("error", "") \
        or "Name or service not known" in out.get("error", ""), out
    assert gce.cluster_dns.questions(METADATA_HOST), "the pod never asked the cluster DNS"


def test_host_aliases_make_metadata_google_internal_resolve_without_coredns(testbed, gce):
    """The documented per-pod alternative: spec.hostAliases puts the name in
    the pod's /etc/hosts (kubelet's managed file); the cluster DNS, stock
    here, is never asked for it."""
    gce.cluster_dns.zones.clear()
    gce.start()
    pod = gce.add_pod("batch", "jobs", "runner", host_aliases=True)
    hosts = pod.run(["cat", "/etc/hosts"]).stdout
    assert "# Entries added by HostAliases.\n169.254.169.254\tmetadata.google.internal" in hosts
    out = run_python(pod, """
        import socket
        out["addrs"] = sorted({a[4][0] for a in socket.getaddrinfo("metadata.google.internal", 80)})
    """)
    assert out["addrs"] == ["169.254.169.254"], out
    r = pod.http_get(f"http://{METADATA_HOST}{V1}/project/numeric-project-id", headers=FLAVOR)
    assert (r.status, r.text) == (200, PROJECT_NUMBER), r
    assert not gce.cluster_dns.questions(METADATA_HOST), gce.cluster_dns.queries
    # Without the alias the same stock cluster cannot resolve it.
    other = gce.add_pod("batch-2", "jobs", "runner")
    r = other.http_get(f"http://{METADATA_HOST}/", headers=FLAVOR)
    assert r.status is None and "resolve" in (r.error or "").lower(), r


# -- 2. google-auth ------------------------------------------------------------


def test_google_auth_default_gets_each_pods_own_impersonated_identity(testbed, gce, fake_google):
    """google.auth.default() in two pods of different ServiceAccounts annotated
    with different Google SAs: compute_engine credentials, the project, a token
    of that pod's own Google SA, an ID token verifiable against Google's JWKS."""
    gce.start()
    web = gce.add_pod("web", "shop", "storefront", gsa="storefront")
    exporter = gce.add_pod("exporter", "billing", "exporter", gsa="billing-exporter")
    audience = "https://api.example.com/"
    for pod, name in ((web, "storefront"), (exporter, "billing-exporter")):
        out = google_auth(pod, audience=audience)
        assert out["class"] == "google.auth.compute_engine.credentials.Credentials", out
        assert out["project"] == PROJECT_ID, out
        assert "refresh_error" not in out, out
        assert out["email"] == gsa_email(name), out
        assert fake_google.principal_of(out["token"]) == f"serviceAccount:{gsa_email(name)}", out
        assert "id_token_error" not in out, out
        claims = verify_id_token(fake_google, out["id_token"], audience)
        assert claims["aud"] == audience, claims
        assert claims["email"] == gsa_email(name), claims
    # The GSA was impersonated by the pod's own federated principal.
    targets = {(c["target"], c["principal"]) for c in fake_google.calls_to("generateAccessToken")
               if c["status"] == 200}
    assert targets == {(gsa_email("storefront"), federated_principal("shop", "storefront")),
                       (gsa_email("billing-exporter"),
                        federated_principal("billing", "exporter"))}, targets


def test_google_auth_without_annotation_is_the_federated_principal(testbed, gce, fake_google):
    """No annotation: direct resource access; the token is the federated
    principal of exactly this ServiceAccount, and an ID token is refused with
    a message naming the annotation to add."""
    gce.start()
    pod = gce.add_pod("report", "analytics", "reporter")
    out = google_auth(pod, audience="https://api.example.com/")
    assert out["class"] == "google.auth.compute_engine.credentials.Credentials", out
    assert out["project"] == PROJECT_ID, out
    assert "refresh_error" not in out, out
    assert fake_google.principal_of(out["token"]) == federated_principal("analytics", "reporter")
    assert "id_token" not in out, out
    assert GSA_ANNOTATION in out["id_token_error"], out
    assert not fake_google.calls_to("generateIdToken"), fake_google.calls_to("generateIdToken")


def test_google_auth_refused_impersonation_names_the_reason(testbed, gce, fake_google):
    """The Google SA does not trust this ServiceAccount: the pod's refresh
    fails with IAM's refusal in the message (no other identity is handed out)."""
    gce.start()
    pod = gce.add_pod("rogue", "shop", "rogue", gsa="storefront", grant=False)
    out = google_auth(pod)
    assert "token" not in out, out
    assert "iam.serviceAccounts.getAccessToken" in out["refresh_error"] \
        or "PERMISSION_DENIED" in out["refresh_error"], out
    assert "403" in out["refresh_error"], out


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not installed")
def test_gcloud_finds_its_identity_by_name(testbed, gce, fake_google):
    """gcloud reaches the metadata server only by metadata.google.internal
    (research/gce.md §4): with the chart's DNS it knows the pod's account and
    project and prints a token of that Google SA."""
    gce.start()
    pod = gce.add_pod("ops", "tools", "operator", gsa="operator")
    listed = pod.run(["gcloud", "config", "list", "--format=json"], timeout=120)
    assert listed.returncode == 0, listed.stderr
    core = json.loads(listed.stdout)["core"]
    assert (core.get("account"), core.get("project")) == (gsa_email("operator"), PROJECT_ID), core
    printed = pod.run(["gcloud", "auth", "print-access-token"], timeout=120)
    assert printed.returncode == 0, printed.stderr
    token = printed.stdout.strip()
    assert fake_google.principal_of(token) == f"serviceAccount:{gsa_email('operator')}", token


# -- 3. a Google client library ---------------------------------------------------


def test_cloud_storage_client_sees_only_its_own_identitys_buckets(testbed, gce, fake_google):
    gce.start()
    reader = gce.add_pod("reader", "team-a", "reader", gsa="reader-a")
    direct = gce.add_pod("etl", "team-b", "etl")
    stranger = gce.add_pod("stranger", "team-c", "nobody")
    fake_google.add_bucket("bucket-a", PROJECT_ID, [f"serviceAccount:{gsa_email('reader-a')}"])
    fake_google.add_bucket("bucket-b", PROJECT_ID, [federated_principal("team-b", "etl")])
    fake_google.add_bucket("bucket-ab", PROJECT_ID, [f"serviceAccount:{gsa_email('nobody-else')}"])
    params = {"project": PROJECT_ID, "endpoint": gce.pod_google_url}

    out = run_python(reader, LIST_BUCKETS, **params)
    assert out.get("buckets") == ["bucket-a"], out
    out = run_python(direct, LIST_BUCKETS, **params)
    assert out.get("buckets") == ["bucket-b"], out
    out = run_python(stranger, LIST_BUCKETS, **params)
    assert out.get("code") == 403 and "buckets" not in out, out
    assert federated_principal("team-c", "nobody") in out["error"], out

    who = {(c["client"], c["principal"]) for c in fake_google.calls_to("storage")}
    assert who == {(reader.ip, f"serviceAccount:{gsa_email('reader-a')}"),
                   (direct.ip, federated_principal("team-b", "etl")),
                   (stranger.ip, federated_principal("team-c", "nobody"))}, who


# -- 4. the protocol through the real interception --------------------------------


def test_metadata_protocol_details_through_the_dnat(testbed, gce):
    gce.start()
    pod = gce.add_pod("web", "shop", "storefront", gsa="storefront")

    def get(path, headers=FLAVOR):
        return testbed.metadata_get(pod, path, headers=headers)

    root = get("/")
    assert root.status == 200 and root.headers.get("metadata-flavor") == "Google", root
    assert "computeMetadata/" in root.text, root
    assert get("/", headers={}).status == 200  # Go's probe sends no flavor header

    r = get(f"{V1}/project/project-id", headers={})
    assert r.status == 403 and "Metadata-Flavor" in r.text, r
    assert r.headers.get("metadata-flavor") == "Google", r.headers
    r = get(f"{V1}/project/project-id", headers={**FLAVOR, "X-Forwarded-For": "10.1.2.3"})
    assert r.status == 403, r

    assert (get(f"{V1}/project/project-id").text, get(f"{V1}/project/numeric-project-id").text) \
        == (PROJECT_ID, PROJECT_NUMBER)

    r = get(f"{V1}/instance/service-accounts")
    assert r.status == 301 and r.headers.get("location", "").endswith(
        f"{V1}/instance/service-accounts/"), r
    r = get(f"{V1}/instance/service-accounts/")
    assert r.status == 200 and r.text.split() == ["default/", f"{gsa_email('storefront')}/"], r

    r = get(f"{DEFAULT_SA}/")
    assert r.status == 200 and r.text.split() == ["aliases", "email", "identity", "scopes",
                                                  "token"], r
    r = get(f"{V1}/project/?recursive=true")
    assert r.status == 200 and r.json() == {"numericProjectId": int(PROJECT_NUMBER),
                                            "projectId": PROJECT_ID}, r
    r = get(f"{DEFAULT_SA}/?recursive=true")
    assert r.status == 200 and r.headers.get("content-type", "").startswith("application/json"), r
    info = r.json()
    assert info["email"] == gsa_email("storefront"), info
    assert "default" in info["aliases"] and SCOPE_CLOUD_PLATFORM in info["scopes"], info
    assert get(f"{DEFAULT_SA}/email").text == gsa_email("storefront")

    for unknown in (f"{V1}/instance/name", f"{V1}/instance/attributes/kube-env",
                    f"{V1}/instance/service-accounts/other@p.iam.gserviceaccount.com/email",
                    "/computeMetadata/v1beta1/project/project-id", "/latest/meta-data/"):
        r = get(unknown)
        assert r.status == 404, f"{unknown}: {r}"


def test_wait_for_change_long_polls_until_the_service_account_changes(testbed, gce):
    """Go's metadata.Subscribe: ETag on every value, and a request with
    wait_for_change=true and the current ETag is held until the value changes
    (here: the KSA is re-annotated with another Google SA)."""
    gce.start()
    pod = gce.add_pod("sub", "shop", "watcher", gsa="first")
    email = f"{DEFAULT_SA}/email"
    current = testbed.metadata_get(pod, email, headers=FLAVOR)
    etag = current.headers.get("etag", "")
    assert current.text == gsa_email("first") and len(etag) == 16, current

    # Nothing changes: held for timeout_sec, then the same value and ETag.
    started = time.monotonic()
    r = testbed.metadata_get(pod, f"{email}?wait_for_change=true&last_etag={etag}&timeout_sec=2",
                             headers=FLAVOR)
    held = time.monotonic() - started
    assert (r.status, r.text, r.headers.get("etag")) == (200, gsa_email("first"), etag), r
    assert 1.9 <= held < 4, held

    second = gce.service_account("second", grant=[federated_principal("shop", "watcher")])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(testbed.metadata_get, pod,
                              f"{email}?wait_for_change=true&last_etag={etag}&timeout_sec=30",
                              headers=FLAVOR, timeout=35)
        time.sleep(1)
        assert not waiting.done(), "answered before anything changed"
        testbed.update_service_account("shop", "watcher", {GSA_ANNOTATION: second})
        r = waiting.result(timeout=35)
    held = time.monotonic() - started
    assert (r.status, r.text) == (200, second), r
    assert r.headers.get("etag") not in ("", etag), r.headers
    assert held < 10, f"the change took {held:.1f}s to be answered"


def test_token_expires_in_counts_down_and_scopes_are_passed_on(testbed, gce, fake_google):
    gce.start()
    pod = gce.add_pod("web", "shop", "storefront", gsa="storefront")
    first = get_token(testbed, pod)
    assert first["token_type"] == "Bearer" and first["access_token"], first
    time.sleep(2.1)
    second = get_token(testbed, pod)
    assert second["access_token"] == first["access_token"], "cached token expected"
    assert 0 < second["expires_in"] <= first["expires_in"] - 2, (first, second)

    scopes = ["https://www.googleapis.com/auth/devstorage.read_only",
              "https://www.googleapis.com/auth/pubsub"]
    scoped = get_token(testbed, pod, "?scopes=" + urllib.parse.quote(",".join(scopes)))
    assert scoped["access_token"] != first["access_token"], scoped
    assert fake_google.token_info(scoped["access_token"])["scopes"] == scopes
    asked = [c["scope"] for c in fake_google.calls_to("generateAccessToken")
             if c.get("access_token") == scoped["access_token"]]
    assert asked == [scopes], fake_google.calls_to("generateAccessToken")


# -- 5. caching and faults -----------------------------------------------------------


def test_pods_of_one_service_account_share_one_exchange(testbed, gce, fake_google):
    """Two new pods of one ServiceAccount asking at once, five times each: one
    STS exchange, one impersonation (prefetch and requests coalesce)."""
    gce.start()
    a = gce.add_pod("web-1", "shop", "storefront", gsa="storefront")
    b = gce.add_pod("web-2", "shop", "storefront")
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda pod: token_via_http(testbed, pod), [a, b] * 5))
    assert all(r.status == 200 for r in results), results
    tokens = {r.json()["access_token"] for r in results}
    assert len(tokens) == 1, tokens
    assert len(sts_calls(fake_google)) == 1, sts_calls(fake_google)
    assert len(fake_google.calls_to("generateAccessToken")) == 1


def test_first_request_of_a_new_pod_is_a_cache_hit(testbed, gce, fake_google):
    """A pod appears (its ServiceAccount already exists, as admission
    requires): metabridge mints before the pod asks, so the first request is
    answered from the cache."""
    gsa = gce.service_account("storefront", grant=[federated_principal("shop", "storefront")])
    testbed.ensure_service_account("shop", "storefront", {GSA_ANNOTATION: gsa})
    gce.start()
    assert not fake_google.calls, fake_google.calls  # no pod yet: nothing to mint
    pod = gce.add_pod("web", "shop", "storefront")
    issued = wait_for(lambda: [c for c in fake_google.calls_to("generateAccessToken")
                               if c["status"] == 200], 5,
                      message="the exchange prefetched for the new pod")
    before = (len(sts_calls(fake_google)), len(fake_google.calls_to("generateAccessToken")))
    token = get_token(testbed, pod)
    assert token["access_token"] == issued[0]["access_token"]
    assert (len(sts_calls(fake_google)), len(fake_google.calls_to("generateAccessToken"))) \
        == before, fake_google.calls


def test_pods_created_with_their_new_service_account_are_prefetched_too(testbed, gce, fake_google):
    """A Deployment applied together with its ServiceAccount: the two watch
    events (ServiceAccount, pod) may reach metabridge in either order; the
    pod's credential must still be minted before the pod asks."""
    gce.start()
    late = []
    for i in range(10):
        before = len(sts_calls(fake_google))
        gce.add_pod(f"app-{i}", "apps", f"app-{i}", gsa=f"app-{i}")  # new SA, then its pod at once
        try:
            wait_for(lambda: len(sts_calls(fake_google)) > before, 1.5)
        except AssertionError:
            late.append(f"apps/app-{i}")
    assert not late, f"not prefetched within 1.5 s: {late}"


def test_cached_token_is_served_through_an_sts_outage(testbed, gce, fake_google):
    gce.start()
    web = gce.add_pod("web-1", "shop", "storefront", gsa="storefront")
    cached = get_token(testbed, web)["access_token"]
    for endpoint in ("sts", "generateAccessToken"):
        fake_google.set_fault(endpoint, status=503)
    # The same pod, and a new pod of the same ServiceAccount (its prefetch
    # fails), keep getting the still-valid credential.
    replica = gce.add_pod("web-2", "shop", "storefront")
    for pod in (web, replica, web):
        assert get_token(testbed, pod)["access_token"] == cached
    out = google_auth(replica)
    assert out.get("token") == cached, out


def test_cold_request_during_an_sts_outage_names_the_upstream_reason(testbed, gce, fake_google):
    gce.start()
    fake_google.set_fault("sts", status=503)
    pod = gce.add_pod("web", "shop", "storefront", gsa="storefront")
    r = token_via_http(testbed, pod, timeout=20)
    assert r.status is not None and 500 <= r.status <= 599, r
    assert r.elapsed < 3, f"Python's google-auth gives the metadata server 3 s: {r}"
    # Google's front end answers outages in the Google API error shape; the
    # pod is told the service, the status and Google's reason, readably.
    error = r.json()
    assert "Google STS" in error["error_description"], error
    assert "UNAVAILABLE: The service is currently unavailable." in error["error_description"], error
    assert all(c.get("fault") for c in sts_calls(fake_google))
    # The outage ends: requests succeed again (a failure is not cached for long).
    fake_google.clear_faults()
    wait_for(lambda: token_via_http(testbed, pod).status == 200, 5,
             message="a token once STS is back")


# -- 6. AWS-type provider (seed 000, "IAM role federation") -------------------------


def test_aws_provider_gives_the_assumed_role_identity(testbed, gce, fake_google, fake_aws,
                                                      fake_kube):
    issuer_key = fake_kube.issuer.split("://", 1)[1]
    fake_aws.add_oidc_provider(fake_kube.issuer, client_ids=["sts.amazonaws.com"])
    role = fake_aws.add_role("gcp-reader", provider=issuer_key,
                             conditions={f"{issuer_key}:sub": "system:serviceaccount:data:loader"})
    other = fake_aws.add_role("gcp-other", provider=issuer_key,
                              conditions={f"{issuer_key}:sub": "system:serviceaccount:data:else"})
    provider = fake_google.add_aws_provider(PROJECT_NUMBER, POOL, "eks-aws", fake_aws.account_id,
                                            fake_aws.url)
    gce.start("--gcp-provider-type", "aws", "--aws-sts-url", fake_aws.url,
              "--aws-region", "us-east-1", provider=provider)
    pod = gce.add_pod("loader", "data", "loader", annotations={ROLE_ANNOTATION: role})
    intruder = gce.add_pod("intruder", "data", "intruder", annotations={ROLE_ANNOTATION: other})

    out = google_auth(pod)
    assert "refresh_error" not in out, out
    principal = fake_google.principal_of(out["token"])
    prefix = (f"principal://iam.googleapis.com/{pool_name()}/subject/"
              f"arn:aws:sts::{fake_aws.account_id}:assumed-role/gcp-reader/")
    assert principal and principal.startswith(prefix), principal
    assert any(c["subject_token_type"] == "urn:ietf:params:aws:token-type:aws4_request"
               for c in sts_calls(fake_google, ok_only=True))

    out = google_auth(intruder)
    assert "token" not in out and "AccessDenied" in out["refresh_error"], out
