"""Self-tests of tests/support/fake_aws.py against real boto3 / botocore / awscli.

Run: cd /work/main && python -m pytest tests/support_tests/test_fake_aws.py -q
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import botocore
import jwt
import pytest
import requests
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric import ec, rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.fake_aws import FakeAwsSts  # noqa: E402

NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"
SA_SUB = "system:serviceaccount:team-a:app"
K8S_AUD = "sts.amazonaws.com"


# --------------------------------------------------------------------------- a tiny OIDC issuer


class OidcIssuer:
    """Minimal OIDC issuer: discovery + JWKS over real HTTP, RS256/ES256 signing."""

    def __init__(self, jwks_path: str = "/openid/v1/jwks", iss: str | None = None):
        self.jwks_path = jwks_path
        self._iss = iss
        self.keys: list[tuple[str, object]] = []
        self.jwks_requests = 0
        self.rotate()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.issuer, "jwks_uri": issuer.base + issuer.jwks_path,
                            "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["RS256"]}
                elif self.path == issuer.jwks_path:
                    issuer.jwks_requests += 1
                    body = issuer.jwks()
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def issuer(self) -> str:
        return self._iss or self.base

    @property
    def provider(self) -> str:
        return self.issuer.split("://", 1)[1]

    def rotate(self, kind: str = "rsa") -> str:
        kid = uuid.uuid4().hex[:16]
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" \
            else ec.generate_private_key(ec.SECP256R1())
        self.keys.insert(0, (kid, key))
        return kid

    def jwks(self) -> dict:
        out = []
        for kid, key in self.keys:
            alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            jwk.update(kid=kid, use="sig", alg=alg)
            out.append(jwk)
        return {"keys": out}

    def sign(self, *, sub=SA_SUB, aud=(K8S_AUD,), lifetime=600, key=None, kid=None, extra=None,
             iss=None, alg=None) -> str:
        now = int(time.time())
        claims = {"iss": iss or self.issuer, "sub": sub, "iat": now, "nbf": now, "exp": now + lifetime}
        if aud is not None:
            claims["aud"] = list(aud) if isinstance(aud, (list, tuple)) else aud
        claims.update(extra or {})
        kid0, key0 = self.keys[0]
        key = key or key0
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid or kid0})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(autouse=True)
def _isolated_aws_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def issuer():
    i = OidcIssuer()
    yield i
    i.close()


@pytest.fixture
def sts(issuer):
    with FakeAwsSts() as fake:
        fake.add_oidc_provider(issuer.issuer, client_ids=[K8S_AUD])
        fake.add_role("app", provider=issuer.provider,
                      conditions={f"{issuer.provider}:sub": SA_SUB, f"{issuer.provider}:aud": K8S_AUD})
        yield fake


def client(fake, *, creds=None, region="us-east-1", attempts=1, validate=True):
    cfg = Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                 parameter_validation=validate,
                 signature_version=botocore.UNSIGNED if creds is None else "v4")
    kw = {}
    if creds is not None:
        kw = dict(aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
                  aws_session_token=creds.get("SessionToken"))
    return boto3.client("sts", endpoint_url=fake.url, region_name=region, config=cfg, **kw)


def assume(fake, token, role="app", session="team-a.app", **kw):
    validate = kw.pop("validate", True)
    attempts = kw.pop("attempts", 1)
    return client(fake, validate=validate, attempts=attempts).assume_role_with_web_identity(
        RoleArn=f"arn:aws:iam::{fake.account_id}:role/{role}", RoleSessionName=session,
        WebIdentityToken=token, **kw)


def client_error(fn, *args, **kw) -> ClientError:
    with pytest.raises(ClientError) as ei:
        fn(*args, **kw)
    return ei.value


def code_status(err: ClientError):
    return (err.response["Error"]["Code"], err.response["ResponseMetadata"]["HTTPStatusCode"],
            err.response["Error"]["Message"])


def form_post(fake, params: dict, headers=None) -> requests.Response:
    return requests.post(fake.url + "/", data=params, headers=headers or {}, timeout=10)


def parse_error(resp: requests.Response):
    root = ET.fromstring(resp.content)
    assert root.tag == NS + "ErrorResponse"
    err = root.find(NS + "Error")
    assert [c.tag for c in err] == [NS + "Type", NS + "Code", NS + "Message"]
    assert [c.tag for c in root] == [NS + "Error", NS + "RequestId"]
    assert root.find(NS + "RequestId").text == resp.headers["x-amzn-RequestId"]
    return err.find(NS + "Type").text, err.find(NS + "Code").text, err.find(NS + "Message").text


# --------------------------------------------------------------------------- AssumeRoleWithWebIdentity


def test_assume_role_success_via_boto3(sts, issuer):
    out = assume(sts, issuer.sign(), DurationSeconds=1800)
    c = out["Credentials"]
    assert re.fullmatch(r"ASIA[A-Z0-9]{16}", c["AccessKeyId"])
    assert re.fullmatch(r"[A-Za-z0-9+/]{40}", c["SecretAccessKey"])
    assert len(c["SessionToken"]) > 300
    assert isinstance(c["Expiration"], datetime) and c["Expiration"].tzinfo is not None
    left = (c["Expiration"] - datetime.now(timezone.utc)).total_seconds()
    assert 1790 <= left <= 1801
    assert out["SubjectFromWebIdentityToken"] == SA_SUB
    arn = "arn:aws:sts::123456789012:assumed-role/app/team-a.app"
    assert out["AssumedRoleUser"]["Arn"] == arn
    assert re.fullmatch(r"AROA[A-Z0-9]{17}:team-a\.app", out["AssumedRoleUser"]["AssumedRoleId"])
    assert out["Provider"] == f"arn:aws:iam::123456789012:oidc-provider/{issuer.provider}"
    assert out["Audience"] == K8S_AUD
    assert "PackedPolicySize" not in out
    md = out["ResponseMetadata"]
    assert md["HTTPHeaders"]["content-type"] == "text/xml"
    assert md["HTTPHeaders"]["x-amzn-requestid"] == md["RequestId"]
    uuid.UUID(md["RequestId"])

    rec = sts.issued[c["AccessKeyId"]]
    assert rec["secret"] == c["SecretAccessKey"] and rec["session_token"] == c["SessionToken"]
    assert rec["arn"] == arn and rec["role_arn"] == "arn:aws:iam::123456789012:role/app"
    assert rec["session_name"] == "team-a.app"
    assert rec["expiration"] == c["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")
    assert sts.identity_of(c["AccessKeyId"]) == arn
    assert sts.identity_of("ASIANOTISSUED0000000") is None
    call = sts.calls[-1]
    assert call == {**call, "action": "AssumeRoleWithWebIdentity", "status": 200, "code": None,
                    "role_arn": "arn:aws:iam::123456789012:role/app", "session_name": "team-a.app",
                    "subject": SA_SUB, "duration": 1800, "signed": False}


def test_assume_role_wire_shape_form_post_and_get(sts, issuer):
    token = issuer.sign()
    params = {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
              "RoleArn": "arn:aws:iam::123456789012:role/app", "RoleSessionName": "s1",
              "WebIdentityToken": token}
    for resp in (form_post(sts, params),
                 requests.get(sts.url + "/?" + urllib.parse.urlencode(params), timeout=10)):
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "text/xml"
        root = ET.fromstring(resp.content)
        assert root.tag == NS + "AssumeRoleWithWebIdentityResponse"
        assert [c.tag for c in root] == [NS + "AssumeRoleWithWebIdentityResult", NS + "ResponseMetadata"]
        result = root.find(NS + "AssumeRoleWithWebIdentityResult")
        assert [c.tag for c in result] == [NS + t for t in (
            "Credentials", "SubjectFromWebIdentityToken", "AssumedRoleUser", "Provider", "Audience")]
        creds = result.find(NS + "Credentials")
        assert [c.tag for c in creds] == [NS + t for t in (
            "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", creds.find(NS + "Expiration").text)
        user = result.find(NS + "AssumedRoleUser")
        assert [c.tag for c in user] == [NS + "Arn", NS + "AssumedRoleId"]
        assert root.find(f"{NS}ResponseMetadata/{NS}RequestId").text == resp.headers["x-amzn-RequestId"]


def test_session_policy_reports_packed_size(sts, issuer):
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]})
    out = assume(sts, issuer.sign(), Policy=policy)
    assert 1 <= out["PackedPolicySize"] <= 100
    err = client_error(assume, sts, issuer.sign(), Policy="{not json")
    assert code_status(err)[:2] == ("MalformedPolicyDocument", 400)
    err = client_error(assume, sts, issuer.sign(), Policy="x" * 2049, validate=False)
    assert code_status(err) == ("ValidationError", 400,
                                "1 validation error detected: Value '" + "x" * 2049 + "' at 'policy' failed to "
                                "satisfy constraint: Member must have length less than or equal to 2048")


@pytest.mark.parametrize("session,duration,message", [
    ("bad name!", None, "1 validation error detected: Value 'bad name!' at 'roleSessionName' failed to satisfy "
                        "constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]*"),
    ("a", None, "1 validation error detected: Value 'a' at 'roleSessionName' failed to satisfy constraint: "
                "Member must have length greater than or equal to 2"),
    ("x" * 65, None, "1 validation error detected: Value '" + "x" * 65 + "' at 'roleSessionName' failed to "
                     "satisfy constraint: Member must have length less than or equal to 64"),
    ("ok", 600, "1 validation error detected: Value '600' at 'durationSeconds' failed to satisfy constraint: "
                "Member must have value greater than or equal to 900"),
    ("ok", 43201, "1 validation error detected: Value '43201' at 'durationSeconds' failed to satisfy "
                  "constraint: Member must have value less than or equal to 43200"),
    ("ok", 7200, "The requested DurationSeconds exceeds the MaxSessionDuration set for this role."),
    ("a b", 100, "2 validation errors detected: Value 'a b' at 'roleSessionName' failed to satisfy constraint: "
                 "Member must satisfy regular expression pattern: [\\w+=,.@-]*; Value '100' at "
                 "'durationSeconds' failed to satisfy constraint: Member must have value greater than or "
                 "equal to 900"),
])
def test_validation_errors(sts, issuer, session, duration, message):
    kw = {"DurationSeconds": duration} if duration is not None else {}
    err = client_error(assume, sts, issuer.sign(), session=session, validate=False, **kw)
    assert code_status(err) == ("ValidationError", 400, message)
    assert sts.calls[-1]["code"] == "ValidationError" and sts.calls[-1]["status"] == 400


def test_duration_up_to_role_max_is_accepted(sts, issuer):
    sts.add_role("long", provider=issuer.provider, conditions={f"{issuer.provider}:sub": SA_SUB},
                 max_session_duration=43200)
    out = assume(sts, issuer.sign(), role="long", DurationSeconds=43200)
    left = (out["Credentials"]["Expiration"] - datetime.now(timezone.utc)).total_seconds()
    assert 43190 <= left <= 43201
    assert code_status(client_error(assume, sts, issuer.sign(), DurationSeconds=3601))[0] == "ValidationError"
    assert assume(sts, issuer.sign(), DurationSeconds=900)["Credentials"]


def test_missing_and_malformed_parameters_raw(sts, issuer):
    resp = form_post(sts, {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
                           "RoleSessionName": "s1", "WebIdentityToken": issuer.sign()})
    assert resp.status_code == 400
    assert parse_error(resp) == ("Sender", "ValidationError",
                                 "1 validation error detected: Value null at 'roleArn' failed to satisfy "
                                 "constraint: Member must not be null")
    resp = form_post(sts, {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
                           "RoleArn": "arn:aws:iam::123456789012:user/app", "RoleSessionName": "s1",
                           "WebIdentityToken": issuer.sign()})
    assert resp.status_code == 400 and parse_error(resp)[1:] == ("ValidationError", "Request ARN is invalid")
    resp = form_post(sts, {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
                           "RoleArn": "short", "RoleSessionName": "s1", "WebIdentityToken": "abc"})
    assert resp.status_code == 400
    assert parse_error(resp)[2] == (
        "2 validation errors detected: Value 'short' at 'roleArn' failed to satisfy constraint: Member must "
        "have length greater than or equal to 20; Value at 'webIdentityToken' failed to satisfy constraint: "
        "Member must have length greater than or equal to 4")


def test_token_errors(sts, issuer):
    other = OidcIssuer()
    try:
        cases = []
        # issuer without a provider
        err = client_error(assume, sts, other.sign())
        cases.append((err, "InvalidIdentityToken", 400,
                      f"No OpenIDConnect provider found in your account for {other.issuer}"))
        # right kid, wrong key
        forged = issuer.sign(key=other.keys[0][1], kid=issuer.keys[0][0])
        err = client_error(assume, sts, forged)
        cases.append((err, "InvalidIdentityToken", 400, None))
        # audience not in client ids
        err = client_error(assume, sts, issuer.sign(aud=["https://kubernetes.default.svc"]))
        cases.append((err, "InvalidIdentityToken", 400, "Incorrect token audience"))
        # not a JWT at all
        err = client_error(assume, sts, "ya29.an-oauth-access-token")
        cases.append((err, "InvalidIdentityToken", 400,
                      "The ID Token provided is not a valid JWT. (You may see this error if you sent an "
                      "Access Token)"))
        # HS256 is refused
        hs = jwt.encode({"iss": issuer.issuer, "sub": SA_SUB, "aud": K8S_AUD, "exp": int(time.time()) + 600},
                        "secret-secret-secret-secret-1234", algorithm="HS256", headers={"kid": issuer.keys[0][0]})
        err = client_error(assume, sts, hs)
        cases.append((err, "InvalidIdentityToken", 400, None))
        for err, code, status, message in cases:
            got = code_status(err)
            assert got[:2] == (code, status), got
            if message is not None:
                assert got[2] == message
        assert "signature" in code_status(cases[1][0])[2]
    finally:
        other.close()


def test_expired_token(sts, issuer):
    token = issuer.sign(lifetime=-5)
    err = client_error(assume, sts, token)
    code, status, message = code_status(err)
    assert (code, status) == ("ExpiredTokenException", 400)
    m = re.fullmatch(r"Token expired: current date/time (\d+) must be before the expiration date/time (\d+)",
                     message)
    assert m and int(m.group(1)) > int(m.group(2))
    assert int(m.group(2)) == jwt.decode(token, options={"verify_signature": False})["exp"]


def test_unreachable_jwks_and_key_rotation(sts, issuer):
    dead = OidcIssuer()
    sts.add_oidc_provider(dead.issuer, client_ids=[K8S_AUD])
    sts.add_role("dead", provider=dead.provider, conditions={f"{dead.provider}:sub": SA_SUB})
    token = dead.sign()
    dead.close()
    err = client_error(assume, sts, token, role="dead")
    assert code_status(err) == ("InvalidIdentityToken", 400,
                                "Couldn't retrieve verification key from your identity provider,  please "
                                "reference AssumeRoleWithWebIdentity documentation for requirements")
    # A rotated key (new kid) is picked up by refetching the JWKS.
    assume(sts, issuer.sign())
    before = issuer.jwks_requests
    assume(sts, issuer.sign())
    assert issuer.jwks_requests == before  # cached
    issuer.rotate()
    assume(sts, issuer.sign())
    assert issuer.jwks_requests == before + 1
    # ES256 keys work too.
    issuer.rotate("ec")
    assert assume(sts, issuer.sign(alg="ES256"))["Credentials"]


def test_trust_policy_denials(sts, issuer):
    other_provider = OidcIssuer()
    try:
        sts.add_oidc_provider(other_provider.issuer, client_ids=[K8S_AUD])
        # wrong service account
        err = client_error(assume, sts, issuer.sign(sub="system:serviceaccount:team-b:app"))
        assert code_status(err) == ("AccessDenied", 403, "Not authorized to perform sts:AssumeRoleWithWebIdentity")
        # role that does not exist
        assert code_status(client_error(assume, sts, issuer.sign(), role="nope"))[:2] == ("AccessDenied", 403)
        # role in another account
        err = client_error(client(sts).assume_role_with_web_identity,
                           RoleArn="arn:aws:iam::210987654321:role/app", RoleSessionName="s1",
                           WebIdentityToken=issuer.sign())
        assert code_status(err)[:2] == ("AccessDenied", 403)
        # valid token of a provider the role does not trust
        err = client_error(assume, sts, other_provider.sign())
        assert code_status(err)[:2] == ("AccessDenied", 403)
        # ... even when the role has no conditions at all
        sts.add_role("open", provider=issuer.provider, conditions={})
        assert assume(sts, issuer.sign(sub="anyone"), role="open")["Credentials"]
        err = client_error(assume, sts, other_provider.sign(), role="open")
        assert code_status(err)[:2] == ("AccessDenied", 403)
        assert sts.calls[-1]["code"] == "AccessDenied" and sts.calls[-1]["status"] == 403
    finally:
        other_provider.close()


def test_condition_forms(sts, issuer):
    p = issuer.provider
    sts.add_role("like", provider=p, conditions={
        "StringEquals": {f"{p}:aud": [K8S_AUD, "other"]},
        "StringLike": {f"{p}:sub": "system:serviceaccount:team-?:*"},
        "StringNotEquals": {f"{p}:sub": "system:serviceaccount:team-a:blocked"},
    })
    assert assume(sts, issuer.sign(sub="system:serviceaccount:team-b:x"), role="like")
    for sub in ("system:serviceaccount:team-a:blocked", "system:serviceaccount:teams-a:x",
                "System:serviceaccount:team-a:x"):
        assert code_status(client_error(assume, sts, issuer.sign(sub=sub), role="like"))[0] == "AccessDenied"
    # A multi-valued aud matches when one value is a client id and satisfies the condition.
    assert assume(sts, issuer.sign(aud=["https://kubernetes.default.svc", K8S_AUD]))
    # A condition on a key the token does not provide never holds.
    sts.add_role("email", provider=p, conditions={f"{p}:email": "a@b.c"})
    assert code_status(client_error(assume, sts, issuer.sign(), role="email"))[0] == "AccessDenied"
    with pytest.raises(ValueError):
        sts.add_role("bad", provider=p, conditions={"StringEquals": {}, f"{p}:sub": "x"})
    with pytest.raises(ValueError):
        sts.add_role("short", provider=p, conditions={}, max_session_duration=1800)


# --------------------------------------------------------------------------- accounts.google.com


@pytest.fixture(scope="module")
def google():
    g = OidcIssuer(jwks_path="/oauth2/v3/certs", iss="https://accounts.google.com")
    yield g
    g.close()


GSA_ID = "112233445566778899001"
AUDIENCE = "https://metabridge.example/aws"


def test_google_provider_conditions(sts, google):
    arn = sts.add_oidc_provider("https://accounts.google.com", client_ids=[],
                                jwks_url=google.base + google.jwks_path)
    assert arn == "arn:aws:iam::123456789012:oidc-provider/accounts.google.com"
    sts.add_role("gcp", provider="accounts.google.com", conditions={
        "accounts.google.com:aud": GSA_ID, "accounts.google.com:oaud": AUDIENCE,
        "accounts.google.com:sub": GSA_ID})
    extra = {"azp": GSA_ID, "email": "app@proj.iam.gserviceaccount.com", "email_verified": True}
    out = assume(sts, google.sign(sub=GSA_ID, aud=AUDIENCE, extra=extra), role="gcp")
    assert out["Provider"] == "accounts.google.com"
    assert out["Audience"] == GSA_ID  # the azp
    assert out["SubjectFromWebIdentityToken"] == GSA_ID
    assert out["AssumedRoleUser"]["Arn"].endswith(":assumed-role/gcp/team-a.app")

    # ':aud' reads azp, not aud: a role conditioned on the aud value as ':aud' is denied.
    sts.add_role("gcp-aud", provider="accounts.google.com", conditions={"accounts.google.com:aud": AUDIENCE})
    err = client_error(assume, sts, google.sign(sub=GSA_ID, aud=AUDIENCE, extra=extra), role="gcp-aud")
    assert code_status(err)[:2] == ("AccessDenied", 403)
    # ... but without azp, ':aud' is the aud claim.
    out = assume(sts, google.sign(sub=GSA_ID, aud=AUDIENCE), role="gcp-aud")
    assert out["Audience"] == AUDIENCE
    # oaud mismatch and sub mismatch are denied.
    err = client_error(assume, sts, google.sign(sub=GSA_ID, aud="https://other", extra=extra), role="gcp")
    assert code_status(err)[0] == "AccessDenied"
    err = client_error(assume, sts, google.sign(sub="999", aud=AUDIENCE, extra=extra), role="gcp")
    assert code_status(err)[0] == "AccessDenied"
    # 'accounts.google.com' without scheme as iss is the same provider.
    out = assume(sts, google.sign(sub=GSA_ID, aud=AUDIENCE, extra=extra, iss="accounts.google.com"), role="gcp")
    assert out["Provider"] == "accounts.google.com"


# --------------------------------------------------------------------------- GetCallerIdentity / SigV4


@pytest.fixture
def creds(sts, issuer):
    return assume(sts, issuer.sign())["Credentials"]


def test_get_caller_identity_with_issued_credentials(sts, creds):
    for region in ("us-east-1", "eu-west-3", "us-gov-west-1", "cn-north-1"):
        out = client(sts, creds=creds, region=region).get_caller_identity()
        assert out["Arn"] == "arn:aws:sts::123456789012:assumed-role/app/team-a.app"
        assert re.fullmatch(r"AROA[A-Z0-9]{17}:team-a\.app", out["UserId"])
        assert out["Account"] == "123456789012"
        assert out["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "text/xml"
    call = sts.calls[-1]
    assert call["action"] == "GetCallerIdentity" and call["status"] == 200 and call["signed"]
    assert call["access_key_id"] == creds["AccessKeyId"] and call["role_arn"].endswith(":role/app")


def test_get_caller_identity_auth_errors(sts, creds):
    resp = form_post(sts, {"Action": "GetCallerIdentity", "Version": "2011-06-15"})
    assert resp.status_code == 403
    assert parse_error(resp) == ("Sender", "MissingAuthenticationToken", "Request is missing Authentication Token")
    err = client_error(client(sts).get_caller_identity)
    assert code_status(err) == ("MissingAuthenticationToken", 403, "Request is missing Authentication Token")

    tampered = dict(creds, SecretAccessKey=creds["SecretAccessKey"][:-1] + ("A" if creds["SecretAccessKey"][-1] != "A" else "B"))
    err = client_error(client(sts, creds=tampered).get_caller_identity)
    assert code_status(err) == ("SignatureDoesNotMatch", 403,
                                "The request signature we calculated does not match the signature you provided. "
                                "Check your AWS Secret Access Key and signing method. Consult the service "
                                "documentation for details.")
    unknown = dict(creds, AccessKeyId="ASIAUNKNOWNKEY000000")
    err = client_error(client(sts, creds=unknown).get_caller_identity)
    assert code_status(err) == ("InvalidClientTokenId", 403, "The security token included in the request is invalid.")
    no_token = dict(creds, SessionToken=None)
    assert code_status(client_error(client(sts, creds=no_token).get_caller_identity))[:2] == \
        ("InvalidClientTokenId", 403)
    wrong_token = dict(creds, SessionToken=creds["SessionToken"][:-4] + "AAAA")
    assert code_status(client_error(client(sts, creds=wrong_token).get_caller_identity))[:2] == \
        ("InvalidClientTokenId", 403)
    err = client_error(client(sts, creds=creds, region="moonbase").get_caller_identity)
    assert code_status(err)[:2] == ("SignatureDoesNotMatch", 403)
    assert "valid region" in code_status(err)[2]

    sts.expire_credentials(creds["AccessKeyId"])
    err = client_error(client(sts, creds=creds).get_caller_identity)
    assert code_status(err) == ("ExpiredToken", 403, "The security token included in the request is expired")


def test_sigv4_clock_skew(sts, creds):
    sts.clock_offset = 16 * 60
    err = client_error(client(sts, creds=creds).get_caller_identity)
    code, status, message = code_status(err)
    assert (code, status) == ("SignatureDoesNotMatch", 403)
    assert re.fullmatch(r"Signature expired: \d{8}T\d{6}Z is now earlier than \d{8}T\d{6}Z "
                        r"\(\d{8}T\d{6}Z - 15 min\.\)", message), message
    sts.clock_offset = -16 * 60
    code, status, message = code_status(client_error(client(sts, creds=creds).get_caller_identity))
    assert code == "SignatureDoesNotMatch" and message.startswith("Signature not yet current: ")
    sts.clock_offset = 14 * 60
    assert client(sts, creds=creds).get_caller_identity()["Account"] == "123456789012"


def _signed(creds, method, url, *, region="us-east-1", data=None, headers=None, query=False, host=None):
    req = AWSRequest(method=method, url=url, data=data, headers=dict(headers or {}))
    if host:
        req.headers["Host"] = host
    c = Credentials(creds["AccessKeyId"], creds["SecretAccessKey"], creds.get("SessionToken"))
    (SigV4QueryAuth(c, "sts", region, expires=60) if query else SigV4Auth(c, "sts", region)).add_auth(req)
    return req


def test_get_form_query_and_presigned(sts, creds):
    arn = "arn:aws:sts::123456789012:assumed-role/app/team-a.app"
    # Query-string GET with an Authorization header.
    req = _signed(creds, "GET", sts.url + "/?Action=GetCallerIdentity&Version=2011-06-15")
    resp = requests.get(req.url, headers=dict(req.headers), timeout=10)
    assert resp.status_code == 200, resp.text
    assert ET.fromstring(resp.content).find(f"{NS}GetCallerIdentityResult/{NS}Arn").text == arn
    # Presigned URL (auth in the query string), as aws-iam-authenticator does.
    req = _signed(creds, "GET", sts.url + "/?Action=GetCallerIdentity&Version=2011-06-15", query=True)
    assert "X-Amz-Signature=" in req.url and "Authorization" not in req.headers
    resp = requests.get(req.url, timeout=10)
    assert resp.status_code == 200, resp.text
    assert ET.fromstring(resp.content).find(f"{NS}GetCallerIdentityResult/{NS}Arn").text == arn
    bad = re.sub(r"X-Amz-Signature=([0-9a-f])", lambda m: "X-Amz-Signature=" + ("0" if m.group(1) != "0" else "1"),
                 req.url)
    resp = requests.get(bad, timeout=10)
    assert resp.status_code == 403 and parse_error(resp)[1] == "SignatureDoesNotMatch"
    # POST form whose body was changed after signing.
    body = "Action=GetCallerIdentity&Version=2011-06-15"
    hdrs = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    req = _signed(creds, "POST", sts.url + "/", data=body, headers=hdrs)
    ok = requests.post(sts.url + "/", data=body, headers=dict(req.headers), timeout=10)
    assert ok.status_code == 200, ok.text
    resp = requests.post(sts.url + "/", data=body + "&Extra=1", headers=dict(req.headers), timeout=10)
    assert resp.status_code == 403 and parse_error(resp)[1] == "SignatureDoesNotMatch"


def test_replayed_request_signed_for_aws_host(sts, creds):
    """A request serialized for sts.<region>.amazonaws.com and delivered to us verbatim."""
    body = "Action=GetCallerIdentity&Version=2011-06-15"
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    req = _signed(creds, "POST", "https://sts.us-west-2.amazonaws.com/", data=body, headers=headers,
                  region="us-west-2")
    assert "host" in req.headers["Authorization"].split("SignedHeaders=")[1]

    def deliver(host_header):
        conn = http.client.HTTPConnection("127.0.0.1", sts.port, timeout=10)
        hdrs = {k: v for k, v in req.headers.items()}
        hdrs["Host"] = host_header
        conn.request("POST", "/", body=body.encode(), headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data

    status, data = deliver("sts.us-west-2.amazonaws.com")
    assert status == 200, data
    assert ET.fromstring(data).find(f"{NS}GetCallerIdentityResult/{NS}Arn").text.endswith("/app/team-a.app")
    status, data = deliver(f"127.0.0.1:{sts.port}")
    assert status == 403 and b"SignatureDoesNotMatch" in data


def test_awscli(sts, issuer):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true")
    base = [sys.executable, "-m", "awscli", "--endpoint-url", sts.url, "--output", "json"]
    out = subprocess.run(base + ["sts", "assume-role-with-web-identity", "--no-sign-request",
                                 "--role-arn", "arn:aws:iam::123456789012:role/app",
                                 "--role-session-name", "cli", "--web-identity-token", issuer.sign()],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    c = json.loads(out.stdout)["Credentials"]
    env.update(AWS_ACCESS_KEY_ID=c["AccessKeyId"], AWS_SECRET_ACCESS_KEY=c["SecretAccessKey"],
               AWS_SESSION_TOKEN=c["SessionToken"])
    out = subprocess.run(base + ["sts", "get-caller-identity"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ident = json.loads(out.stdout)
    assert ident["Arn"] == "arn:aws:sts::123456789012:assumed-role/app/cli"
    assert ident["Account"] == "123456789012"
    env["AWS_SECRET_ACCESS_KEY"] = "x" * 40
    out = subprocess.run(base + ["sts", "get-caller-identity"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SignatureDoesNotMatch" in out.stderr


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("code,status,ftype", [
    ("Throttling", 400, "Sender"),
    ("IDPCommunicationError", 400, "Sender"),
    ("InvalidIdentityToken", 400, "Sender"),
    ("InternalFailure", 500, "Receiver"),
    ("ServiceUnavailable", 503, "Receiver"),
])
def test_faults_reach_botocore(sts, issuer, code, status, ftype):
    sts.set_fault("AssumeRoleWithWebIdentity", code=code)
    err = client_error(assume, sts, issuer.sign())
    assert code_status(err)[:2] == (code, status)
    resp = form_post(sts, {"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
                           "RoleArn": "arn:aws:iam::123456789012:role/app", "RoleSessionName": "s1",
                           "WebIdentityToken": issuer.sign()})
    assert resp.status_code == status and parse_error(resp)[:2] == (ftype, code)
    assert [c["code"] for c in sts.calls[-2:]] == [code, code]
    sts.clear_faults()
    assert assume(sts, issuer.sign())["Credentials"]


def test_fault_count_latency_and_retries(sts, issuer, creds):
    sts.set_fault("AssumeRoleWithWebIdentity", code="Throttling", count=2)
    n = len(sts.calls)
    out = assume(sts, issuer.sign(), attempts=3)  # botocore retries Throttling
    assert out["Credentials"]
    assert [(c["status"], c["code"]) for c in sts.calls[n:]] == [(400, "Throttling"), (400, "Throttling"), (200, None)]
    # botocore's STS retry rule covers IDPCommunicationError
    sts.set_fault("AssumeRoleWithWebIdentity", code="IDPCommunicationError", count=1)
    n = len(sts.calls)
    assert assume(sts, issuer.sign(), attempts=2)["Credentials"]
    assert [c["code"] for c in sts.calls[n:]] == ["IDPCommunicationError", None]

    sts.set_fault("AssumeRoleWithWebIdentity", latency=0.6, count=1)
    t0 = time.monotonic()
    assume(sts, issuer.sign())
    assert time.monotonic() - t0 >= 0.6
    t0 = time.monotonic()
    assume(sts, issuer.sign())
    assert time.monotonic() - t0 < 0.5

    sts.set_fault("GetCallerIdentity", code="ServiceUnavailable")
    err = client_error(client(sts, creds=creds).get_caller_identity)
    assert code_status(err)[:2] == ("ServiceUnavailable", 503)
    assert assume(sts, issuer.sign())  # other actions unaffected
    sts.clear_faults()
    assert client(sts, creds=creds).get_caller_identity()["Account"] == "123456789012"
    with pytest.raises(ValueError):
        sts.set_fault("AssumeRole", code="Throttling")


# --------------------------------------------------------------------------- protocol


def test_protocol_errors_and_keepalive(sts, issuer):
    resp = form_post(sts, {"Action": "AssumeRole", "Version": "2011-06-15"})
    assert resp.status_code == 400
    assert parse_error(resp) == ("Sender", "InvalidAction", "Could not find operation AssumeRole for version 2011-06-15")
    resp = form_post(sts, {"Action": "GetCallerIdentity"})
    assert parse_error(resp)[1:] == ("InvalidAction",
                                     "Could not find operation GetCallerIdentity for version NO_VERSION_SPECIFIED")
    resp = form_post(sts, {"Version": "2011-06-15"})
    assert resp.status_code == 400 and parse_error(resp)[1] == "MissingAction"

    conn = http.client.HTTPConnection("127.0.0.1", sts.port, timeout=10)
    body = urllib.parse.urlencode({"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
                                   "RoleArn": "arn:aws:iam::123456789012:role/app", "RoleSessionName": "ka",
                                   "WebIdentityToken": issuer.sign()})
    socks = set()
    for _ in range(3):
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        assert r.status == 200 and r.version == 11
        assert int(r.getheader("Content-Length")) == len(r.read())
        socks.add(id(conn.sock))
    assert len(socks) == 1
    conn.close()


def test_binding_and_urls(sts, issuer):
    assert sts._server.server_address[0] == "0.0.0.0"
    assert sts.url == f"http://127.0.0.1:{sts.port}"
    assert sts.url_for("10.1.2.3") == f"http://10.1.2.3:{sts.port}"
    assert sts.url_for("fd00::1") == f"http://[fd00::1]:{sts.port}"
    # Reachable on a non-loopback address of this host when it has one.
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("10.255.255.255", 1))
        addr = s.getsockname()[0]
        s.close()
    except OSError:
        addr = None
    if addr and not addr.startswith("127."):
        resp = requests.post(sts.url_for(addr) + "/", data={"Action": "GetCallerIdentity", "Version": "2011-06-15"},
                             timeout=10)
        assert resp.status_code == 403 and parse_error(resp)[1] == "MissingAuthenticationToken"


def test_concurrent_assumes_are_distinct(sts, issuer):
    results, errors = [], []

    def worker(i):
        try:
            results.append(assume(sts, issuer.sign(), session=f"s{i}")["Credentials"]["AccessKeyId"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 16 and all(k in sts.issued for k in results)


def test_fake_kube_token_request_tokens():
    """A TokenRequest token from the project's fake kube-apiserver is accepted (keys via its discovery)."""
    fake_kube = pytest.importorskip("support.fake_kube")
    with fake_kube.FakeKube() as kube, FakeAwsSts() as fake:
        provider = kube.issuer.split("://", 1)[1]
        arn = fake.add_oidc_provider(kube.issuer, client_ids=[K8S_AUD])
        assert arn == f"arn:aws:iam::123456789012:oidc-provider/{provider}"
        role = fake.add_role("kube", provider=provider, conditions={
            f"{provider}:sub": SA_SUB, f"{provider}:aud": K8S_AUD})
        kube.add_service_account("team-a", "app")
        kube.add_service_account("team-a", "other")

        def token_for(sa):
            r = requests.post(f"{kube.url}/api/v1/namespaces/team-a/serviceaccounts/{sa}/token",
                              headers={"Authorization": f"Bearer {kube.bearer_token}"},
                              json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                    "spec": {"audiences": [K8S_AUD], "expirationSeconds": 3600}}, timeout=10)
            assert r.status_code == 201, r.text
            return r.json()["status"]["token"]

        out = client(fake).assume_role_with_web_identity(RoleArn=role, RoleSessionName="team-a.app",
                                                         WebIdentityToken=token_for("app"))
        assert out["SubjectFromWebIdentityToken"] == SA_SUB
        assert out["Provider"] == arn and out["Audience"] == K8S_AUD
        err = client_error(client(fake).assume_role_with_web_identity, RoleArn=role,
                           RoleSessionName="team-a.other", WebIdentityToken=token_for("other"))
        assert code_status(err)[:2] == ("AccessDenied", 403)
        # sign_jwt with a non-STS audience is refused by the client-id list.
        now = int(time.time())
        tok = kube.sign_jwt({"iss": kube.issuer, "sub": SA_SUB, "aud": [kube.issuer], "iat": now, "nbf": now,
                             "exp": now + 600})
        err = client_error(client(fake).assume_role_with_web_identity, RoleArn=role,
                           RoleSessionName="team-a.app", WebIdentityToken=tok)
        assert code_status(err) == ("InvalidIdentityToken", 400, "Incorrect token audience")
