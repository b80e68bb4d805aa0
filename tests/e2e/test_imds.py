"""End-to-end: the IMDS API (issue 4) with real AWS clients inside pods.

Each test builds its own node in a box (pods are network namespaces calling
http://169.254.169.254 through the rules metabridge installs), a FakeKube
cluster, the fake AWS STS (and for the Google token source the fake Google),
and starts the real binary with the IMDS flags. Clients run inside the pods
with a clean environment (no AWS_* variables, an empty HOME: no ~/.aws), so
whatever boto3 or the AWS CLI find, they found through 169.254.169.254.

Trust lives in the fakes, as in the clouds: fake AWS trusts the FakeKube issuer
(audience sts.amazonaws.com) or accounts.google.com (the fake Google's keys),
each role's trust policy conditions on the token's `sub` (and `aud`).

Region: botocore does **not** take the client region from IMDS, by design
(shared/research/aws.md §4: botocore reads `placement/availability-zone/` only
for `defaults_mode=auto`, never as the client's region; AWS CLI v1 is botocore;
JS neither; Rust and CLI v2 read `placement/region`). So the tests assert the
region through botocore's own IMDS region provider (`IMDSRegionProvider`, the
code `defaults_mode=auto` runs) and hand *that* value to the client and to the
CLI's `--region`; no environment variable or config file is involved.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time

import pytest

from support.netns import wait_for
from support.testbed import METADATA_URL

GSA = "iam.gke.io/gcp-service-account"
ROLE = "eks.amazonaws.com/role-arn"
TOKEN_SOURCE = "metabridge.io/aws-token-source"
REGION = "us-east-1"
K8S_AUDIENCE = "sts.amazonaws.com"

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
CREDS = "/latest/meta-data/iam/security-credentials/"
CREDS_EXT = "/latest/meta-data/iam/security-credentials-extended/"
CREDENTIAL_FIELDS = {"Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey",
                     "Token", "Expiration"}
IMDS_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
STS_ACCESS_DENIED = "Not authorized to perform sts:AssumeRoleWithWebIdentity"

# Google side of the google token source (seed 002).
GCP_PROJECT = "demo-project"
GCP_PROJECT_NUMBER = "123456789"
GCP_POOL = "eks-pool"
GCP_PROVIDER = "kube"
GCP_PROVIDER_NAME = (f"projects/{GCP_PROJECT_NUMBER}/locations/global/"
                     f"workloadIdentityPools/{GCP_POOL}/providers/{GCP_PROVIDER}")


def subject(namespace: str, sa: str) -> str:
    return f"system:serviceaccount:{namespace}:{sa}"


def parse_imds_time(value: str) -> dt.datetime:
    assert IMDS_TIME_RE.match(value), f"not YYYY-MM-DDTHH:MM:SSZ: {value!r}"
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


# -- the cloud side -------------------------------------------------------------


class Aws:
    """fake AWS STS trusting the FakeKube issuer; roles trusting service accounts."""

    def __init__(self, fake_aws, fake_kube):
        self.sts = fake_aws
        self.issuer = fake_kube.issuer
        self.provider = self.issuer.split("://", 1)[1]
        fake_aws.add_oidc_provider(self.issuer, client_ids=[K8S_AUDIENCE])

    def role(self, name: str, *subjects: str) -> str:
        """A role that trusts exactly these service-account subjects."""
        return self.sts.add_role(name, provider=self.issuer, conditions={
            f"{self.provider}:sub": list(subjects),
            f"{self.provider}:aud": K8S_AUDIENCE})

    def args(self, *extra: str) -> tuple[str, ...]:
        """metabridge flags enabling the IMDS API against the fake."""
        return ("--aws-region", REGION, "--aws-sts-url", self.sts.url, *extra)

    def assume_calls(self, role_arn: str | None = None, status: int | None = None) -> list[dict]:
        return [c for c in self.sts.calls_for("AssumeRoleWithWebIdentity")
                if (role_arn is None or c["role_arn"] == role_arn)
                and (status is None or c["status"] == status)]

    def assert_all_unsigned(self) -> None:
        calls = self.assume_calls()
        signed = [c for c in calls if c["signed"] is not False]
        assert not signed, f"AssumeRoleWithWebIdentity must be unsigned, got {signed}"


@pytest.fixture
def aws(fake_aws, fake_kube):
    return Aws(fake_aws, fake_kube)


# -- IMDS over plain HTTP from a pod ---------------------------------------------


def put_token(pod, ttl: str | int | None = 21600, headers: dict | None = None):
    h = dict(headers or {})
    if ttl is not None:
        h[TTL_HEADER] = str(ttl)
    return pod.http_get(METADATA_URL + TOKEN_PATH, method="PUT", headers=h)


def token_for(pod, ttl: int = 21600) -> str:
    result = put_token(pod, ttl)
    assert result.status == 200, f"PUT {TOKEN_PATH} from {pod.name}: {result}"
    assert result.text, result
    return result.text


def imds(pod, path: str, token: str | None = None, *, method: str = "GET",
         timeout: float = 5):
    headers = {TOKEN_HEADER: token} if token is not None else None
    return pod.http_get(METADATA_URL + path, headers=headers, method=method, timeout=timeout)


def tamper(token: str) -> str:
    """The token with one character in the middle changed."""
    i = len(token) // 2
    return token[:i] + ("B" if token[i] != "B" else "C") + token[i + 1:]


def get_ok(pod, path: str, token: str) -> str:
    result = imds(pod, path, token)
    assert result.status == 200, f"GET {path} from {pod.name}: {result}"
    return result.text


def credentials(pod, token: str, role: str, *, extended: bool = False) -> dict:
    path = (CREDS_EXT if extended else CREDS) + role
    result = imds(pod, path, token)
    assert result.status == 200, f"GET {path} from {pod.name}: {result}"
    return result.json()


def wait_credentials(pod, role: str, timeout: float = 10) -> dict:
    """The credential document once it says Success (prefetch may be running)."""
    def attempt():
        result = imds(pod, CREDS + role, token_for(pod))
        if result.status == 200 and result.json().get("Code") == "Success":
            return result.json()
        attempt.last = result
        return None
    attempt.last = None
    try:
        return wait_for(attempt, timeout, interval=0.2, message=f"credentials of {role}")
    except AssertionError as e:
        raise AssertionError(f"{e}; last answer: {attempt.last}") from None


# -- real clients in a pod -------------------------------------------------------

# Runs inside the pod: boto3's default chain, region through botocore's own
# IMDS region provider, then `calls` x sts.get_caller_identity against the
# fake. Prints one JSON line.
BOTO3_PROBE = r"""
import json, os, sys
endpoint, calls = sys.argv[1], int(sys.argv[2])
out = {"aws_env": sorted(k for k in os.environ if k.startswith("AWS_")),
       "aws_dir": os.path.exists(os.path.expanduser("~/.aws"))}
import boto3, botocore.session
from botocore.utils import IMDSRegionProvider
core = botocore.session.Session()
session = boto3.Session(botocore_session=core)
out["client_region"] = session.region_name
try:
    out["imds_region"] = IMDSRegionProvider(core).provide()
except Exception as e:
    out["imds_region"] = None
    out["imds_region_error"] = repr(e)
try:
    creds = session.get_credentials()
    out["method"] = creds.method if creds is not None else None
    out["access_key"] = creds.get_frozen_credentials().access_key if creds is not None else None
    # The signing region only scopes the SigV4 signature; when IMDS gave no
    # region (asserted separately) still exercise the credentials.
    sts = session.client("sts", endpoint_url=endpoint,
                         region_name=out["imds_region"] or "us-east-1")
    out["arns"] = [sts.get_caller_identity()["Arn"] for _ in range(calls)]
except Exception as e:
    out["error"] = type(e).__name__
    out["message"] = str(e)
print(json.dumps(out))
"""


def boto3_argv(endpoint: str, calls: int = 1) -> list[str]:
    return [sys.executable, "-c", BOTO3_PROBE, endpoint, str(calls)]


def parse_probe(pod, stdout: str, stderr: str, returncode: int) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert returncode == 0 and lines, (f"boto3 probe in {pod.name} failed ({returncode}):\n"
                                       f"{stdout}\n{stderr}")
    out = json.loads(lines[-1])
    assert out["aws_env"] == [] and out["aws_dir"] is False, f"pod environment not clean: {out}"
    return out


def boto3_in(pod, fake_aws, calls: int = 1) -> dict:
    proc = pod.run(boto3_argv(fake_aws.url_for(pod.node.host_ip), calls), timeout=60)
    return parse_probe(pod, proc.stdout, proc.stderr, proc.returncode)


def awscli_in(pod, fake_aws, region: str):
    """`aws sts get-caller-identity` (AWS CLI v1, botocore underneath)."""
    return pod.run([sys.executable, "-m", "awscli", "sts", "get-caller-identity",
                    "--endpoint-url", fake_aws.url_for(pod.node.host_ip),
                    "--region", region, "--output", "json"], timeout=60)


def assert_boto3_is(out: dict, fake_aws, role_arn: str, pod) -> str:
    """boto3 found IMDS credentials and STS says they are the pod's role."""
    assert "error" not in out, f"boto3 in {pod.name}: {out}"
    assert out["method"] == "iam-role", f"credentials not from IMDS: {out}"
    key = out["access_key"]
    identity = fake_aws.identity_of(key)
    assert identity is not None, f"{key} was not issued by the fake STS: {out}"
    role_name = role_arn.rsplit("/", 1)[1]
    assert identity.startswith(f"arn:aws:sts::{fake_aws.account_id}:assumed-role/{role_name}/"), \
        (identity, role_arn)
    assert set(out["arns"]) == {identity}, out
    assert fake_aws.issued[key]["role_arn"] == role_arn
    return identity


def assert_no_credentials(out: dict, pod) -> None:
    assert out.get("method") is None and out.get("error") == "NoCredentialsError", \
        f"boto3 in {pod.name} should find no credentials: {out}"


# =============================================================================
# 1. boto3 and the AWS CLI, zero configuration
# =============================================================================


def test_boto3_and_awscli_get_the_pods_role_with_no_configuration(testbed, aws, fake_aws):
    role = aws.role("reader", subject("team-a", "reader"))
    pod = testbed.add_pod("app", "team-a", "reader", {ROLE: role})
    testbed.start_metabridge(*aws.args())

    out = boto3_in(pod, fake_aws, calls=2)
    problems = []
    try:
        identity = assert_boto3_is(out, fake_aws, role, pod)
        assert fake_aws.issued[out["access_key"]]["subject"] == subject("team-a", "reader")
    except AssertionError as e:
        problems.append(f"credentials: {e}")
        identity = None
    # botocore never sets the client region from IMDS (module docstring) ...
    if out["client_region"] is not None:
        problems.append(f"client region {out['client_region']!r} came from somewhere: {out}")
    # ... but its IMDS region provider (GET placement/availability-zone/) must
    # find the configured region.
    if out["imds_region"] != REGION:
        problems.append(f"botocore's IMDSRegionProvider found {out['imds_region']!r}, "
                        f"expected {REGION!r}: {out.get('imds_region_error')}; GET "
                        "/latest/meta-data/placement/availability-zone/ answered "
                        f"{imds(pod, '/latest/meta-data/placement/availability-zone/', token_for(pod))}")

    # The same through the AWS CLI (v1: botocore, so the region is passed as
    # --region; when IMDS gave none, the failure is reported above and the
    # CLI still shows whether the credentials work).
    cli = awscli_in(pod, fake_aws, out["imds_region"] or REGION)
    if cli.returncode != 0:
        problems.append(f"aws sts get-caller-identity: {cli.stdout}\n{cli.stderr}")
    else:
        answer = json.loads(cli.stdout)
        if (answer.get("Arn"), answer.get("Account")) != (identity, fake_aws.account_id):
            problems.append(f"aws sts get-caller-identity answered {answer}, "
                            f"expected {identity} in {fake_aws.account_id}")
    assert not problems, "\n".join(problems)
    aws.assert_all_unsigned()


# =============================================================================
# 2. The IMDSv2 protocol, plain HTTP through the DNAT
# =============================================================================


def test_session_tokens(testbed, aws, fake_aws):
    role = aws.role("reader", subject("team-a", "reader"))
    alice = testbed.add_pod("alice", "team-a", "reader", {ROLE: role})
    bob = testbed.add_pod("bob", "team-a", "reader", {ROLE: role})
    testbed.start_metabridge(*aws.args())

    ok = put_token(alice, 21600)
    assert ok.status == 200, ok
    assert ok.headers.get(TTL_HEADER.lower()) == "21600", ok.headers
    assert ok.text and "\n" not in ok.text, ok
    short = put_token(alice, 1)
    assert short.status == 200 and short.headers.get(TTL_HEADER.lower()) == "1", short

    for bad in (0, 21601, None, "abc", "-5", ""):
        result = put_token(alice, bad)
        assert result.status == 400, f"TTL {bad!r}: {result}"
    result = put_token(alice, 60, headers={"X-Forwarded-For": "10.9.9.9"})
    assert result.status == 403, f"PUT with X-Forwarded-For: {result}"

    token = ok.text
    assert get_ok(alice, CREDS, token) == "reader"
    # v1 is refused by default: no token, garbage, someone else's.
    for path in (CREDS, "/latest/meta-data/placement/region", "/latest/meta-data/"):
        result = imds(alice, path)
        assert result.status == 401, f"GET {path} without a token: {result}"
    assert imds(alice, CREDS, tamper(token)).status == 401
    assert imds(alice, CREDS, "garbage").status == 401
    stolen = imds(bob, CREDS, token)
    assert stolen.status == 401, f"bob presenting alice's token: {stolen}"
    stolen = imds(bob, "/latest/meta-data/placement/region", token)
    assert stolen.status == 401, f"bob presenting alice's token: {stolen}"
    assert get_ok(bob, CREDS, token_for(bob)) == "reader"

    time.sleep(2.2)
    expired = imds(alice, CREDS, short.text)
    assert expired.status == 401, f"an expired token (TTL 1 s, 2.2 s ago): {expired}"
    assert get_ok(alice, CREDS, token) == "reader"  # the long one still works


def test_a_token_dies_with_its_pod_even_when_the_ip_is_reused(testbed, aws):
    old_role = aws.role("old", subject("apps", "old"))
    new_role = aws.role("new", subject("apps", "new"))
    old = testbed.add_pod("old", "apps", "old", {ROLE: old_role})
    testbed.start_metabridge(*aws.args())
    token = token_for(old)
    assert get_ok(old, CREDS, token) == "old"

    ip = old.ip
    testbed.delete_pod(old)
    new = testbed.add_pod("new", "apps", "new", {ROLE: new_role}, ip=ip)
    wait_for(lambda: imds(new, CREDS, token_for(new)).text == "new", 5,
             message="the new pod to be known")
    result = imds(new, CREDS, token)
    assert result.status == 401, f"the old pod's token presented from its reused IP: {result}"
    result = imds(new, CREDS + "new", token)
    assert result.status == 401, f"the old pod's token presented from its reused IP: {result}"


def test_metadata_paths(testbed, aws, fake_aws):
    role = aws.role("reader", subject("team-a", "reader"))
    pod = testbed.add_pod("app", "team-a", "reader", {ROLE: role})
    testbed.start_metabridge(*aws.args())
    token = token_for(pod)

    # The role and its credentials.
    assert get_ok(pod, CREDS, token) == "reader"
    assert get_ok(pod, CREDS.rstrip("/"), token) == "reader"
    before = time.time()
    doc = wait_credentials(pod, "reader")
    assert set(doc) == CREDENTIAL_FIELDS, f"fields: {sorted(doc)}"
    assert doc["Code"] == "Success" and doc["Type"] == "AWS-HMAC", doc
    expiration = parse_imds_time(doc["Expiration"])
    assert expiration.timestamp() >= before + 15 * 60, \
        f"Expiration {doc['Expiration']} is less than 15 minutes away"
    last_updated = parse_imds_time(doc["LastUpdated"])
    assert last_updated.timestamp() <= time.time() + 1
    issued = fake_aws.issued.get(doc["AccessKeyId"])
    assert issued is not None, f"{doc['AccessKeyId']} not issued by the fake STS"
    assert (doc["SecretAccessKey"], doc["Token"], doc["Expiration"]) == \
        (issued["secret"], issued["session_token"], issued["expiration"])
    assert issued["role_arn"] == role

    other = imds(pod, CREDS + "writer", token)
    assert other.status == 404, f"another role's name: {other}"
    assert imds(pod, CREDS + "reader/extra", token).status == 404

    # The extended variant carries the account.
    assert get_ok(pod, CREDS_EXT, token) == "reader"
    ext = credentials(pod, token, "reader", extended=True)
    assert set(ext) == CREDENTIAL_FIELDS | {"AccountId"}, sorted(ext)
    assert ext["AccountId"] == fake_aws.account_id
    assert ext["AccessKeyId"] == doc["AccessKeyId"] and ext["Code"] == "Success"
    assert imds(pod, CREDS_EXT + "writer", token).status == 404

    info = json.loads(get_ok(pod, "/latest/meta-data/iam/info", token))
    assert info.get("Code") == "Success", info
    parse_imds_time(info["LastUpdated"])
    assert info["InstanceProfileArn"].startswith(
        f"arn:aws:iam::{fake_aws.account_id}:instance-profile/"), info
    assert info.get("InstanceProfileId"), info

    # Placement and instance, consistent with each other.
    region = get_ok(pod, "/latest/meta-data/placement/region", token)
    zone = get_ok(pod, "/latest/meta-data/placement/availability-zone", token)
    instance_id = get_ok(pod, "/latest/meta-data/instance-id", token)
    assert region == REGION
    assert re.fullmatch(re.escape(REGION) + r"[a-z]", zone), zone
    assert re.fullmatch(r"i-[0-9a-f]{8,17}", instance_id), instance_id
    document = json.loads(get_ok(pod, "/latest/dynamic/instance-identity/document", token))
    for key in ("accountId", "architecture", "availabilityZone", "billingProducts",
                "devpayProductCodes", "marketplaceProductCodes", "imageId", "instanceId",
                "instanceType", "kernelId", "pendingTime", "privateIp", "ramdiskId",
                "region", "version"):
        assert key in document, f"identity document lacks {key}: {document}"
    assert (document["region"], document["availabilityZone"], document["instanceId"],
            document["accountId"]) == (region, zone, instance_id, fake_aws.account_id), document
    listing = get_ok(pod, "/latest/meta-data/", token).split("\n")
    assert {"iam/", "instance-id", "placement/"} <= set(listing), listing

    # Everything else: 404; wrong methods: 405.
    for path in ("/latest/meta-data/nonexistent", "/latest/user-data",
                 "/latest/meta-data/iam/security-credentials-bogus/reader",
                 "/latest/meta-data/public-keys/", "/computeMetadata/v1/"):
        result = imds(pod, path, token)
        assert result.status == 404, f"GET {path}: {result}"
    for method, path in (("POST", "/latest/meta-data/"), ("POST", CREDS + "reader"),
                         ("DELETE", "/latest/meta-data/placement/region"),
                         ("GET", TOKEN_PATH), ("POST", TOKEN_PATH)):
        result = imds(pod, path, token, method=method)
        assert result.status == 405, f"{method} {path}: {result}"
    aws.assert_all_unsigned()


def test_imdsv1_when_allowed(testbed, aws, fake_aws):
    role = aws.role("reader", subject("team-a", "reader"))
    pod = testbed.add_pod("app", "team-a", "reader", {ROLE: role})
    testbed.start_metabridge(*aws.args("--imds-allow-v1"))

    assert imds(pod, "/latest/meta-data/placement/region").text == REGION
    result = imds(pod, CREDS)
    assert result.status == 200 and result.text == "reader", result
    doc = wait_credentials(pod, "reader")
    v1 = imds(pod, CREDS + "reader")
    assert v1.status == 200 and v1.json()["AccessKeyId"] == doc["AccessKeyId"], v1
    # A token that is presented is still checked.
    assert imds(pod, CREDS, "garbage").status == 401
    # v2 keeps working, and so does boto3.
    assert get_ok(pod, CREDS, token_for(pod)) == "reader"
    assert_boto3_is(boto3_in(pod, fake_aws), fake_aws, role, pod)


# =============================================================================
# 3. Each pod its own role; no role, no credentials
# =============================================================================


def test_two_pods_two_roles_and_a_pod_without_a_role(testbed, aws, fake_aws, fake_kube):
    reader = aws.role("reader", subject("team-a", "reader"))
    writer = aws.role("writer", subject("team-b", "writer"))
    alice = testbed.add_pod("alice", "team-a", "reader", {ROLE: reader})
    bob = testbed.add_pod("bob", "team-b", "writer", {ROLE: writer})
    carol = testbed.add_pod("carol", "team-c", "plain", {GSA: "x@p.iam.gserviceaccount.com"})
    testbed.start_metabridge(*aws.args())

    a = boto3_in(alice, fake_aws)
    b = boto3_in(bob, fake_aws)
    alice_arn = assert_boto3_is(a, fake_aws, reader, alice)
    bob_arn = assert_boto3_is(b, fake_aws, writer, bob)
    assert alice_arn != bob_arn and a["access_key"] != b["access_key"]
    assert fake_aws.issued[a["access_key"]]["subject"] == subject("team-a", "reader")
    assert fake_aws.issued[b["access_key"]]["subject"] == subject("team-b", "writer")

    # No crossing: each pod is told only its own role.
    ta, tb = token_for(alice), token_for(bob)
    assert get_ok(alice, CREDS, ta) == "reader" and get_ok(bob, CREDS, tb) == "writer"
    assert imds(alice, CREDS + "writer", ta).status == 404
    assert imds(bob, CREDS + "reader", tb).status == 404
    assert imds(bob, CREDS_EXT + "reader", tb).status == 404

    # Every token shown to AWS was the pod's own, bound to a live pod of that SA.
    pods = {("team-a", "alice"): (alice.uid, "reader"), ("team-b", "bob"): (bob.uid, "writer")}
    sts_tokens = [r for r in fake_kube.token_requests if K8S_AUDIENCE in r["audiences"]]
    assert sts_tokens, fake_kube.token_requests
    for r in sts_tokens:
        ref = r["bound_object_ref"] or {}
        assert ref.get("kind") == "Pod", r
        owner = pods.get((r["namespace"], ref.get("name")))
        assert owner == (ref.get("uid"), r["service_account"]), f"TokenRequest {r}"

    # carol's service account has no role: 404 naming the annotation, nothing else.
    tc = token_for(carol)
    for path in (CREDS, CREDS.rstrip("/"), CREDS_EXT, "/latest/meta-data/iam/info"):
        result = imds(carol, path, tc)
        assert result.status == 404, f"GET {path} from carol: {result}"
    result = imds(carol, CREDS, tc)
    assert ROLE in result.text, f"the refusal should name {ROLE}: {result}"
    leaked = [a["access_key"], b["access_key"]]
    for path in (CREDS + "reader", CREDS + "writer", CREDS_EXT + "reader",
                 "/latest/dynamic/instance-identity/document", "/latest/meta-data/"):
        result = imds(carol, path, tc)
        assert not any(k in result.text for k in leaked), f"GET {path} from carol: {result}"
        if path.startswith(CREDS) or path.startswith(CREDS_EXT):
            assert result.status == 404, f"GET {path} from carol: {result}"
    c = boto3_in(carol, fake_aws)
    assert_no_credentials(c, carol)
    assert c["imds_region"] == a["imds_region"], (c, a)  # placement is the node's
    assert not [x for x in fake_aws.calls_for("AssumeRoleWithWebIdentity")
                if x["subject"] == subject("team-c", "plain")]
    assert not [r for r in fake_kube.token_requests if r["service_account"] == "plain"]
    aws.assert_all_unsigned()


# =============================================================================
# 4. The cloud decides: a service account the role does not trust
# =============================================================================


def test_a_role_that_does_not_trust_the_service_account_is_refused_by_sts(
        testbed, aws, fake_aws):
    role = aws.role("payments", subject("pay", "payments"))
    good = testbed.add_pod("api", "pay", "payments", {ROLE: role})
    # Another service account claims the same role in its annotation.
    intruder = testbed.add_pod("intruder", "other", "sneaky", {ROLE: role})
    testbed.start_metabridge(*aws.args())

    assert_boto3_is(boto3_in(good, fake_aws), fake_aws, role, good)

    token = token_for(intruder)
    assert get_ok(intruder, CREDS, token) == "payments"  # the annotation names it
    result = imds(intruder, CREDS + "payments", token)
    assert result.status is not None, result
    assert STS_ACCESS_DENIED in result.text, \
        f"the refusal should carry STS's AccessDenied message: {result}"
    if result.status == 200:
        body = result.json()
        assert body.get("Code") not in (None, "Success"), body
        assert "AccessKeyId" not in body and "Token" not in body, body
    assert_no_credentials(boto3_in(intruder, fake_aws), intruder)

    denied = [c for c in aws.assume_calls(role) if c["subject"] == subject("other", "sneaky")]
    assert denied and all(c["code"] == "AccessDenied" for c in denied), denied
    assert not [k for k, v in fake_aws.issued.items() if v["subject"] == subject("other", "sneaky")]
    aws.assert_all_unsigned()


# =============================================================================
# 5. The cache: one exchange per identity, serving through STS faults
# =============================================================================


def test_one_exchange_per_service_account_and_cached_credentials_survive_sts_faults(
        testbed, aws, fake_aws):
    role = aws.role("shared", subject("apps", "worker"))
    pods = [testbed.add_pod(f"worker-{i}", "apps", "worker", {ROLE: role}) for i in range(2)]
    testbed.start_metabridge(*aws.args())

    # 3 processes per pod at once, 4 calls each: a cold start storm.
    procs = [(pod, pod.popen(boto3_argv(fake_aws.url_for(testbed.host_ip), 4), text=True))
             for pod in pods for _ in range(3)]
    outs = []
    for pod, proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        outs.append(parse_probe(pod, stdout, stderr, proc.returncode))
    keys = set()
    for (pod, _), out in zip(procs, outs):
        assert_boto3_is(out, fake_aws, role, pod)
        keys.add(out["access_key"])
    assert len(keys) == 1, f"pods of one service account got different sessions: {keys}"
    minted = aws.assume_calls(role, status=200)
    assert len(minted) == 1, f"expected one AssumeRoleWithWebIdentity, got {minted}"
    assert len(fake_aws.calls_for("GetCallerIdentity")) == 24

    # STS throttles, then fails: the cached session is still served.
    for code in ("Throttling", "ServiceUnavailable"):
        fake_aws.set_fault("AssumeRoleWithWebIdentity", code=code)
        for pod in pods:
            out = boto3_in(pod, fake_aws)
            assert_boto3_is(out, fake_aws, role, pod)
            assert out["access_key"] in keys, (code, out)
    fake_aws.clear_faults()
    assert len(aws.assume_calls(role, status=200)) == 1
    aws.assert_all_unsigned()


def test_a_cold_miss_during_an_sts_outage_answers_5xx_fast_then_recovers(
        testbed, aws, fake_aws):
    failing = aws.role("cold", subject("apps", "cold"))
    hanging = aws.role("hung", subject("apps", "hung"))
    testbed.start_metabridge(*aws.args())

    def assert_fast_5xx(pod, role_name):
        token = token_for(pod)
        assert get_ok(pod, CREDS, token) == role_name
        for _ in range(2):
            result = imds(pod, CREDS + role_name, token, timeout=5)
            assert result.status is not None and 500 <= result.status <= 599, \
                f"a cold miss while STS fails should be a 5xx: {result}"
            assert result.elapsed < 1.2, \
                f"botocore waits 1 s; the answer took {result.elapsed:.2f}s: {result}"
            assert "AccessKeyId" not in result.text
        assert_no_credentials(boto3_in(pod, fake_aws), pod)

    # STS answers 503 at once.
    fake_aws.set_fault("AssumeRoleWithWebIdentity", code="ServiceUnavailable")
    cold = testbed.add_pod("cold", "apps", "cold", {ROLE: failing})
    assert_fast_5xx(cold, "cold")
    failed = aws.assume_calls(failing)
    assert failed and all(c["code"] == "ServiceUnavailable" for c in failed), failed

    # STS hangs for 2.5 s, then answers 503.
    fake_aws.set_fault("AssumeRoleWithWebIdentity", code="ServiceUnavailable", latency=2.5)
    hung = testbed.add_pod("hung", "apps", "hung", {ROLE: hanging})
    assert_fast_5xx(hung, "hung")

    fake_aws.clear_faults()
    for pod, role, name in ((cold, failing, "cold"), (hung, hanging, "hung")):
        doc = wait_credentials(pod, name, timeout=15)
        assert fake_aws.issued[doc["AccessKeyId"]]["role_arn"] == role
        assert_boto3_is(boto3_in(pod, fake_aws), fake_aws, role, pod)
    aws.assert_all_unsigned()


# =============================================================================
# 6. Google token source (seed 002): AWS trusts accounts.google.com
# =============================================================================


@pytest.mark.parametrize("how", ["flag", "annotation"])
def test_google_token_source(testbed, fake_kube, fake_aws, fake_google, how):
    gsa = f"aws-bridge@{GCP_PROJECT}.iam.gserviceaccount.com"
    unique_id = fake_google.add_service_account(gsa)["unique_id"]
    fake_google.add_oidc_provider(GCP_PROJECT_NUMBER, GCP_POOL, GCP_PROVIDER, fake_kube.issuer)
    pool = f"projects/{GCP_PROJECT_NUMBER}/locations/global/workloadIdentityPools/{GCP_POOL}"
    fake_google.grant_workload_identity_user(
        gsa, f"principal://iam.googleapis.com/{pool}/subject/{subject('bridge', 'exporter')}")

    fake_aws.add_oidc_provider("https://accounts.google.com", client_ids=[],
                               jwks_url=fake_google.jwks_url)
    role = fake_aws.add_role("from-google", provider="accounts.google.com", conditions={
        "accounts.google.com:aud": unique_id, "accounts.google.com:sub": unique_id})

    annotations = {GSA: gsa, ROLE: role}
    mode = ["--aws-token-source", "google"]
    if how == "annotation":  # kubernetes by default, google for this SA
        annotations[TOKEN_SOURCE] = "google"
        mode = []
    pod = testbed.add_pod("exporter", "bridge", "exporter", annotations)
    # Same GSA and role in the annotations, but Google never granted this SA.
    stranger = testbed.add_pod("stranger", "bridge", "stranger", dict(annotations))
    testbed.start_metabridge(
        "--aws-region", REGION, "--aws-sts-url", fake_aws.url, *mode,
        "--gcp-workload-identity-provider", GCP_PROVIDER_NAME,
        "--gcp-project-id", GCP_PROJECT,
        "--gcp-sts-url", fake_google.url, "--gcp-iamcredentials-url", fake_google.url)

    out = boto3_in(pod, fake_aws)
    assert_boto3_is(out, fake_aws, role, pod)
    issued = fake_aws.issued[out["access_key"]]
    assert issued["provider"] == "accounts.google.com" and issued["subject"] == unique_id, issued
    id_tokens = [c for c in fake_google.calls_to("generateIdToken") if c["status"] == 200]
    assert id_tokens and {c["target"] for c in id_tokens} == {gsa}, id_tokens
    assert {c["audience"] for c in id_tokens} == {"sts.amazonaws.com"}, id_tokens
    calls = fake_aws.calls_for("AssumeRoleWithWebIdentity")
    assert calls and all(c["signed"] is False for c in calls), calls
    assert not [c for c in calls if c["subject"] and c["subject"].startswith("system:")], \
        f"a Kubernetes token was shown to AWS in google mode: {calls}"

    # Google's IAM, not metabridge, refuses the ungranted service account.
    result = imds(stranger, CREDS + "from-google", token_for(stranger))
    assert result.status is not None and "AccessKeyId" not in result.text, result
    assert_no_credentials(boto3_in(stranger, fake_aws), stranger)
    refused = [c for c in fake_google.calls_to("generateIdToken") if c["status"] != 200]
    assert refused and all(c["status"] == 403 for c in refused), fake_google.calls
