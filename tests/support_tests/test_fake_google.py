"""Self-tests of tests/support/fake_google.py against the real Google client libraries.

Run: cd /work/main && python -m pytest tests/support_tests/test_fake_google.py -q
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# tests/ on sys.path, as tests/conftest.py does: the doubles are the package `support`.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import google.auth.exceptions  # noqa: E402
import google.auth.transport.requests  # noqa: E402
import google.oauth2.credentials  # noqa: E402
from google.auth import aws, identity_pool  # noqa: E402
from google.cloud import storage  # noqa: E402

from support.fake_google import (  # noqa: E402
    MSG_STS_BAD_AUDIENCE,
    MSG_STS_BAD_JWT_AUDIENCE,
    MSG_STS_CONDITION,
    MSG_STS_INVALID_TARGET,
    MSG_UNAUTHENTICATED_INVALID,
    MSG_UNAUTHENTICATED_MISSING,
    SCOPE_CLOUD_PLATFORM,
    SCOPE_IAM,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_AWS4_REQUEST,
    TOKEN_TYPE_ID_TOKEN,
    TOKEN_TYPE_JWT,
    GRANT_TYPE_TOKEN_EXCHANGE,
    FakeGoogle,
    provider_audience,
)

PROJECT_NUMBER = "123456789012"
PROJECT = "my-proj"
POOL = "eks-pool"
GSA = f"app-gsa@{PROJECT}.iam.gserviceaccount.com"
OTHER_GSA = f"other-gsa@{PROJECT}.iam.gserviceaccount.com"
SUBJECT = "system:serviceaccount:team-a:app"
STORAGE_RO = "https://www.googleapis.com/auth/devstorage.read_only"


def _b64url_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class MiniIssuer:
    """A tiny Kubernetes-style OIDC issuer: discovery + JWKS over real HTTP, RS256/ES256 signing."""

    def __init__(self):
        self._keys: dict[str, tuple[str, object]] = {}  # kid -> (alg, private key)
        self.published: list[str] = []
        self.fetches: list[str] = []
        issuer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                issuer.fetches.append(self.path)
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/openid/v1/jwks",
                            "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["RS256", "ES256"]}
                elif self.path == "/openid/v1/jwks":
                    body = {"keys": [issuer.public_jwk(k) for k in issuer.published]}
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

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.kid = self.add_key()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def add_key(self, alg: str = "RS256", publish: bool = True) -> str:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS256" \
            else ec.generate_private_key(ec.SECP256R1())
        kid = base64.urlsafe_b64encode(os.urandom(12)).decode().rstrip("=")
        self._keys[kid] = (alg, key)
        if publish:
            self.published.append(kid)
        return kid

    def public_jwk(self, kid: str) -> dict:
        alg, key = self._keys[kid]
        if alg == "RS256":
            n = key.public_key().public_numbers()
            return {"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256", "n": _b64url_uint(n.n),
                    "e": _b64url_uint(n.e)}
        n = key.public_key().public_numbers()
        return {"use": "sig", "kty": "EC", "kid": kid, "alg": "ES256", "crv": "P-256",
                "x": base64.urlsafe_b64encode(n.x.to_bytes(32, "big")).decode().rstrip("="),
                "y": base64.urlsafe_b64encode(n.y.to_bytes(32, "big")).decode().rstrip("=")}

    def sign(self, claims: dict, kid: str | None = None, key_of: str | None = None, headers: dict | None = None) -> str:
        kid = kid or self.kid
        alg, key = self._keys[key_of or kid]
        h = {"kid": kid}
        h.update(headers or {})
        return jwt.encode(claims, key, algorithm=alg, headers=h)

    def kube_claims(self, aud, ns="team-a", sa="app", pod="app-0", lifetime=3600, iat=None) -> dict:
        now = int(time.time()) if iat is None else iat
        return {"aud": aud if isinstance(aud, list) else [aud], "exp": now + lifetime, "iat": now, "nbf": now,
                "iss": self.url, "jti": "0f0f", "sub": f"system:serviceaccount:{ns}:{sa}",
                "kubernetes.io": {"namespace": ns, "node": {"name": "node-1", "uid": "n-uid"},
                                  "pod": {"name": pod, "uid": "p-uid"},
                                  "serviceaccount": {"name": sa, "uid": "sa-uid"}}}

    def kube_token(self, aud, **kw) -> str:
        return self.sign(self.kube_claims(aud, **kw))


@pytest.fixture
def issuer():
    i = MiniIssuer()
    yield i
    i.stop()


@pytest.fixture
def fg():
    g = FakeGoogle().start()
    yield g
    g.stop()


@pytest.fixture
def provider(fg, issuer):
    return fg.add_oidc_provider(PROJECT_NUMBER, POOL, "kube-dev", issuer.url)


def principal(subject=SUBJECT, pool=POOL):
    return f"principal://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/{pool}/subject/{subject}"


def principal_set(rest, pool=POOL):
    return f"principalSet://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/{pool}/{rest}"


def sts(fg, token, audience, scope=SCOPE_CLOUD_PLATFORM, **overrides):
    """POST the STS form google-auth sends; ``overrides`` replace (or, when None, drop) form fields."""
    form = {"grant_type": GRANT_TYPE_TOKEN_EXCHANGE, "audience": audience, "scope": scope,
            "requested_token_type": TOKEN_TYPE_ACCESS_TOKEN, "subject_token": token,
            "subject_token_type": TOKEN_TYPE_JWT}
    headers = overrides.pop("headers", {})
    form.update(overrides)
    form = {k: v for k, v in form.items() if v is not None}
    return requests.post(fg.sts_url, data=form, headers=headers, timeout=10)


def federated_token(fg, issuer, provider, scope=SCOPE_CLOUD_PLATFORM, **kw) -> str:
    r = sts(fg, issuer.kube_token(provider_audience(provider), **kw), provider_audience(provider), scope=scope)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def iam(fg, email, method, token, body):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{fg.url}/v1/projects/-/serviceAccounts/{email}:{method}"
    return requests.post(url, headers=headers, data=json.dumps(body), timeout=10)


def assert_sts_error(r, error, description=None):
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["error"] == error, body
    if description is not None:
        assert body["error_description"] == description, body
    return body


def assert_google_error(r, code, status, message=None):
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["status"] == status, err
    if message is not None:
        assert err["message"] == message, err
    return err


def ext_info(fg, provider, token_path, impersonate=None):
    info = {"type": "external_account", "audience": provider_audience(provider),
            "subject_token_type": TOKEN_TYPE_JWT, "token_url": fg.sts_url,
            "credential_source": {"file": str(token_path), "format": {"type": "text"}},
            "universe_domain": "googleapis.com"}
    if impersonate:
        info["service_account_impersonation_url"] = fg.generate_access_token_url(impersonate)
        info["service_account_impersonation"] = {"token_lifetime_seconds": 3600}
    return info


def list_bucket_names(fg, token, project=PROJECT, **kw):
    """The real google-cloud-storage client, pointed at the fake, with a bare bearer token."""
    client = storage.Client(project=project, credentials=_token_creds(token),
                            client_options={"api_endpoint": fg.url})
    return [b.name for b in client.list_buckets(**kw)]


def _token_creds(token):
    return google.oauth2.credentials.Credentials(token)


# ============================================================== google-auth external_account flows


def test_external_account_direct_access_with_google_auth_and_storage(fg, issuer, provider, tmp_path):
    fg.add_bucket("direct-bucket", PROJECT, readers=[principal()])
    fg.add_bucket("someone-elses", PROJECT, readers=[principal("system:serviceaccount:team-b:x")])
    fg.add_bucket("other-project", "proj-2", readers=[principal()])
    path = tmp_path / "token"
    path.write_text(issuer.kube_token(provider_audience(provider)))

    creds = identity_pool.Credentials.from_info(ext_info(fg, provider, path), scopes=[SCOPE_CLOUD_PLATFORM])
    creds.refresh(google.auth.transport.requests.Request())

    assert creds.token.startswith("ya29.")
    assert fg.principal_of(creds.token) == principal()
    # google-auth computes expiry = now + expires_in (3599)
    assert 3500 < (creds.expiry - creds.expiry.utcnow()).total_seconds() <= 3600
    [call] = fg.calls_to("sts")
    assert call["status"] == 200 and call["authorization_present"] is False
    assert call["content_type"] == "application/x-www-form-urlencoded"
    assert call["scope"] == SCOPE_CLOUD_PLATFORM
    info = fg.token_info(creds.token)
    assert info["attributes"] == {"namespace": "team-a", "service_account_name": "app", "pod": "app-0"}

    assert list_bucket_names(fg, creds.token) == ["direct-bucket"]
    assert list_bucket_names(fg, creds.token, project="proj-2") == ["other-project"]
    [st, _] = fg.calls_to("storage")
    assert st["principal"] == principal() and st["status"] == 200 and st["project"] == PROJECT


def test_external_account_impersonation_with_google_auth_and_storage(fg, issuer, provider, tmp_path):
    fg.add_service_account(GSA)
    fg.grant_workload_identity_user(GSA, principal())
    fg.add_bucket("gsa-bucket", PROJECT, readers=[f"serviceAccount:{GSA}"])
    fg.add_bucket("federated-only", PROJECT, readers=[principal()])
    path = tmp_path / "token"
    path.write_text(issuer.kube_token(provider_audience(provider)))

    creds = identity_pool.Credentials.from_info(ext_info(fg, provider, path, impersonate=GSA),
                                                scopes=[SCOPE_CLOUD_PLATFORM])
    creds.refresh(google.auth.transport.requests.Request())

    assert fg.principal_of(creds.token) == f"serviceAccount:{GSA}"
    [s] = fg.calls_to("sts")
    assert s["scope"] == SCOPE_IAM  # google-auth asks STS for the iam scope before impersonating
    [g] = fg.calls_to("generateAccessToken")
    assert g["status"] == 200 and g["principal"] == principal() and g["target"] == GSA
    assert g["scope"] == [SCOPE_CLOUD_PLATFORM] and g["lifetime"] == "3600s"
    assert g["delegates"] is None  # Python sends "delegates": null
    assert 3500 < (creds.expiry - creds.expiry.utcnow()).total_seconds() <= 3600

    assert list_bucket_names(fg, creds.token) == ["gsa-bucket"]


def test_google_auth_surfaces_sts_errors(fg, issuer, provider, tmp_path):
    path = tmp_path / "token"
    path.write_text(issuer.kube_token(provider_audience(provider)))
    info = ext_info(fg, provider, path)
    info["audience"] = provider_audience(provider).replace("kube-dev", "nope")
    creds = identity_pool.Credentials.from_info(info, scopes=[SCOPE_CLOUD_PLATFORM])
    with pytest.raises(google.auth.exceptions.OAuthError) as e:
        creds.refresh(google.auth.transport.requests.Request())
    assert e.value.args[0] == f"Error code invalid_target: {MSG_STS_INVALID_TARGET}"


def test_google_auth_surfaces_impersonation_denial(fg, issuer, provider, tmp_path):
    fg.add_service_account(GSA)  # no binding
    path = tmp_path / "token"
    path.write_text(issuer.kube_token(provider_audience(provider)))
    creds = identity_pool.Credentials.from_info(ext_info(fg, provider, path, impersonate=GSA),
                                                scopes=[SCOPE_CLOUD_PLATFORM])
    with pytest.raises(google.auth.exceptions.RefreshError) as e:
        creds.refresh(google.auth.transport.requests.Request())
    assert "iam.serviceAccounts.getAccessToken" in str(e.value)
    assert "PERMISSION_DENIED" in str(e.value)


# ============================================================== STS wire behaviour


def test_sts_success_shape(fg, issuer, provider):
    r = sts(fg, issuer.kube_token(provider_audience(provider)), provider_audience(provider))
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in"}
    assert body["issued_token_type"] == TOKEN_TYPE_ACCESS_TOKEN
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3599
    assert body["access_token"].startswith("ya29.")
    assert fg.token_info(body["access_token"])["expires_at"] == pytest.approx(time.time() + 3600, abs=5)


def test_sts_accepts_json_camel_case(fg, issuer, provider):
    body = {"grantType": GRANT_TYPE_TOKEN_EXCHANGE, "audience": provider_audience(provider),
            "scope": SCOPE_CLOUD_PLATFORM, "requestedTokenType": TOKEN_TYPE_ACCESS_TOKEN,
            "subjectToken": issuer.kube_token(provider_audience(provider)), "subjectTokenType": TOKEN_TYPE_JWT}
    r = requests.post(fg.sts_url, json=body, timeout=10)
    assert r.status_code == 200, r.text
    assert fg.principal_of(r.json()["access_token"]) == principal()


def test_sts_id_token_subject_type_and_https_audience(fg, issuer, provider):
    tok = issuer.kube_token("https://iam.googleapis.com/" + provider)
    r = sts(fg, tok, provider_audience(provider), subject_token_type=TOKEN_TYPE_ID_TOKEN)
    assert r.status_code == 200, r.text


def test_sts_federated_token_lifetime_is_configurable(fg, issuer, provider):
    fg.federated_token_lifetime = 120
    r = sts(fg, issuer.kube_token(provider_audience(provider)), provider_audience(provider))
    assert r.json()["expires_in"] == 119


def test_sts_rejects_authorization_header(fg, issuer, provider):
    r = sts(fg, issuer.kube_token(provider_audience(provider)), provider_audience(provider),
            headers={"Authorization": "Bearer ya29.something"})
    assert_sts_error(r, "invalid_request")
    assert fg.calls_to("sts")[0]["authorization_present"] is True


@pytest.mark.parametrize("field,value,error", [
    ("grant_type", "authorization_code", "unsupported_grant_type"),
    ("grant_type", None, "invalid_request"),
    ("requested_token_type", "urn:ietf:params:oauth:token-type:id_token", "invalid_request"),
    ("requested_token_type", None, "invalid_request"),
    ("subject_token_type", "urn:ietf:params:oauth:token-type:saml2", "invalid_request"),
    ("subject_token_type", TOKEN_TYPE_AWS4_REQUEST, "invalid_request"),  # wrong for an OIDC provider
    ("subject_token", None, "invalid_request"),
    ("scope", None, "invalid_request"),
    ("scope", "", "invalid_request"),
])
def test_sts_parameter_checks(fg, issuer, provider, field, value, error):
    r = sts(fg, issuer.kube_token(provider_audience(provider)), provider_audience(provider), **{field: value})
    assert_sts_error(r, error)


def test_sts_rejects_unknown_content_type(fg, issuer, provider):
    r = requests.post(fg.sts_url, data="grant_type=x", headers={"Content-Type": "text/plain"}, timeout=10)
    assert_sts_error(r, "invalid_request")


@pytest.mark.parametrize("audience", [
    "projects/123456789012/locations/global/workloadIdentityPools/eks-pool/providers/kube-dev",  # no //iam prefix
    "https://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/eks-pool/providers/kube-dev",
    "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/eks-pool",
    "//iam.googleapis.com/projects/123456789012/locations/us-east1/workloadIdentityPools/eks-pool/providers/kube-dev",
    "sts.amazonaws.com",
    None,
])
def test_sts_audience_format(fg, issuer, provider, audience):
    r = sts(fg, issuer.kube_token(provider_audience(provider)), audience)
    assert_sts_error(r, "invalid_request", MSG_STS_BAD_AUDIENCE)


def test_sts_unknown_and_disabled_provider_is_invalid_target(fg, issuer, provider):
    other = provider_audience(provider).replace("kube-dev", "missing")
    assert_sts_error(sts(fg, issuer.kube_token(other), other), "invalid_target", MSG_STS_INVALID_TARGET)
    # the project must be given by number: a project id names no provider
    by_id = provider_audience(provider).replace(PROJECT_NUMBER, PROJECT)
    assert_sts_error(sts(fg, issuer.kube_token(by_id), by_id), "invalid_target", MSG_STS_INVALID_TARGET)
    fg.set_provider_enabled(provider, False)
    aud = provider_audience(provider)
    assert_sts_error(sts(fg, issuer.kube_token(aud), aud), "invalid_target", MSG_STS_INVALID_TARGET)
    fg.set_provider_enabled(provider, True)
    assert sts(fg, issuer.kube_token(aud), aud).status_code == 200


def test_sts_wrong_jwt_audience(fg, issuer, provider):
    aud = provider_audience(provider)
    assert_sts_error(sts(fg, issuer.kube_token("sts.amazonaws.com"), aud), "invalid_grant",
                     MSG_STS_BAD_JWT_AUDIENCE)
    # a token for another provider of the same pool is not accepted either
    other = fg.add_oidc_provider(PROJECT_NUMBER, POOL, "kube-prod", issuer.url)
    assert_sts_error(sts(fg, issuer.kube_token(provider_audience(other)), aud), "invalid_grant",
                     MSG_STS_BAD_JWT_AUDIENCE)
    # aud is a list: any element may match
    r = sts(fg, issuer.kube_token(["sts.amazonaws.com", aud]), aud)
    assert r.status_code == 200, r.text


def test_sts_allowed_audiences(fg, issuer):
    prov = fg.add_oidc_provider(PROJECT_NUMBER, POOL, "kube-aud", issuer.url,
                                    allowed_audiences=["metabridge", "other"])
    aud = provider_audience(prov)
    assert sts(fg, issuer.kube_token("metabridge"), aud).status_code == 200
    # once allowed_audiences is set, the provider's own name is no longer accepted
    assert_sts_error(sts(fg, issuer.kube_token(aud), aud), "invalid_grant", MSG_STS_BAD_JWT_AUDIENCE)


def test_sts_wrong_issuer_does_not_fetch_it(fg, issuer, provider):
    intruder = MiniIssuer()
    try:
        claims = intruder.kube_claims(provider_audience(provider))
        r = sts(fg, intruder.sign(claims), provider_audience(provider))
        body = assert_sts_error(r, "invalid_grant")
        assert "does not match the expected issuer" in body["error_description"]
        assert intruder.fetches == []
    finally:
        intruder.stop()
    # properly signed by the provider's issuer, but claiming another `iss`
    claims = issuer.kube_claims(provider_audience(provider))
    claims["iss"] = "https://oidc.eks.us-east-1.amazonaws.com/id/OTHER"
    assert_sts_error(sts(fg, issuer.sign(claims), provider_audience(provider)), "invalid_grant")


def test_sts_time_checks(fg, issuer, provider):
    aud = provider_audience(provider)
    now = int(time.time())
    expired = issuer.kube_token(aud, iat=now - 7200, lifetime=3600)
    assert "expired" in assert_sts_error(sts(fg, expired, aud), "invalid_grant")["error_description"]
    future = issuer.kube_token(aud, iat=now + 600)
    assert "future" in assert_sts_error(sts(fg, future, aud), "invalid_grant")["error_description"]
    too_long = issuer.kube_token(aud, lifetime=48 * 3600)
    assert "48 hours" in assert_sts_error(sts(fg, too_long, aud), "invalid_grant")["error_description"]
    just_under = issuer.kube_token(aud, lifetime=48 * 3600 - 60)
    assert sts(fg, just_under, aud).status_code == 200


def test_sts_signature_and_key_checks(fg, issuer, provider):
    aud = provider_audience(provider)
    claims = issuer.kube_claims(aud)
    # signed by a key the issuer does not publish, under a published kid
    rogue = issuer.add_key(publish=False)
    forged = issuer.sign(claims, kid=issuer.kid, key_of=rogue)
    assert "signature" in assert_sts_error(sts(fg, forged, aud), "invalid_grant")["error_description"]
    # unknown kid
    unknown = issuer.sign(claims, kid=rogue)
    assert_sts_error(sts(fg, unknown, aud), "invalid_grant")
    # no kid
    no_kid = jwt.encode(claims, issuer._keys[issuer.kid][1], algorithm="RS256")
    assert "kid" in assert_sts_error(sts(fg, no_kid, aud), "invalid_grant")["error_description"]
    # HS256 / alg none
    hs = jwt.encode(claims, "secret-secret-secret-secret-32by", algorithm="HS256", headers={"kid": issuer.kid})
    assert_sts_error(sts(fg, hs, aud), "invalid_grant")
    none = jwt.encode(claims, None, algorithm="none", headers={"kid": issuer.kid})
    assert_sts_error(sts(fg, none, aud), "invalid_grant")
    # tampered payload with the original signature
    good = issuer.sign(claims)
    h, p, s = good.split(".")
    evil = dict(claims, sub="system:serviceaccount:kube-system:admin")
    p2 = base64.urlsafe_b64encode(json.dumps(evil).encode()).decode().rstrip("=")
    assert_sts_error(sts(fg, f"{h}.{p2}.{s}", aud), "invalid_grant")
    assert_sts_error(sts(fg, "not-a-jwt", aud), "invalid_grant")
    # missing sub
    nosub = dict(claims)
    del nosub["sub"]
    assert "sub" in assert_sts_error(sts(fg, issuer.sign(nosub), aud), "invalid_grant")["error_description"]


def test_sts_es256_subject_tokens(fg, issuer, provider):
    aud = provider_audience(provider)
    kid = issuer.add_key(alg="ES256")
    r = sts(fg, issuer.sign(issuer.kube_claims(aud), kid=kid), aud)
    assert r.status_code == 200, r.text


def test_sts_jwks_is_cached_and_refetched_on_unknown_kid(fg, issuer, provider):
    aud = provider_audience(provider)
    assert sts(fg, issuer.kube_token(aud), aud).status_code == 200
    assert issuer.fetches == ["/.well-known/openid-configuration", "/openid/v1/jwks"]
    assert sts(fg, issuer.kube_token(aud), aud).status_code == 200
    assert len(issuer.fetches) == 2  # cached
    # key rotation: a new kid is fetched on first sight
    new_kid = issuer.add_key()
    r = sts(fg, issuer.sign(issuer.kube_claims(aud), kid=new_kid), aud)
    assert r.status_code == 200, r.text
    assert len(issuer.fetches) == 4
    assert fg.oidc_fetches[-1] == issuer.url + "/openid/v1/jwks"


def test_sts_unreachable_discovery(fg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    prov = fg.add_oidc_provider(PROJECT_NUMBER, POOL, "dead", dead)
    i = MiniIssuer()
    try:
        claims = i.kube_claims(provider_audience(prov))
        claims["iss"] = dead
        body = assert_sts_error(sts(fg, i.sign(claims), provider_audience(prov)), "invalid_grant")
        assert "discovery" in body["error_description"]
    finally:
        i.stop()


def test_sts_jwks_json_provider_does_not_fetch(fg, issuer):
    prov = fg.add_oidc_provider(PROJECT_NUMBER, POOL, "uploaded", "https://kubernetes.default.svc",
                                    jwks_json={"keys": [issuer.public_jwk(issuer.kid)]})
    claims = issuer.kube_claims(provider_audience(prov))
    claims["iss"] = "https://kubernetes.default.svc"
    assert sts(fg, issuer.sign(claims), provider_audience(prov)).status_code == 200
    assert issuer.fetches == [] and fg.oidc_fetches == []


def test_sts_attribute_condition(fg, issuer):
    seen = []

    def only_team_a(assertion):
        seen.append(assertion)
        return assertion["kubernetes.io"]["namespace"] == "team-a"

    prov = fg.add_oidc_provider(PROJECT_NUMBER, POOL, "cond", issuer.url, attribute_condition=only_team_a)
    aud = provider_audience(prov)
    assert sts(fg, issuer.kube_token(aud), aud).status_code == 200
    assert seen[0]["sub"] == SUBJECT
    r = sts(fg, issuer.kube_token(aud, ns="team-b"), aud)
    assert_sts_error(r, "unauthorized_client", MSG_STS_CONDITION)


def test_sts_google_subject_limit(fg, issuer, provider):
    aud = provider_audience(provider)
    long_sa = "a" * 110  # system:serviceaccount:team-a:<110> > 127 bytes
    r = sts(fg, issuer.kube_token(aud, sa=long_sa), aud)
    assert "127" in assert_sts_error(r, "invalid_request")["error_description"]


# ============================================================== IAM Credentials


@pytest.fixture
def gsa(fg):
    return fg.add_service_account(GSA)


def test_generate_access_token(fg, issuer, provider, gsa):
    fg.grant_workload_identity_user(GSA, principal())
    fed = federated_token(fg, issuer, provider)
    r = iam(fg, GSA, "generateAccessToken", fed, {"scope": [STORAGE_RO], "lifetime": "600s"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"accessToken", "expireTime"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["expireTime"])  # no fractional seconds
    info = fg.token_info(body["accessToken"])
    assert info["principal"] == f"serviceAccount:{GSA}" and info["scopes"] == [STORAGE_RO]
    assert info["expires_at"] == pytest.approx(time.time() + 600, abs=5)
    # delegates absent (Go) and null (Python) and [] are all accepted; lifetime defaults to 1h
    for extra in ({}, {"delegates": None}, {"delegates": []}):
        r = iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM], **extra})
        assert r.status_code == 200, r.text
        assert fg.token_info(r.json()["accessToken"])["expires_at"] == pytest.approx(time.time() + 3600, abs=5)
    # the email may be percent-encoded, and the GSA may be named by unique id
    r = iam(fg, GSA.replace("@", "%40"), "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]})
    assert r.status_code == 200, r.text
    r = iam(fg, gsa["unique_id"], "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]})
    assert r.status_code == 200, r.text


def test_iam_requires_bearer(fg, issuer, provider, gsa):
    fg.grant_workload_identity_user(GSA, principal())
    for method in ("generateAccessToken", "generateIdToken"):
        r = iam(fg, GSA, method, None, {"scope": [SCOPE_CLOUD_PLATFORM], "audience": "x"})
        assert_google_error(r, 401, "UNAUTHENTICATED", MSG_UNAUTHENTICATED_MISSING)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = iam(fg, GSA, method, "ya29.never-issued", {"scope": [SCOPE_CLOUD_PLATFORM], "audience": "x"})
        assert_google_error(r, 401, "UNAUTHENTICATED", MSG_UNAUTHENTICATED_INVALID)
    calls = fg.calls_to("generateAccessToken")
    assert [c["authorization_present"] for c in calls] == [False, True]


def test_iam_rejects_expired_token(fg, issuer, provider, gsa):
    fg.grant_workload_identity_user(GSA, principal())
    fed = federated_token(fg, issuer, provider)
    assert iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]}).status_code == 200
    fg.expire_token(fed)
    r = iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]})
    err = assert_google_error(r, 401, "UNAUTHENTICATED", MSG_UNAUTHENTICATED_INVALID)
    assert err["details"][0]["reason"] == "ACCESS_TOKEN_EXPIRED"
    # and by lifetime
    fg.federated_token_lifetime = 1
    fed = federated_token(fg, issuer, provider)
    time.sleep(1.1)
    assert iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]}).status_code == 401


def test_iam_permission_denied(fg, issuer, provider, gsa):
    fg.add_service_account(OTHER_GSA)
    fg.grant_workload_identity_user(OTHER_GSA, principal())  # bound to the *other* GSA only
    fed = federated_token(fg, issuer, provider)
    msg_at = "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist)."
    msg_id = "Permission 'iam.serviceAccounts.getOpenIdToken' denied on resource (or it may not exist)."
    err = assert_google_error(iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]}),
                              403, "PERMISSION_DENIED", msg_at)
    assert err["details"][0]["reason"] == "IAM_PERMISSION_DENIED"
    assert_google_error(iam(fg, GSA, "generateIdToken", fed, {"audience": "x"}), 403, "PERMISSION_DENIED", msg_id)
    # unknown GSA looks the same
    assert_google_error(iam(fg, f"ghost@{PROJECT}.iam.gserviceaccount.com", "generateAccessToken", fed,
                            {"scope": [SCOPE_CLOUD_PLATFORM]}), 403, "PERMISSION_DENIED", msg_at)
    # another KSA of the same pool is not the bound principal
    fg.grant_workload_identity_user(GSA, principal())
    fed_b = federated_token(fg, issuer, provider, ns="team-b")
    assert_google_error(iam(fg, GSA, "generateAccessToken", fed_b, {"scope": [SCOPE_CLOUD_PLATFORM]}),
                        403, "PERMISSION_DENIED", msg_at)
    assert iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]}).status_code == 200
    # revocation takes effect immediately
    fg.revoke_workload_identity_user(GSA, principal())
    assert iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]}).status_code == 403


def test_iam_principal_sets(fg, issuer, provider, gsa):
    fed_a = federated_token(fg, issuer, provider, ns="team-a")
    fed_b = federated_token(fg, issuer, provider, ns="team-b")
    body = {"scope": [SCOPE_CLOUD_PLATFORM]}
    fg.grant_workload_identity_user(GSA, principal_set("attribute.namespace/team-a"))
    assert iam(fg, GSA, "generateAccessToken", fed_a, body).status_code == 200
    assert iam(fg, GSA, "generateAccessToken", fed_b, body).status_code == 403
    # a whole other pool's wildcard grants nothing here
    fg.grant_workload_identity_user(GSA, principal_set("*", pool="other-pool"))
    assert iam(fg, GSA, "generateAccessToken", fed_b, body).status_code == 403
    fg.grant_workload_identity_user(GSA, principal_set("*"))
    assert iam(fg, GSA, "generateAccessToken", fed_b, body).status_code == 200


def test_iam_requires_iam_or_cloud_platform_scope(fg, issuer, provider, gsa):
    fg.grant_workload_identity_user(GSA, principal())
    fed = federated_token(fg, issuer, provider, scope=STORAGE_RO)
    err = assert_google_error(iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]}),
                              403, "PERMISSION_DENIED", "Request had insufficient authentication scopes.")
    assert err["details"][0]["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"
    fed_iam = federated_token(fg, issuer, provider, scope=SCOPE_IAM)
    assert iam(fg, GSA, "generateAccessToken", fed_iam, {"scope": [SCOPE_CLOUD_PLATFORM]}).status_code == 200


def test_generate_access_token_argument_checks(fg, issuer, provider, gsa):
    fg.grant_workload_identity_user(GSA, principal())
    fed = federated_token(fg, issuer, provider)
    for body in ({}, {"scope": []}, {"scope": "https://www.googleapis.com/auth/cloud-platform"},
                 {"scope": [SCOPE_CLOUD_PLATFORM], "lifetime": "3601s"},
                 {"scope": [SCOPE_CLOUD_PLATFORM], "lifetime": "3600"},
                 {"scope": [SCOPE_CLOUD_PLATFORM], "lifetime": "0s"},
                 {"scope": [SCOPE_CLOUD_PLATFORM], "delegates": [f"projects/-/serviceAccounts/{OTHER_GSA}"]}):
        assert_google_error(iam(fg, GSA, "generateAccessToken", fed, body), 400, "INVALID_ARGUMENT")
    r = requests.post(f"{fg.url}/v1/projects/{PROJECT}/serviceAccounts/{GSA}:generateAccessToken",
                      headers={"Authorization": f"Bearer {fed}"}, json={"scope": [SCOPE_CLOUD_PLATFORM]}, timeout=10)
    assert_google_error(r, 400, "INVALID_ARGUMENT")
    r = requests.post(fg.generate_access_token_url(GSA), headers={"Authorization": f"Bearer {fed}"},
                      data="{not json", timeout=10)
    assert_google_error(r, 400, "INVALID_ARGUMENT")
    assert iam(fg, GSA, "generateAccessToken", fed,
               {"scope": [SCOPE_CLOUD_PLATFORM], "lifetime": "3600s"}).status_code == 200


def test_generate_id_token_verifies_with_pyjwt(fg, issuer, provider, gsa):
    fg.grant_workload_identity_user(GSA, principal())
    fed = federated_token(fg, issuer, provider)
    r = iam(fg, GSA, "generateIdToken", fed, {"audience": "sts.amazonaws.com", "includeEmail": True,
                                                   "delegates": None})
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    assert set(r.json()) == {"token"}

    jwks_client = jwt.PyJWKClient(fg.jwks_url)
    key = jwks_client.get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key.key, algorithms=["RS256"], audience="sts.amazonaws.com",
                        issuer="https://accounts.google.com")
    assert jwt.get_unverified_header(token)["kid"] == fg.id_token_kid
    assert claims["azp"] == claims["sub"] == gsa["unique_id"]
    assert re.fullmatch(r"1\d{20}", gsa["unique_id"])
    assert claims["email"] == GSA and claims["email_verified"] is True
    assert claims["exp"] - claims["iat"] == 3600 and abs(claims["iat"] - time.time()) < 5
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key.key, algorithms=["RS256"], audience="something-else")

    r = iam(fg, GSA, "generateIdToken", fed, {"audience": "aud-2"})
    claims = jwt.decode(r.json()["token"], key.key, algorithms=["RS256"], audience="aud-2")
    assert "email" not in claims and "email_verified" not in claims
    [c1, c2] = fg.calls_to("generateIdToken")
    assert c1["audience"] == "sts.amazonaws.com" and c1["include_email"] is True and c2["include_email"] is False

    # a JWT signed by another key under the same kid does not verify against the fake's JWKS
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(dict(claims), other, algorithm="RS256", headers={"kid": fg.id_token_kid})
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, key.key, algorithms=["RS256"], audience="aud-2")


def test_generate_id_token_requires_audience(fg, issuer, provider, gsa):
    fg.grant_workload_identity_user(GSA, principal())
    fed = federated_token(fg, issuer, provider)
    assert_google_error(iam(fg, GSA, "generateIdToken", fed, {"includeEmail": True}), 400, "INVALID_ARGUMENT")
    assert_google_error(iam(fg, GSA, "generateIdToken", fed, {"audience": ""}), 400, "INVALID_ARGUMENT")


def test_google_oidc_discovery(fg):
    d = requests.get(fg.url + "/.well-known/openid-configuration", timeout=10).json()
    assert d["issuer"] == "https://accounts.google.com" == fg.id_token_issuer
    assert d["jwks_uri"] == fg.jwks_url
    # seen from another address, the jwks_uri follows the Host the client used
    d2 = requests.get(fg.url_for("localhost") + "/.well-known/openid-configuration", timeout=10).json()
    assert d2["jwks_uri"] == fg.url_for("localhost") + "/oauth2/v3/certs"
    keys = requests.get(fg.jwks_url, timeout=10).json()["keys"]
    assert [k["kid"] for k in keys] == [fg.id_token_kid]
    assert keys[0]["kty"] == "RSA" and keys[0]["alg"] == "RS256" and keys[0]["use"] == "sig"


def test_tokeninfo(fg, issuer, provider):
    fed = federated_token(fg, issuer, provider)
    r = requests.get(fg.url + "/oauth2/v3/tokeninfo", params={"access_token": fed}, timeout=10)
    assert r.status_code == 200 and r.json()["principal"] == principal()
    assert r.json()["scope"] == SCOPE_CLOUD_PLATFORM
    r = requests.get(fg.url + "/oauth2/v3/tokeninfo", params={"access_token": "nope"}, timeout=10)
    assert r.status_code == 400
    assert fg.principal_of("nope") is None


# ============================================================== Cloud Storage


def test_storage_auth_errors(fg, issuer, provider):
    fg.add_bucket("b1", PROJECT, readers=[principal()])
    url = fg.url + "/storage/v1/b"
    r = requests.get(url, params={"project": PROJECT}, timeout=10)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == 401 and err["errors"][0]["reason"] == "required"
    assert "Anonymous caller does not have storage.buckets.list access" in err["message"]
    r = requests.get(url, params={"project": PROJECT}, headers={"Authorization": "Bearer ya29.bogus"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["message"] == "Invalid Credentials"

    fed = federated_token(fg, issuer, provider, ns="team-z")
    r = requests.get(url, params={"project": PROJECT}, headers={"Authorization": f"Bearer {fed}"}, timeout=10)
    assert r.status_code == 403
    assert r.json()["error"]["message"].startswith(
        f"{principal('system:serviceaccount:team-z:app')} does not have storage.buckets.list access")
    with pytest.raises(Exception) as e:
        list_bucket_names(fg, fed)
    assert "403" in str(e.value)

    # a token without a storage-capable scope
    fed_iam = federated_token(fg, issuer, provider, scope=SCOPE_IAM)
    r = requests.get(url, params={"project": PROJECT}, headers={"Authorization": f"Bearer {fed_iam}"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["message"] == "Provided scope(s) are not authorized"
    # missing project
    fed_ok = federated_token(fg, issuer, provider)
    r = requests.get(url, headers={"Authorization": f"Bearer {fed_ok}"}, timeout=10)
    assert r.status_code == 400


def test_storage_pagination_and_get(fg, issuer, provider):
    for name in ("b-a", "b-b", "b-c"):
        fg.add_bucket(name, PROJECT, readers=[principal_set("attribute.namespace/team-a")])
    fed = federated_token(fg, issuer, provider)
    client = storage.Client(project=PROJECT, credentials=_token_creds(fed), client_options={"api_endpoint": fg.url})
    pages = list(client.list_buckets(page_size=2).pages)
    assert [[b.name for b in p] for p in pages] == [["b-a", "b-b"], ["b-c"]]
    assert client.get_bucket("b-b").name == "b-b"
    fg.add_bucket("private", PROJECT, readers=[])
    from google.api_core import exceptions as gexc
    with pytest.raises(gexc.Forbidden):
        client.get_bucket("private")
    with pytest.raises(gexc.NotFound):
        client.get_bucket("does-not-exist")


# ============================================================== faults


def test_fault_status_then_recover(fg, issuer, provider):
    aud = provider_audience(provider)
    fg.set_fault("sts", status=503, count=1)
    r = sts(fg, issuer.kube_token(aud), aud)
    assert_google_error(r, 503, "UNAVAILABLE")
    assert sts(fg, issuer.kube_token(aud), aud).status_code == 200
    fg.set_fault("sts", status=429, count=2)
    assert_google_error(sts(fg, issuer.kube_token(aud), aud), 429, "RESOURCE_EXHAUSTED")
    assert sts(fg, issuer.kube_token(aud), aud).status_code == 429
    assert sts(fg, issuer.kube_token(aud), aud).status_code == 200
    statuses = [c["status"] for c in fg.calls_to("sts")]
    assert statuses == [503, 200, 429, 429, 200]
    assert [bool(c.get("fault")) for c in fg.calls_to("sts")] == [True, False, True, True, False]


def test_fault_until_cleared_and_per_endpoint(fg, issuer, provider, gsa):
    fg.grant_workload_identity_user(GSA, principal())
    fed = federated_token(fg, issuer, provider)
    fg.set_fault("generateAccessToken", status=500)
    for _ in range(3):
        assert_google_error(iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]}),
                            500, "INTERNAL")
    # other endpoints are unaffected
    assert iam(fg, GSA, "generateIdToken", fed, {"audience": "a"}).status_code == 200
    fg.clear_faults()
    assert iam(fg, GSA, "generateAccessToken", fed, {"scope": [SCOPE_CLOUD_PLATFORM]}).status_code == 200
    fg.set_fault("storage", status=503, count=1)
    r = requests.get(fg.url + "/storage/v1/b", params={"project": PROJECT},
                     headers={"Authorization": f"Bearer {fed}"}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["errors"][0]["reason"] == "backendError"


def test_fault_refuse_closes_connection(fg, issuer, provider):
    aud = provider_audience(provider)
    fg.set_fault("sts", refuse=True, count=1)
    with pytest.raises(requests.exceptions.ConnectionError):
        sts(fg, issuer.kube_token(aud), aud)
    assert sts(fg, issuer.kube_token(aud), aud).status_code == 200
    assert fg.calls_to("sts")[0].get("refused") is True


def test_fault_latency(fg, issuer, provider, gsa):
    fg.grant_workload_identity_user(GSA, principal())
    fed = federated_token(fg, issuer, provider)
    fg.set_fault("generateIdToken", latency=0.5, count=1)
    t0 = time.monotonic()
    assert iam(fg, GSA, "generateIdToken", fed, {"audience": "a"}).status_code == 200
    assert time.monotonic() - t0 >= 0.5
    t0 = time.monotonic()
    assert iam(fg, GSA, "generateIdToken", fed, {"audience": "a"}).status_code == 200
    assert time.monotonic() - t0 < 0.5
    # latency makes a client-side timeout observable
    fg.set_fault("sts", latency=1.0, count=1)
    with pytest.raises(requests.exceptions.Timeout):
        requests.post(fg.sts_url, data={"grant_type": "x"}, timeout=0.3)


def test_set_fault_validates():
    g = FakeGoogle()
    with pytest.raises(ValueError):
        g.set_fault("nope", status=500)
    with pytest.raises(ValueError):
        g.set_fault("sts", status=200)


def test_reachable_on_all_interfaces(fg):
    # bound to 0.0.0.0, not 127.0.0.1: another local address (Linux routes all of 127/8 to lo) reaches it
    r = requests.get(fg.url_for("127.0.0.2") + "/oauth2/v3/certs", timeout=10)
    assert r.status_code == 200
    assert fg.calls_to("oidc")[-1]["headers"]["host"] == f"127.0.0.2:{fg.port}"
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.2:{_free_port()}/", timeout=5)  # and a closed port does not


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keep_alive_and_concurrency(fg, issuer, provider):
    aud = provider_audience(provider)
    with requests.Session() as s:
        for _ in range(3):
            r = s.get(fg.jwks_url, timeout=10)
            assert r.status_code == 200 and r.headers["Content-Length"] == str(len(r.content))
    fg.set_fault("sts", latency=0.4)
    results = []
    tokens = [issuer.kube_token(aud) for _ in range(8)]
    threads = [threading.Thread(target=lambda t=t: results.append(sts(fg, t, aud).status_code)) for t in tokens]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8
    assert time.monotonic() - t0 < 2.5  # served concurrently, not 8 x 0.4 s


def test_stop_closes_keep_alive_connections():
    fg = FakeGoogle().start()
    with requests.Session() as s:
        assert s.get(fg.jwks_url, timeout=5).status_code == 200
        assert fg._conns  # the pooled connection is open
        fg.stop()
        with pytest.raises(requests.exceptions.ConnectionError):
            s.get(fg.jwks_url, timeout=5)
    assert not fg._conns


# ============================================================== AWS-type provider


ACCOUNT = "111122223333"


class _StaticAwsCreds(aws.AwsSecurityCredentialsSupplier):
    def __init__(self, key, secret, token, region="us-east-1"):
        self._c = aws.AwsSecurityCredentials(key, secret, token)
        self._region = region

    def get_aws_security_credentials(self, context, request):
        return self._c

    def get_aws_region(self, context, request):
        return self._region


def _aws_subject_token(audience, creds=("ASIAEXAMPLE", "secret", "session")):
    c = aws.Credentials(audience=audience, subject_token_type=TOKEN_TYPE_AWS4_REQUEST,
                        aws_security_credentials_supplier=_StaticAwsCreds(*creds))
    return c.retrieve_subject_token(google.auth.transport.requests.Request())


def _edit_aws_token(token, fn):
    req = json.loads(urllib.parse.unquote(token))
    fn(req)
    return urllib.parse.quote(json.dumps(req))


def test_aws_provider_parsing_and_target_resource(fg):
    prov = fg.add_aws_provider(PROJECT_NUMBER, "aws-pool", "aws-dev", ACCOUNT, "http://127.0.0.1:9")
    aud = provider_audience(prov)
    good = _aws_subject_token(aud)

    def post(tok, stt=TOKEN_TYPE_AWS4_REQUEST):
        return sts(fg, tok, aud, subject_token_type=stt)

    assert_sts_error(post(good, TOKEN_TYPE_JWT), "invalid_request")
    assert_sts_error(post("not json at all"), "invalid_request")
    assert_sts_error(post(urllib.parse.quote(json.dumps({"url": 1}))), "invalid_request")

    def drop_target(r):
        r["headers"] = [h for h in r["headers"] if h["key"] != "x-goog-cloud-target-resource"]
    d = assert_sts_error(post(_edit_aws_token(good, drop_target)), "invalid_grant")["error_description"]
    assert "x-goog-cloud-target-resource" in d

    def other_target(r):
        for h in r["headers"]:
            if h["key"] == "x-goog-cloud-target-resource":
                h["value"] = aud.replace("aws-dev", "aws-prod")
    assert_sts_error(post(_edit_aws_token(good, other_target)), "invalid_grant")

    def not_sts(r):
        r["url"] = "https://evil.example.com?Action=GetCallerIdentity&Version=2011-06-15"
    assert "not an AWS STS endpoint" in assert_sts_error(post(_edit_aws_token(good, not_sts)),
                                                        "invalid_grant")["error_description"]

    def other_action(r):
        r["url"] = "https://sts.us-east-1.amazonaws.com?Action=AssumeRole&Version=2011-06-15"
    assert_sts_error(post(_edit_aws_token(good, other_action)), "invalid_grant")

    def get_method(r):
        r["method"] = "GET"
    assert_sts_error(post(_edit_aws_token(good, get_method)), "invalid_grant")

    def unsigned(r):
        r["headers"] = [h for h in r["headers"] if h["key"].lower() != "authorization"]
    assert_sts_error(post(_edit_aws_token(good, unsigned)), "invalid_grant")

    def other_host(r):
        for h in r["headers"]:
            if h["key"] == "host":
                h["value"] = "sts.eu-west-1.amazonaws.com"
    assert_sts_error(post(_edit_aws_token(good, other_host)), "invalid_grant")
    # nothing was replayed for any of the above
    assert fg.aws_requests == []

    # a well-formed request whose AWS endpoint is down is a transient failure (not a 400)
    r = post(good)
    assert r.status_code == 503
    [replay] = fg.aws_requests
    assert replay["url"] == "http://127.0.0.1:9/?Action=GetCallerIdentity&Version=2011-06-15"
    assert ("host", "sts.us-east-1.amazonaws.com") in replay["headers"]


def test_aws_provider_end_to_end_with_fake_aws(fg, issuer, tmp_path):
    """Seed 000's "IAM role federation": AWS role creds -> signed GetCallerIdentity -> Google STS,
    verified by replaying it to the SigV4-checking fake AWS STS."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    from support.fake_aws import FakeAwsSts

    with FakeAwsSts(account_id=ACCOUNT) as aws_sts:
        aws_sts.add_oidc_provider(issuer.url, client_ids=["sts.amazonaws.com"])
        host = issuer.url.split("://", 1)[1]
        role_arn = aws_sts.add_role("gcp-caller", provider=host,
                                    conditions={f"{host}:sub": SUBJECT, f"{host}:aud": "sts.amazonaws.com"})
        boto = boto3.client("sts", endpoint_url=aws_sts.url, region_name="us-east-1",
                            config=Config(signature_version=UNSIGNED))
        out = boto.assume_role_with_web_identity(RoleArn=role_arn, RoleSessionName="team-a.app-0",
                                                 WebIdentityToken=issuer.kube_token("sts.amazonaws.com"))
        c = out["Credentials"]
        assumed_arn = out["AssumedRoleUser"]["Arn"]
        assert assumed_arn == f"arn:aws:sts::{ACCOUNT}:assumed-role/gcp-caller/team-a.app-0"

        prov = fg.add_aws_provider(PROJECT_NUMBER, "aws-pool", "aws-dev", ACCOUNT, aws_sts.url)
        aud = provider_audience(prov)
        fg.add_service_account(GSA)
        role_set = (f"principalSet://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/"
                    f"workloadIdentityPools/aws-pool/attribute.aws_role/arn:aws:sts::{ACCOUNT}:assumed-role/gcp-caller")
        fg.grant_workload_identity_user(GSA, role_set)
        fg.add_bucket("aws-fed", PROJECT, readers=[f"serviceAccount:{GSA}"])

        # the real google-auth AWS external_account flow, with impersonation
        creds = aws.Credentials(
            audience=aud, subject_token_type=TOKEN_TYPE_AWS4_REQUEST, token_url=fg.sts_url,
            aws_security_credentials_supplier=_StaticAwsCreds(c["AccessKeyId"], c["SecretAccessKey"],
                                                              c["SessionToken"]),
            service_account_impersonation_url=fg.generate_access_token_url(GSA),
            scopes=[SCOPE_CLOUD_PLATFORM])
        creds.refresh(google.auth.transport.requests.Request())
        assert fg.principal_of(creds.token) == f"serviceAccount:{GSA}"
        [s] = fg.calls_to("sts")
        fed_principal = (f"principal://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/"
                         f"workloadIdentityPools/aws-pool/subject/{assumed_arn}")
        assert s["principal"] == fed_principal
        info = fg.token_info(s["access_token"])
        assert info["attributes"] == {"aws_role": f"arn:aws:sts::{ACCOUNT}:assumed-role/gcp-caller",
                                      "aws_account": ACCOUNT}
        assert list_bucket_names(fg, creds.token) == ["aws-fed"]
        # fake AWS verified the replayed signature
        gci = aws_sts.calls_for("GetCallerIdentity")
        assert gci and gci[-1]["status"] == 200

        # wrong secret -> AWS rejects the signature -> invalid_grant quoting AWS
        bad = _aws_subject_token(aud, (c["AccessKeyId"], "wrong-secret", c["SessionToken"]))
        d = assert_sts_error(sts(fg, bad, aud, subject_token_type=TOKEN_TYPE_AWS4_REQUEST),
                             "invalid_grant")["error_description"]
        assert d.startswith("Received invalid AWS response of type SignatureDoesNotMatch")

        # another account's provider refuses this caller
        prov2 = fg.add_aws_provider(PROJECT_NUMBER, "aws-pool", "aws-other", "999999999999", aws_sts.url)
        tok2 = _aws_subject_token(provider_audience(prov2),
                                  (c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]))
        d = assert_sts_error(sts(fg, tok2, provider_audience(prov2), subject_token_type=TOKEN_TYPE_AWS4_REQUEST),
                             "invalid_grant")["error_description"]
        assert "account" in d

        # expired AWS credentials
        aws_sts.expire_credentials(c["AccessKeyId"])
        tok3 = _aws_subject_token(aud, (c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]))
        d = assert_sts_error(sts(fg, tok3, aud, subject_token_type=TOKEN_TYPE_AWS4_REQUEST),
                             "invalid_grant")["error_description"]
        assert "ExpiredToken" in d
