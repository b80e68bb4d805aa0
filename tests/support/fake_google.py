"""An in-process fake of the Google services metabridge talks to.

One stdlib ``ThreadingHTTPServer`` (HTTP/1.1, Content-Length framing, daemon
threads) plays:

* **Security Token Service** ``POST /v1/token`` (sts.googleapis.com) — OAuth 2.0
  token exchange (RFC 8693) of an OIDC JWT or of a serialized, SigV4-signed AWS
  ``GetCallerIdentity`` request for a federated access token.
* **IAM Service Account Credentials** ``POST /v1/projects/-/serviceAccounts/
  {EMAIL}:generateAccessToken|generateIdToken`` (iamcredentials.googleapis.com).
* **Google's OIDC issuer** for the ID tokens it mints:
  ``GET /.well-known/openid-configuration`` and ``GET /oauth2/v3/certs``.
* **Cloud Storage JSON API** subset: ``GET /storage/v1/b?project=P`` (bucket
  list) and ``GET /storage/v1/b/NAME`` (bucket get), enough for
  ``google.cloud.storage.Client(...).list_buckets()`` / ``get_bucket()``.
* ``GET /oauth2/v3/tokeninfo?access_token=…`` — a tokeninfo-like helper.

Wire behaviour follows /work/shared/research/exchange.md §2.  Error strings
marked *(observed)* below are Google's real ones (quoted in exchange.md or in
public issue threads, e.g. google-github-actions/auth#60 and #29); the others
are this fake's own wording of the same condition, in Google's style.

* STS errors are RFC 6749 JSON ``{"error","error_description"}`` with HTTP 400:
  - ``invalid_request`` ``Invalid value for "audience". This value should be the
    full resource name of the Identity Provider. See … for the list of possible
    formats.`` *(observed)*
  - ``invalid_target`` ``The target service indicated by the "audience"
    parameters is invalid. …`` *(observed)*
  - ``unauthorized_client`` ``The given credential is rejected by the attribute
    condition.`` *(observed)*
  - ``invalid_grant`` ``The audience in JWT does not match the expected
    values.`` *(observed)*; other ``invalid_grant`` descriptions (signature,
    expiry, issuer, kid, lifetime, AWS) are the fake's.
* IAM Credentials and Storage errors are Google API error JSON
  ``{"error":{"code","message","status","details"}}`` (Storage: the JSON API's
  ``{"error":{"code","message","errors":[…]}}``).
* Injected faults (``set_fault(status=…)``) answer with Google API error JSON
  (``RESOURCE_EXHAUSTED`` / ``INTERNAL`` / ``UNAVAILABLE`` …) on every endpoint,
  which is what Google's front end sends for quota and availability failures.

Interface (see each method's docstring)::

    fg = FakeGoogle().start()            # or: with FakeGoogle() as fg:
    fg.url / fg.url_for(node_ip)         # STS at url+"/v1/token", IAM at url+"/v1/projects/-/serviceAccounts/…"
    fg.sts_url, fg.generate_access_token_url(email), fg.generate_id_token_url(email)
    fg.id_token_issuer ("https://accounts.google.com"), fg.jwks_url, fg.jwks, fg.id_token_kid
    prov = fg.add_oidc_provider(N, pool, provider, issuer_uri, allowed_audiences=None,
                                attribute_condition=None, *, attribute_mapping=None, jwks_json=None)
    prov = fg.add_aws_provider(N, pool, provider, account_id, aws_sts_url, attribute_condition=None)
    fg.set_provider_enabled(prov, False)
    fg.add_service_account(email, unique_id=None) -> {"email","unique_id","uniqueId","projectId","name"}
    fg.grant_workload_identity_user(email, member) / fg.revoke_workload_identity_user(email, member)
    fg.add_bucket(name, project, readers)
    fg.set_fault(endpoint, latency=, status=, count=, refuse=) / fg.clear_faults(endpoint=None)
        endpoint: sts | generateAccessToken | generateIdToken | storage | oidc | tokeninfo
    fg.calls, fg.calls_to(endpoint), fg.reset_calls(), fg.oidc_fetches, fg.aws_requests
    fg.principal_of(token) -> "principal://…" | "serviceAccount:EMAIL" | None
    fg.token_info(token) -> dict | None ; fg.expire_token(token) ; fg.sign_id_token(claims)
    knobs: fg.federated_token_lifetime (3600), fg.id_token_lifetime (3600), fg.clock_skew (0),
           fg.http_timeout (5)

Every entry of ``calls`` has ``endpoint, method, path, status, principal, authorization_present,
headers, time, duration, client`` (+ ``fault``/``refused`` when a fault was injected, ``error`` /
``error_description`` on errors).  STS adds ``scope`` (space-separated string), ``audience``,
``subject_token_type``, ``content_type``, ``provider``, ``assertion``, ``access_token``;
generateAccessToken adds ``target``, ``scope`` (list), ``lifetime``, ``delegates``, ``access_token``;
generateIdToken adds ``target``, ``audience``, ``include_email``, ``claims``; storage adds
``project``, ``bucket``, ``returned``.

Never derived from matheuscscp/gke-metadata-server (AGPL).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import http.client
import json
import re
import secrets
import socket
import threading
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = [
    "FakeGoogle",
    "GRANT_TYPE_TOKEN_EXCHANGE",
    "TOKEN_TYPE_ACCESS_TOKEN",
    "TOKEN_TYPE_JWT",
    "TOKEN_TYPE_ID_TOKEN",
    "TOKEN_TYPE_AWS4_REQUEST",
    "SCOPE_CLOUD_PLATFORM",
    "SCOPE_IAM",
    "provider_audience",
]

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_TYPE_AWS4_REQUEST = "urn:ietf:params:aws:token-type:aws4_request"

SCOPE_CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
SCOPE_IAM = "https://www.googleapis.com/auth/iam"
# Scopes that let a token call the Cloud Storage JSON API (read side).
_STORAGE_SCOPES = {
    SCOPE_CLOUD_PLATFORM,
    "https://www.googleapis.com/auth/cloud-platform.read-only",
    "https://www.googleapis.com/auth/devstorage.read_only",
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/devstorage.full_control",
}
# Scopes that let a token call IAM Credentials.
_IAM_SCOPES = {SCOPE_CLOUD_PLATFORM, SCOPE_IAM}

_ENDPOINTS = {"sts", "generateAccessToken", "generateIdToken", "storage", "oidc", "tokeninfo"}

_MAX_SUBJECT_TOKEN_LIFETIME = 48 * 3600
_MAX_ACCESS_TOKEN_LIFETIME = 3600
_GOOGLE_SUBJECT_MAX_BYTES = 127

_POOL_RE = r"projects/[^/]+/locations/global/workloadIdentityPools/[^/]+"
_AUDIENCE_RE = re.compile(
    r"^//iam\.googleapis\.com/(projects/([^/]+)/locations/global/workloadIdentityPools/([^/]+)/providers/([^/]+))$"
)
_PRINCIPAL_RE = re.compile(r"^principal://iam\.googleapis\.com/(" + _POOL_RE + r")/subject/(.+)$")
_PRINCIPAL_SET_RE = re.compile(r"^principalSet://iam\.googleapis\.com/(" + _POOL_RE + r")/(.+)$")
_AWS_STS_HOST_RE = re.compile(r"^sts(\.[a-z0-9-]+)?\.amazonaws\.com(\.cn)?$")
_LIFETIME_RE = re.compile(r"^(\d+)(\.\d{1,9})?s$")

# --- observed Google messages -------------------------------------------------
MSG_STS_BAD_AUDIENCE = (
    'Invalid value for "audience". This value should be the full resource name of the '
    "Identity Provider. See https://cloud.google.com/iam/docs/reference/sts/rest/v1/TopLevel/token "
    "for the list of possible formats."
)
MSG_STS_INVALID_TARGET = (
    'The target service indicated by the "audience" parameters is invalid. This might either be '
    "because the pool or provider is disabled or deleted or because it doesn't exist."
)
MSG_STS_CONDITION = "The given credential is rejected by the attribute condition."
MSG_STS_BAD_JWT_AUDIENCE = "The audience in JWT does not match the expected values."
MSG_UNAUTHENTICATED_MISSING = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. "
    "See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
MSG_UNAUTHENTICATED_INVALID = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. "
    "See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
MSG_INSUFFICIENT_SCOPES = "Request had insufficient authentication scopes."
MSG_INVALID_ARGUMENT = "Request contains an invalid argument."


def _permission_denied_message(permission: str) -> str:
    return f"Permission '{permission}' denied on resource (or it may not exist)."


_FAULT_STATUS = {
    400: ("INVALID_ARGUMENT", MSG_INVALID_ARGUMENT),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: (
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Requests' and limit 'Requests per minute' of the service.",
    ),
    500: ("INTERNAL", "Internal error encountered."),
    502: ("UNAVAILABLE", "Bad Gateway"),
    503: ("UNAVAILABLE", "The service is currently unavailable."),
    504: ("DEADLINE_EXCEEDED", "The request timed out. Please try again."),
}

_GCS_REASON = {400: "invalid", 401: "authError", 403: "forbidden", 404: "notFound", 429: "rateLimitExceeded",
               500: "backendError", 502: "backendError", 503: "backendError", 504: "backendError"}


def provider_audience(provider_name: str) -> str:
    """The STS ``audience`` of a provider resource name (``//iam.googleapis.com/<name>``)."""
    return "//iam.googleapis.com/" + provider_name


def _b64url_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _rfc3339(ts: float) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` — no fractional seconds (google-auth parses %SZ)."""
    return _dt.datetime.fromtimestamp(int(ts), tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339_millis(ts: float) -> str:
    d = _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


class _Reply(Exception):
    """Raised inside a handler to answer with a prepared response."""

    def __init__(self, status: int, body: Any, headers: dict | None = None, record: dict | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.record = record or {}


def _sts_error(error: str, description: str, status: int = 400) -> _Reply:
    return _Reply(status, {"error": error, "error_description": description},
                  record={"error": error, "error_description": description})


def _google_error(code: int, status: str, message: str, details: list | None = None,
                  headers: dict | None = None) -> _Reply:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        err["details"] = details
    return _Reply(code, {"error": err}, headers=headers, record={"error": status, "error_description": message})


def _gcs_error(code: int, message: str, reason: str | None = None, location: str | None = None) -> _Reply:
    item: dict[str, Any] = {"message": message, "domain": "global", "reason": reason or _GCS_REASON.get(code, "error")}
    if location:
        item["locationType"] = "header"
        item["location"] = location
    headers = {}
    if code == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="https://accounts.google.com/"'
    return _Reply(code, {"error": {"code": code, "message": message, "errors": [item]}}, headers=headers,
                  record={"error": item["reason"], "error_description": message})


class _Provider:
    def __init__(self, name: str, kind: str, **kw: Any):
        self.name = name
        self.kind = kind  # "oidc" | "aws"
        self.pool = name.rsplit("/providers/", 1)[0]
        self.disabled = False
        self.issuer_uri: str | None = kw.get("issuer_uri")
        self.allowed_audiences: list[str] = list(kw.get("allowed_audiences") or [])
        self.attribute_condition: Callable[[dict], bool] | None = kw.get("attribute_condition")
        self.attribute_mapping: Callable[[dict], dict] | None = kw.get("attribute_mapping")
        self.jwks_json: dict | None = kw.get("jwks_json")
        self.account_id: str | None = kw.get("account_id")
        self.aws_sts_url: str | None = kw.get("aws_sts_url")

    def audiences(self) -> set[str]:
        return {"//iam.googleapis.com/" + self.name, "https://iam.googleapis.com/" + self.name}


class _Token:
    def __init__(self, token: str, kind: str, principal: str, scopes: list[str], expires_at: float, **kw: Any):
        self.token = token
        self.kind = kind  # "federated" | "service_account"
        self.principal = principal
        self.scopes = scopes
        self.issued_at = time.time()
        self.expires_at = expires_at
        self.pool: str | None = kw.get("pool")
        self.provider: str | None = kw.get("provider")
        self.subject: str | None = kw.get("subject")
        self.attributes: dict[str, str] = kw.get("attributes") or {}
        self.email: str | None = kw.get("email")

    def info(self) -> dict:
        return {
            "token": self.token, "kind": self.kind, "principal": self.principal, "scopes": list(self.scopes),
            "issued_at": self.issued_at, "expires_at": self.expires_at, "pool": self.pool,
            "provider": self.provider, "subject": self.subject, "attributes": dict(self.attributes),
            "email": self.email, "expired": time.time() >= self.expires_at,
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ESF"
    sys_version = ""
    timeout = 120

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802
        self.server.fake._handle(self)  # type: ignore[attr-defined]

    def do_POST(self) -> None:  # noqa: N802
        self.server.fake._handle(self)  # type: ignore[attr-defined]

    def do_PUT(self) -> None:  # noqa: N802
        self.server.fake._handle(self)  # type: ignore[attr-defined]

    def do_DELETE(self) -> None:  # noqa: N802
        self.server.fake._handle(self)  # type: ignore[attr-defined]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FakeGoogle:
    """Google STS + IAM Credentials + accounts.google.com OIDC + Cloud Storage, in one server."""

    id_token_issuer = "https://accounts.google.com"

    def __init__(self, host: str = "0.0.0.0", port: int = 0):
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

        self.federated_token_lifetime = 3600
        self.id_token_lifetime = 3600
        self.clock_skew = 0.0  # seconds of tolerance on the subject JWT's iat / nbf / exp
        self.http_timeout = 5.0  # for discovery / JWKS / AWS STS fetches

        self._providers: dict[str, _Provider] = {}
        self._service_accounts: dict[str, dict] = {}  # email -> info
        self._bindings: dict[str, list[str]] = {}  # email -> members with roles/iam.workloadIdentityUser
        self._buckets: dict[str, dict] = {}
        self._tokens: dict[str, _Token] = {}
        self._faults: dict[str, dict] = {}
        self._jwks_cache: dict[str, tuple[str, dict]] = {}  # issuer -> (jwks_uri, jwks)
        self._conns: set[socket.socket] = set()

        self.calls: list[dict] = []
        self.oidc_fetches: list[str] = []  # every discovery / JWKS URL fetched for subject-token checks
        self.aws_requests: list[dict] = []  # every GetCallerIdentity replay: {"url","headers","status","body"}

        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = self._signing_key.public_key().public_numbers()
        self._kid = hashlib.sha1(_b64url_uint(pub.n).encode()).hexdigest()
        self._jwk = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self._kid,
                     "n": _b64url_uint(pub.n), "e": _b64url_uint(pub.e)}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeGoogle":
        if self._server is not None:
            return self
        self._server = _Server((self._host, self._port), _Handler)
        self._server.fake = self  # type: ignore[attr-defined]
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-google", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open (keep-alive) connection, like a server going away."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeGoogle":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (still known after ``stop()``, so a stopped fake is a dead endpoint)."""
        if self._server is None and not self._port:
            raise RuntimeError("FakeGoogle is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, host_ip: str) -> str:
        """The same server as seen from pods (bound to 0.0.0.0): ``http://HOST_IP:PORT``."""
        return f"http://{host_ip}:{self.port}"

    @property
    def sts_url(self) -> str:
        return self.url + "/v1/token"

    @property
    def iamcredentials_url(self) -> str:
        """Base to append ``/v1/projects/-/serviceAccounts/EMAIL:generateAccessToken`` to."""
        return self.url

    def generate_access_token_url(self, email: str, base: str | None = None) -> str:
        return f"{base or self.url}/v1/projects/-/serviceAccounts/{email}:generateAccessToken"

    def generate_id_token_url(self, email: str, base: str | None = None) -> str:
        return f"{base or self.url}/v1/projects/-/serviceAccounts/{email}:generateIdToken"

    @property
    def jwks_url(self) -> str:
        return self.url + "/oauth2/v3/certs"

    @property
    def openid_configuration_url(self) -> str:
        return self.url + "/.well-known/openid-configuration"

    @property
    def jwks(self) -> dict:
        return {"keys": [dict(self._jwk)]}

    @property
    def id_token_kid(self) -> str:
        return self._kid

    # ------------------------------------------------------------------ configuration
    def add_oidc_provider(self, project_number: int | str, pool: str, provider: str, issuer_uri: str,
                          allowed_audiences: list[str] | None = None,
                          attribute_condition: Callable[[dict], bool] | None = None, *,
                          attribute_mapping: Callable[[dict], dict] | None = None,
                          jwks_json: dict | str | None = None) -> str:
        """Register an OIDC workload identity pool provider; returns its resource name.

        Default mapping (seed 000): ``google.subject = assertion.sub``,
        ``attribute.namespace|service_account_name|pod`` from the ``kubernetes.io`` claims.
        ``attribute_condition(assertion) -> bool`` plays the CEL condition.
        ``attribute_mapping(assertion) -> {"google.subject": …, "attribute.X": …}`` overrides the mapping.
        ``jwks_json`` plays the provider's uploaded JWKS (``oidc.jwksJson``): keys come from it
        instead of ``<issuer>/.well-known/openid-configuration``.
        """
        name = f"projects/{project_number}/locations/global/workloadIdentityPools/{pool}/providers/{provider}"
        if isinstance(jwks_json, str):
            jwks_json = json.loads(jwks_json)
        if allowed_audiences is not None and isinstance(allowed_audiences, str):
            raise TypeError("allowed_audiences must be a list")
        with self._lock:
            self._providers[name] = _Provider(
                name, "oidc", issuer_uri=issuer_uri, allowed_audiences=allowed_audiences,
                attribute_condition=attribute_condition, attribute_mapping=attribute_mapping, jwks_json=jwks_json)
        return name

    def add_aws_provider(self, project_number: int | str, pool: str, provider: str, account_id: str,
                         aws_sts_url: str, attribute_condition: Callable[[dict], bool] | None = None) -> str:
        """Register an AWS workload identity pool provider; returns its resource name.

        Subject tokens are serialized SigV4-signed ``GetCallerIdentity`` requests; the fake replays
        them to ``aws_sts_url`` (keeping method, path, query, headers incl. ``Host``, body) and maps
        ``google.subject = assertion.arn``, ``attribute.aws_role`` (Google's default AWS mapping),
        ``attribute.aws_account = assertion.account``.
        """
        name = f"projects/{project_number}/locations/global/workloadIdentityPools/{pool}/providers/{provider}"
        with self._lock:
            self._providers[name] = _Provider(name, "aws", account_id=str(account_id), aws_sts_url=aws_sts_url,
                                              attribute_condition=attribute_condition)
        return name

    def set_provider_enabled(self, provider_name: str, enabled: bool) -> None:
        """Disable (or re-enable) a provider; a disabled one answers ``invalid_target``."""
        with self._lock:
            self._providers[provider_name].disabled = not enabled

    def add_service_account(self, email: str, unique_id: str | None = None) -> dict:
        if "@" not in email or not email.endswith("gserviceaccount.com"):
            raise ValueError(f"not a Google service account email: {email!r}")
        if unique_id is None:
            unique_id = "1" + "".join(secrets.choice("0123456789") for _ in range(20))
        unique_id = str(unique_id)
        project = email.split("@", 1)[1].split(".", 1)[0]
        info = {"email": email, "unique_id": unique_id, "uniqueId": unique_id, "projectId": project,
                "name": f"projects/{project}/serviceAccounts/{email}"}
        with self._lock:
            self._service_accounts[email] = info
            self._bindings.setdefault(email, [])
        return dict(info)

    def grant_workload_identity_user(self, gsa_email: str, member: str) -> None:
        """Add ``member`` to ``roles/iam.workloadIdentityUser`` on the GSA (getAccessToken + getOpenIdToken)."""
        if not (member.startswith(("principal://", "principalSet://", "serviceAccount:", "user:", "group:"))):
            raise ValueError(f"not an IAM member: {member!r}")
        if member.startswith("principal://") and not _PRINCIPAL_RE.match(member):
            raise ValueError(f"malformed principal: {member!r}")
        if member.startswith("principalSet://") and not _PRINCIPAL_SET_RE.match(member):
            raise ValueError(f"malformed principalSet: {member!r}")
        with self._lock:
            if gsa_email not in self._service_accounts:
                raise KeyError(f"unknown service account {gsa_email}")
            if member not in self._bindings[gsa_email]:
                self._bindings[gsa_email].append(member)

    def revoke_workload_identity_user(self, gsa_email: str, member: str) -> None:
        with self._lock:
            if member in self._bindings.get(gsa_email, []):
                self._bindings[gsa_email].remove(member)

    def add_bucket(self, name: str, project: str, readers: list[str]) -> dict:
        """A bucket in ``project`` that ``readers`` (``serviceAccount:EMAIL`` / ``principal://…`` /
        ``principalSet://…``) may list and get."""
        if isinstance(readers, str):
            raise TypeError("readers must be a list of IAM members")
        # a bare GSA email means that service account
        readers = [r if ":" in r else "serviceAccount:" + r for r in readers]
        now = time.time()
        bucket = {"name": name, "project": str(project), "readers": list(readers), "created": now,
                  "generation": str(int(now * 1_000_000))}
        with self._lock:
            self._buckets[name] = bucket
        return dict(bucket)

    def set_fault(self, endpoint: str, *, latency: float = 0.0, status: int | None = None,
                  count: int | None = None, refuse: bool = False) -> None:
        """Inject a fault on ``endpoint`` (sts, generateAccessToken, generateIdToken, storage, oidc, tokeninfo).

        ``latency`` seconds are slept before answering; ``status`` answers with a Google-shaped error of
        that HTTP status; ``refuse`` closes the connection without answering. ``count`` requests are
        affected (``None``: until ``clear_faults``)."""
        if endpoint not in _ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {sorted(_ENDPOINTS)}")
        if status is not None and not (400 <= int(status) <= 599):
            raise ValueError("status must be an HTTP error status")
        if count is not None and count <= 0:
            raise ValueError("count must be positive or None")
        with self._lock:
            self._faults[endpoint] = {"latency": float(latency), "status": status, "count": count,
                                      "refuse": bool(refuse)}

    def clear_faults(self, endpoint: str | None = None) -> None:
        with self._lock:
            if endpoint is None:
                self._faults.clear()
            else:
                self._faults.pop(endpoint, None)

    # ------------------------------------------------------------------ inspection
    def principal_of(self, access_token: str) -> str | None:
        """IAM member an access token we issued belongs to: ``principal://…`` for STS tokens,
        ``serviceAccount:EMAIL`` for generateAccessToken tokens; ``None`` if we never issued it."""
        with self._lock:
            t = self._tokens.get(access_token)
            return t.principal if t else None

    def token_info(self, access_token: str) -> dict | None:
        with self._lock:
            t = self._tokens.get(access_token)
            return t.info() if t else None

    def expire_token(self, access_token: str) -> None:
        """Make an access token we issued expire now."""
        with self._lock:
            self._tokens[access_token].expires_at = time.time() - 1

    def calls_to(self, endpoint: str) -> list[dict]:
        with self._lock:
            return [c for c in self.calls if c["endpoint"] == endpoint]

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()
            self.oidc_fetches.clear()
            self.aws_requests.clear()

    def sign_id_token(self, claims: dict) -> str:
        """Sign arbitrary claims with this fake's ``accounts.google.com`` key (for negative tests)."""
        return jwt.encode(claims, self._signing_key, algorithm="RS256", headers={"kid": self._kid, "typ": "JWT"})

    # ------------------------------------------------------------------ HTTP plumbing
    def _track(self, conn: socket.socket, opened: bool) -> None:
        with self._lock:
            if opened:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _handle(self, h: _Handler) -> None:
        started = time.time()
        parsed = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(parsed.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        headers = {k.lower(): v for k, v in h.headers.items()}
        try:
            body = self._read_body(h)
        except ValueError:
            self._send(h, 400, {"error": "invalid_request", "error_description": "Malformed request body."})
            return
        endpoint, route = self._route(h.command, path)
        record: dict[str, Any] = {
            "endpoint": endpoint, "method": h.command, "path": path, "status": None, "principal": None,
            "authorization_present": "authorization" in headers, "headers": headers, "time": started,
            "client": h.client_address[0],
        }

        fault = self._take_fault(endpoint) if endpoint else None
        if fault is not None:
            record["fault"] = True
            if fault["latency"]:
                time.sleep(fault["latency"])
            if fault["refuse"]:
                record["status"] = None
                record["refused"] = True
                self._record(record)
                h.close_connection = True
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault["status"] is not None:
                reply = self._fault_reply(endpoint, int(fault["status"]))
                record["status"] = reply.status
                record.update(reply.record)
                self._record(record)
                self._send(h, reply.status, reply.body, reply.headers)
                return

        try:
            if route is None:
                raise _Reply(404, {"error": {"code": 404, "message": "Not Found", "status": "NOT_FOUND"}})
            reply = route(h, path, query, headers, body, record)
        except _Reply as r:
            reply = r
        except Exception as exc:  # a bug in the fake must be visible, not a hang
            reply = _google_error(500, "INTERNAL", f"fake_google internal error: {exc!r}")
        record["status"] = reply.status
        for k, v in reply.record.items():
            record.setdefault(k, v)
        if endpoint:
            self._record(record)
        self._send(h, reply.status, reply.body, reply.headers)

    def _record(self, record: dict) -> None:
        record["duration"] = time.time() - record["time"]
        with self._lock:
            self.calls.append(record)

    @staticmethod
    def _read_body(h: _Handler) -> bytes:
        te = (h.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                line = h.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline(65537)
        length = h.headers.get("Content-Length")
        if length is None:
            return b""
        n = int(length)
        if n < 0:
            raise ValueError("negative Content-Length")
        return h.rfile.read(n) if n else b""

    @staticmethod
    def _send(h: _Handler, status: int, body: Any, headers: dict | None = None) -> None:
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            data = json.dumps(body, indent=2).encode()
            headers.setdefault("Content-Type", "application/json; charset=UTF-8")
        elif isinstance(body, str):
            data = body.encode()
            headers.setdefault("Content-Type", "text/plain; charset=UTF-8")
        else:
            data = body or b""
        try:
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Vary", "Origin, X-Origin, Referer")
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def _take_fault(self, endpoint: str) -> dict | None:
        with self._lock:
            f = self._faults.get(endpoint)
            if f is None:
                return None
            snapshot = dict(f)
            if f["count"] is not None:
                f["count"] -= 1
                if f["count"] <= 0:
                    del self._faults[endpoint]
            return snapshot

    @staticmethod
    def _fault_reply(endpoint: str, status: int) -> _Reply:
        name, message = _FAULT_STATUS.get(status, ("UNKNOWN", "Injected fault."))
        if endpoint == "storage":
            return _gcs_error(status, message)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return _google_error(status, name, message, headers=headers)

    def _route(self, method: str, path: str) -> tuple[str | None, Callable | None]:
        if path == "/v1/token":
            return "sts", (self._sts if method == "POST" else self._method_not_allowed)
        if path.startswith("/v1/projects/") and "/serviceAccounts/" in path:
            last = path.rsplit("/", 1)[-1]
            if last.endswith(":generateAccessToken"):
                return "generateAccessToken", (self._generate_access_token if method == "POST"
                                               else self._method_not_allowed)
            if last.endswith(":generateIdToken"):
                return "generateIdToken", (self._generate_id_token if method == "POST" else self._method_not_allowed)
            return None, None
        if path in ("/.well-known/openid-configuration", "/oauth2/v3/certs"):
            return "oidc", (self._oidc if method == "GET" else self._method_not_allowed)
        if path == "/oauth2/v3/tokeninfo" or path == "/tokeninfo":
            return "tokeninfo", self._tokeninfo
        if path == "/storage/v1/b" or path.startswith("/storage/v1/b/"):
            return "storage", (self._storage if method == "GET" else self._method_not_allowed)
        return None, None

    @staticmethod
    def _method_not_allowed(h, path, query, headers, body, record) -> _Reply:
        return _google_error(405, "UNIMPLEMENTED", f"Method {h.command} is not allowed on {path}.")

    # ------------------------------------------------------------------ tokens
    def _issue(self, prefix: str, kind: str, principal: str, scopes: list[str], lifetime: float, **kw: Any) -> _Token:
        token = prefix + secrets.token_urlsafe(96).replace("-", "_")
        t = _Token(token, kind, principal, scopes, time.time() + lifetime, **kw)
        with self._lock:
            self._tokens[token] = t
        return t

    def _bearer(self, headers: dict) -> tuple[str | None, _Token | None, str]:
        """-> (raw token or None, token record or None, problem: "" | "missing" | "invalid" | "expired")."""
        auth = headers.get("authorization")
        if not auth:
            return None, None, "missing"
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None, None, "invalid"
        value = value.strip()
        with self._lock:
            t = self._tokens.get(value)
        if t is None:
            return value, None, "invalid"
        if time.time() >= t.expires_at:
            return value, t, "expired"
        return value, t, ""

    def _member_matches(self, member: str, t: _Token) -> bool:
        if member == t.principal:
            return True
        if t.kind != "federated":
            return False
        m = _PRINCIPAL_SET_RE.match(member)
        if not m or m.group(1) != t.pool:
            return False
        rest = m.group(2)
        if rest == "*":
            return True
        if rest.startswith("attribute."):
            name, sep, value = rest[len("attribute."):].partition("/")
            return bool(sep) and t.attributes.get(name) == value
        return False

    # ------------------------------------------------------------------ STS
    def _sts(self, h, path, query, headers, body, record) -> _Reply:
        ctype = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype == "application/json":
            try:
                raw = json.loads(body or b"{}")
                if not isinstance(raw, dict):
                    raise ValueError
            except ValueError:
                raise _sts_error("invalid_request", "Invalid JSON payload received.")
            camel = {"grantType": "grant_type", "requestedTokenType": "requested_token_type",
                     "subjectToken": "subject_token", "subjectTokenType": "subject_token_type"}
            params = {camel.get(k, k): ("" if v is None else str(v)) for k, v in raw.items()}
        elif ctype == "application/x-www-form-urlencoded":
            try:
                pairs = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
            except (UnicodeDecodeError, ValueError):
                raise _sts_error("invalid_request", "Malformed application/x-www-form-urlencoded body.")
            for k, v in pairs.items():
                if len(v) > 1:
                    raise _sts_error("invalid_request", f'Duplicate parameter "{k}".')
            params = {k: v[0] for k, v in pairs.items()}
        else:
            raise _sts_error("invalid_request",
                             'Unsupported Content-Type; expected "application/x-www-form-urlencoded" '
                             'or "application/json".')
        record["content_type"] = ctype
        record["scope"] = params.get("scope")
        record["audience"] = params.get("audience")
        record["subject_token_type"] = params.get("subject_token_type")

        if "authorization" in headers:
            raise _sts_error("invalid_request",
                             "The Authorization header is not supported for this request; "
                             "send the subject token in the request body only.")
        grant_type = params.get("grant_type", "")
        if not grant_type:
            raise _sts_error("invalid_request", 'Missing required parameter: "grant_type".')
        if grant_type != GRANT_TYPE_TOKEN_EXCHANGE:
            raise _sts_error("unsupported_grant_type", f'Invalid value for "grant_type": "{grant_type}".')
        rtt = params.get("requested_token_type", "")
        if rtt != TOKEN_TYPE_ACCESS_TOKEN:
            raise _sts_error("invalid_request",
                             f'Invalid value for "requested_token_type". Supported values: "{TOKEN_TYPE_ACCESS_TOKEN}".')
        subject_token = params.get("subject_token", "")
        if not subject_token:
            raise _sts_error("invalid_request", 'Missing required parameter: "subject_token".')
        stt = params.get("subject_token_type", "")
        if stt not in (TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_AWS4_REQUEST):
            raise _sts_error("invalid_request", f'Invalid value for "subject_token_type": "{stt}".')
        audience = params.get("audience", "")
        m = _AUDIENCE_RE.match(audience)
        if not m:
            raise _sts_error("invalid_request", MSG_STS_BAD_AUDIENCE)
        scope = params.get("scope", "")
        scopes = scope.split()
        if not scopes:
            raise _sts_error("invalid_request", 'Missing required parameter: "scope". Scope(s) must be provided '
                                                "for an external credential exchange.")
        options = params.get("options")
        if options:
            if len(options) > 4096:
                raise _sts_error("invalid_request", 'The "options" parameter exceeds 4096 characters.')
            try:
                json.loads(urllib.parse.unquote(options))
            except ValueError:
                raise _sts_error("invalid_request", 'Invalid value for "options": not URL-encoded JSON.')
        name = m.group(1)
        with self._lock:
            prov = self._providers.get(name)
        if prov is None or prov.disabled:
            raise _sts_error("invalid_target", MSG_STS_INVALID_TARGET)
        record["provider"] = name

        if prov.kind == "oidc":
            if stt not in (TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN):
                raise _sts_error("invalid_request",
                                 f'Invalid value for "subject_token_type": an OIDC provider accepts '
                                 f'"{TOKEN_TYPE_JWT}" or "{TOKEN_TYPE_ID_TOKEN}".')
            assertion = self._verify_oidc_subject(prov, subject_token)
            mapped = (prov.attribute_mapping or self._default_kube_mapping)(assertion)
        else:
            if stt != TOKEN_TYPE_AWS4_REQUEST:
                raise _sts_error("invalid_request",
                                 f'Invalid value for "subject_token_type": an AWS provider accepts '
                                 f'"{TOKEN_TYPE_AWS4_REQUEST}".')
            assertion = self._verify_aws_subject(prov, subject_token)
            mapped = self._default_aws_mapping(assertion)
        record["assertion"] = assertion

        subject = mapped.get("google.subject")
        if not isinstance(subject, str) or not subject:
            raise _sts_error("invalid_grant", "The mapped attribute google.subject is missing or empty.")
        if len(subject.encode()) > _GOOGLE_SUBJECT_MAX_BYTES:
            raise _sts_error("invalid_request",
                             f"The size of mapped attribute google.subject exceeds the {_GOOGLE_SUBJECT_MAX_BYTES} "
                             "bytes limit. Either modify your attribute mapping or the incoming assertion to produce "
                             "a mapped attribute that is less than 127 bytes.")
        if prov.attribute_condition is not None and not prov.attribute_condition(assertion):
            raise _sts_error("unauthorized_client", MSG_STS_CONDITION)

        attributes = {k[len("attribute."):]: str(v) for k, v in mapped.items()
                      if k.startswith("attribute.") and v is not None}
        principal = f"principal://iam.googleapis.com/{prov.pool}/subject/{subject}"
        lifetime = float(self.federated_token_lifetime)
        tok = self._issue("ya29.d.", "federated", principal, scopes, lifetime, pool=prov.pool, provider=name,
                          subject=subject, attributes=attributes)
        record["principal"] = principal
        record["access_token"] = tok.token
        expires_in = int(lifetime) - 1 if lifetime > 1 else int(lifetime)
        return _Reply(200, {"access_token": tok.token, "issued_token_type": TOKEN_TYPE_ACCESS_TOKEN,
                            "token_type": "Bearer", "expires_in": expires_in},
                      headers={"Cache-Control": "no-cache, no-store, max-age=0, must-revalidate", "Pragma": "no-cache"})

    @staticmethod
    def _default_kube_mapping(assertion: dict) -> dict:
        k8s = assertion.get("kubernetes.io") if isinstance(assertion.get("kubernetes.io"), dict) else {}
        sa = k8s.get("serviceaccount") if isinstance(k8s.get("serviceaccount"), dict) else {}
        pod = k8s.get("pod") if isinstance(k8s.get("pod"), dict) else {}
        return {"google.subject": assertion.get("sub"), "attribute.namespace": k8s.get("namespace"),
                "attribute.service_account_name": sa.get("name"), "attribute.pod": pod.get("name")}

    @staticmethod
    def _default_aws_mapping(assertion: dict) -> dict:
        arn = assertion["arn"]
        m = re.match(r"^(arn:aws[a-z-]*:sts::\d+:)assumed-role/([^/]+)/", arn)
        aws_role = f"{m.group(1)}assumed-role/{m.group(2)}" if m else arn
        return {"google.subject": arn, "attribute.aws_role": aws_role, "attribute.aws_account": assertion["account"]}

    # --- OIDC subject token
    def _verify_oidc_subject(self, prov: _Provider, token: str) -> dict:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _sts_error("invalid_grant", "Unable to parse the subject token: not a valid JWT.")
        if not isinstance(claims, dict):
            raise _sts_error("invalid_grant", "Unable to parse the subject token: the JWT payload is not an object.")
        alg = header.get("alg")
        if alg not in ("RS256", "ES256"):
            raise _sts_error("invalid_grant",
                             f'The JWT signing algorithm "{alg}" is not supported; use RS256 or ES256.')
        kid = header.get("kid")
        if not kid:
            raise _sts_error("invalid_grant", 'The JWT header is missing the "kid" field.')
        for claim in ("iss", "sub", "aud", "iat", "exp"):
            if claim not in claims:
                raise _sts_error("invalid_grant", f'The JWT is missing the required claim "{claim}".')
        if claims["iss"] != prov.issuer_uri:
            raise _sts_error("invalid_grant",
                             f"The issuer in JWT [{claims['iss']}] does not match the expected issuer "
                             f"[{prov.issuer_uri}].")

        jwk = self._find_key(prov, kid)
        if jwk is None:
            raise _sts_error("invalid_grant",
                             f'The JWT signature could not be verified: no key with kid "{kid}" is published '
                             f"by the issuer.")
        if jwk.get("alg") and jwk["alg"] != alg:
            raise _sts_error("invalid_grant", f'The JWT algorithm "{alg}" does not match key "{kid}".')
        try:
            key = jwt.PyJWK(jwk, algorithm=alg).key
            jwt.decode(token, key=key, algorithms=[alg],
                       options={"verify_signature": True, "verify_aud": False, "verify_exp": False,
                                "verify_iat": False, "verify_nbf": False, "verify_iss": False,
                                "verify_sub": False, "verify_jti": False})
        except jwt.InvalidSignatureError:
            raise _sts_error("invalid_grant", "The JWT signature is invalid.")
        except jwt.PyJWTError as exc:
            raise _sts_error("invalid_grant", f"The JWT signature could not be verified: {exc}.")

        auds = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        allowed = set(prov.allowed_audiences) if prov.allowed_audiences else prov.audiences()
        if not any(isinstance(a, str) and a in allowed for a in auds):
            raise _sts_error("invalid_grant", MSG_STS_BAD_JWT_AUDIENCE)
        try:
            iat, exp = float(claims["iat"]), float(claims["exp"])
        except (TypeError, ValueError):
            raise _sts_error("invalid_grant", 'The JWT claims "iat" and "exp" must be numeric dates.')
        now = time.time()
        if exp <= now - self.clock_skew:
            raise _sts_error("invalid_grant", f"The JWT has expired (exp {int(exp)}, now {int(now)}).")
        if iat > now + self.clock_skew:
            raise _sts_error("invalid_grant", f"The JWT was issued in the future (iat {int(iat)}, now {int(now)}).")
        if "nbf" in claims:
            try:
                nbf = float(claims["nbf"])
            except (TypeError, ValueError):
                raise _sts_error("invalid_grant", 'The JWT claim "nbf" must be a numeric date.')
            if nbf > now + self.clock_skew:
                raise _sts_error("invalid_grant", f"The JWT is not yet valid (nbf {int(nbf)}, now {int(now)}).")
        if exp - iat >= _MAX_SUBJECT_TOKEN_LIFETIME:
            raise _sts_error("invalid_grant",
                             "The JWT lifetime is too long: exp must be less than 48 hours after iat.")
        return claims

    def _find_key(self, prov: _Provider, kid: str) -> dict | None:
        if prov.jwks_json is not None:
            return next((k for k in prov.jwks_json.get("keys", []) if k.get("kid") == kid), None)
        issuer = prov.issuer_uri or ""
        with self._lock:
            cached = self._jwks_cache.get(issuer)
        if cached is not None:
            key = next((k for k in cached[1].get("keys", []) if k.get("kid") == kid), None)
            if key is not None:
                return key
        # unknown issuer or unknown kid (rotation): fetch discovery + JWKS again
        jwks = self._fetch_jwks(issuer)
        return next((k for k in jwks.get("keys", []) if k.get("kid") == kid), None)

    def _http_get_json(self, url: str) -> dict:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with self._lock:
            self.oidc_fetches.append(url)
        req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "fake-google-sts"})
        with opener.open(req, timeout=self.http_timeout) as resp:
            data = json.loads(resp.read())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    def _fetch_jwks(self, issuer: str) -> dict:
        discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            discovery = self._http_get_json(discovery_url)
        except Exception as exc:
            raise _sts_error("invalid_grant",
                             f"Failed to fetch the OpenID Connect discovery document at {discovery_url}: {exc}.")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise _sts_error("invalid_grant", f'The discovery document at {discovery_url} has no "jwks_uri".')
        try:
            jwks = self._http_get_json(jwks_uri)
        except Exception as exc:
            raise _sts_error("invalid_grant", f"Failed to fetch the JWKS at {jwks_uri}: {exc}.")
        if not isinstance(jwks.get("keys"), list):
            raise _sts_error("invalid_grant", f'The JWKS at {jwks_uri} has no "keys" list.')
        with self._lock:
            self._jwks_cache[issuer] = (jwks_uri, jwks)
        return jwks

    # --- AWS subject token
    def _verify_aws_subject(self, prov: _Provider, subject_token: str) -> dict:
        text = subject_token.strip()
        if not text.startswith("{"):
            text = urllib.parse.unquote(text)
        try:
            req = json.loads(text)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            raise _sts_error("invalid_request",
                             "The subject token is not a valid serialized AWS GetCallerIdentity request: "
                             "expected URL-encoded JSON.")
        url = req.get("url")
        method = req.get("method")
        hdrs = req.get("headers")
        body = req.get("body", req.get("data", "")) or ""
        if not isinstance(url, str) or not isinstance(method, str) or not isinstance(hdrs, list) \
                or not isinstance(body, str):
            raise _sts_error("invalid_request",
                             'The serialized AWS request must have "url" and "method" strings and a "headers" list.')
        header_pairs: list[tuple[str, str]] = []
        for item in hdrs:
            if not isinstance(item, dict) or not isinstance(item.get("key"), str) \
                    or not isinstance(item.get("value"), str):
                raise _sts_error("invalid_request",
                                 'Each header of the serialized AWS request must be {"key": …, "value": …}.')
            header_pairs.append((item["key"], item["value"]))
        lower = {}
        for k, v in header_pairs:
            lower.setdefault(k.lower(), v)

        target = lower.get("x-goog-cloud-target-resource")
        if target is None:
            raise _sts_error("invalid_grant",
                             'The AWS request is missing the "x-goog-cloud-target-resource" header.')
        if target not in prov.audiences():
            raise _sts_error("invalid_grant",
                             f'The "x-goog-cloud-target-resource" header [{target}] does not match the '
                             f"audience [//iam.googleapis.com/{prov.name}].")
        if method.upper() != "POST":
            raise _sts_error("invalid_grant", 'The AWS request "method" must be "POST".')
        parts = urllib.parse.urlsplit(url)
        fake_parts = urllib.parse.urlsplit(prov.aws_sts_url or "")
        real_sts = parts.scheme == "https" and bool(_AWS_STS_HOST_RE.match(parts.hostname or "")) and not parts.port
        test_sts = (parts.scheme, parts.netloc) == (fake_parts.scheme, fake_parts.netloc)
        if not (real_sts or test_sts):
            raise _sts_error("invalid_grant", f"The AWS request URL [{url}] is not an AWS STS endpoint.")
        action_params = urllib.parse.parse_qs(parts.query)
        body_params = urllib.parse.parse_qs(body) if body else {}
        action = (action_params.get("Action") or body_params.get("Action") or [""])[0]
        version = (action_params.get("Version") or body_params.get("Version") or [""])[0]
        if action != "GetCallerIdentity" or version != "2011-06-15":
            raise _sts_error("invalid_grant",
                             "The AWS request must call Action=GetCallerIdentity with Version=2011-06-15.")
        if not lower.get("authorization", "").startswith("AWS4-HMAC-SHA256 "):
            raise _sts_error("invalid_grant", "The AWS request is not signed with AWS Signature Version 4.")
        if "x-amz-date" not in lower and "date" not in lower:
            raise _sts_error("invalid_grant", 'The AWS request is missing the "x-amz-date" header.')
        host = lower.get("host")
        if host is None or host.lower() != parts.netloc.lower():
            raise _sts_error("invalid_grant", f'The AWS request "host" header must be [{parts.netloc}].')

        status, resp_body = self._replay_to_aws(prov, parts, header_pairs, body)
        if status != 200:
            code, message = _parse_aws_error(resp_body)
            raise _sts_error("invalid_grant",
                             f"Received invalid AWS response of type {code} with error message: {message}")
        ident = _parse_caller_identity(resp_body)
        if ident is None:
            raise _sts_error("invalid_grant", "Received an unparseable AWS GetCallerIdentity response.")
        if ident["account"] != prov.account_id:
            raise _sts_error("invalid_grant",
                             f"The AWS account [{ident['account']}] does not match the provider's account "
                             f"[{prov.account_id}].")
        return ident

    def _replay_to_aws(self, prov: _Provider, parts: urllib.parse.SplitResult,
                       header_pairs: list[tuple[str, str]], body: str) -> tuple[int, bytes]:
        target = urllib.parse.urlsplit(prov.aws_sts_url or "")
        conn_cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        path = (parts.path or "/") + (("?" + parts.query) if parts.query else "")
        data = body.encode()
        entry: dict[str, Any] = {"url": f"{target.scheme}://{target.netloc}{path}", "headers": list(header_pairs),
                                 "body": body, "status": None}
        try:
            conn = conn_cls(target.hostname, target.port, timeout=self.http_timeout)
            try:
                conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
                for k, v in header_pairs:
                    if k.lower() == "content-length":
                        continue
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(data)))
                conn.endheaders(data)
                resp = conn.getresponse()
                resp_body = resp.read()
                entry["status"] = resp.status
                entry["response"] = resp_body.decode("utf-8", "replace")
                return resp.status, resp_body
            finally:
                conn.close()
        except OSError as exc:
            entry["error"] = repr(exc)
            raise _google_error(503, "UNAVAILABLE", f"Unable to reach AWS STS to verify the credential: {exc}.")
        finally:
            with self._lock:
                self.aws_requests.append(entry)

    # ------------------------------------------------------------------ IAM Credentials
    def _iam_common(self, h, path, headers, body, record, permission: str,
                    method_name: str) -> tuple[_Token, dict, dict]:
        raw, tok, problem = self._bearer(headers)
        www = 'Bearer realm="https://accounts.google.com/"'
        svc_meta = {"service": "iamcredentials.googleapis.com",
                    "method": f"google.iam.credentials.v1.IAMCredentials.{method_name}"}
        if problem == "missing":
            raise _google_error(401, "UNAUTHENTICATED", MSG_UNAUTHENTICATED_MISSING, details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CREDENTIALS_MISSING",
                 "domain": "googleapis.com", "metadata": svc_meta}], headers={"WWW-Authenticate": www})
        if problem in ("invalid", "expired"):
            reason = "ACCESS_TOKEN_EXPIRED" if problem == "expired" else "ACCESS_TOKEN_TYPE_UNSUPPORTED"
            raise _google_error(401, "UNAUTHENTICATED", MSG_UNAUTHENTICATED_INVALID, details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                 "domain": "googleapis.com", "metadata": svc_meta}],
                headers={"WWW-Authenticate": www + ', error="invalid_token"'})
        assert tok is not None
        record["principal"] = tok.principal
        if not _IAM_SCOPES.intersection(tok.scopes):
            raise _google_error(403, "PERMISSION_DENIED", MSG_INSUFFICIENT_SCOPES, details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                 "domain": "googleapis.com", "metadata": svc_meta}],
                headers={"WWW-Authenticate": www + ', error="insufficient_scope", scope="' + SCOPE_IAM + '"'})

        m = re.match(r"^/v1/projects/([^/]+)/serviceAccounts/([^/]+):(generateAccessToken|generateIdToken)$", path)
        if not m:
            raise _google_error(404, "NOT_FOUND", "Requested entity was not found.")
        project, target = m.group(1), urllib.parse.unquote(m.group(2))
        record["target"] = target
        if project != "-":
            raise _google_error(400, "INVALID_ARGUMENT", MSG_INVALID_ARGUMENT)
        with self._lock:
            gsa = self._service_accounts.get(target) or next(
                (s for s in self._service_accounts.values() if s["unique_id"] == target), None)
            members = list(self._bindings.get(gsa["email"], [])) if gsa else []
        if gsa is None or not any(self._member_matches(mem, tok) for mem in members):
            raise _google_error(403, "PERMISSION_DENIED", _permission_denied_message(permission), details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "IAM_PERMISSION_DENIED",
                 "domain": "iam.googleapis.com",
                 "metadata": {"permission": permission,
                              "resource": f"projects/-/serviceAccounts/{target}"}}])
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            raise _google_error(400, "INVALID_ARGUMENT",
                                "Invalid JSON payload received. Expected a JSON object.")
        delegates = req.get("delegates")
        record["delegates"] = delegates
        if delegates not in (None, []):
            if not isinstance(delegates, list):
                raise _google_error(400, "INVALID_ARGUMENT",
                                    'Invalid JSON payload received. Invalid value at \'delegates\'.')
            raise _google_error(400, "INVALID_ARGUMENT", "fake_google does not model delegation chains.")
        return tok, gsa, req

    def _generate_access_token(self, h, path, query, headers, body, record) -> _Reply:
        tok, gsa, req = self._iam_common(h, path, headers, body, record, "iam.serviceAccounts.getAccessToken",
                                         "GenerateAccessToken")
        scope = req.get("scope")
        record["scope"] = scope
        if scope is not None and (not isinstance(scope, list) or not all(isinstance(s, str) for s in scope)):
            raise _google_error(400, "INVALID_ARGUMENT",
                                "Invalid JSON payload received. Invalid value at 'scope' (type.googleapis.com/"
                                "google.iam.credentials.v1.GenerateAccessTokenRequest), expected a list of strings.")
        if not scope:
            raise _google_error(400, "INVALID_ARGUMENT", "Scope required.", details=[
                {"@type": "type.googleapis.com/google.rpc.BadRequest",
                 "fieldViolations": [{"field": "scope", "description": "Scope required."}]}])
        lifetime_s = req.get("lifetime")
        record["lifetime"] = lifetime_s
        lifetime = float(_MAX_ACCESS_TOKEN_LIFETIME)
        if lifetime_s is not None:
            lm = _LIFETIME_RE.match(lifetime_s) if isinstance(lifetime_s, str) else None
            if not lm:
                raise _google_error(400, "INVALID_ARGUMENT",
                                    f"Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration), "
                                    f"Field 'lifetime', Illegal duration format; duration must end with 's': "
                                    f"{lifetime_s!r}")
            lifetime = float(lm.group(1) + (lm.group(2) or ""))
            if lifetime <= 0 or lifetime > _MAX_ACCESS_TOKEN_LIFETIME:
                raise _google_error(400, "INVALID_ARGUMENT",
                                    f"The lifetime of the access token must be between 1s and "
                                    f"{_MAX_ACCESS_TOKEN_LIFETIME}s; requested {lifetime_s}.", details=[
                                        {"@type": "type.googleapis.com/google.rpc.BadRequest",
                                         "fieldViolations": [{"field": "lifetime"}]}])
        new = self._issue("ya29.c.", "service_account", "serviceAccount:" + gsa["email"], list(scope), lifetime,
                          email=gsa["email"])
        record["issued_principal"] = new.principal
        record["access_token"] = new.token
        return _Reply(200, {"accessToken": new.token, "expireTime": _rfc3339(new.expires_at)})

    def _generate_id_token(self, h, path, query, headers, body, record) -> _Reply:
        tok, gsa, req = self._iam_common(h, path, headers, body, record, "iam.serviceAccounts.getOpenIdToken",
                                         "GenerateIdToken")
        audience = req.get("audience")
        include_email = req.get("includeEmail", False)
        record["audience"] = audience
        record["include_email"] = include_email
        if not isinstance(audience, str) or not audience:
            raise _google_error(400, "INVALID_ARGUMENT", "Audience required.", details=[
                {"@type": "type.googleapis.com/google.rpc.BadRequest",
                 "fieldViolations": [{"field": "audience", "description": "Audience required."}]}])
        if not isinstance(include_email, bool):
            raise _google_error(400, "INVALID_ARGUMENT",
                                "Invalid JSON payload received. Invalid value at 'include_email' (TYPE_BOOL).")
        now = int(time.time())
        claims: dict[str, Any] = {"aud": audience, "azp": gsa["unique_id"]}
        if include_email:
            claims["email"] = gsa["email"]
            claims["email_verified"] = True
        claims.update({"exp": now + int(self.id_token_lifetime), "iat": now, "iss": self.id_token_issuer,
                       "sub": gsa["unique_id"]})
        token = self.sign_id_token(claims)
        record["claims"] = claims
        return _Reply(200, {"token": token})

    # ------------------------------------------------------------------ OIDC issuer (accounts.google.com)
    def _oidc(self, h, path, query, headers, body, record) -> _Reply:
        cache = {"Cache-Control": "public, max-age=3600, must-revalidate, no-transform"}
        if path == "/oauth2/v3/certs":
            return _Reply(200, self.jwks, headers=cache)
        host = headers.get("host") or f"127.0.0.1:{self.port}"
        return _Reply(200, {
            "issuer": self.id_token_issuer,
            "authorization_endpoint": "https://accounts.google.com/o/oauth2/v2/auth",
            "token_endpoint": "https://oauth2.googleapis.com/token",
            "userinfo_endpoint": "https://openidconnect.googleapis.com/v1/userinfo",
            "revocation_endpoint": "https://oauth2.googleapis.com/revoke",
            "jwks_uri": f"http://{host}/oauth2/v3/certs",
            "response_types_supported": ["code", "token", "id_token", "code token", "code id_token",
                                         "token id_token", "code token id_token", "none"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "email", "profile"],
            "claims_supported": ["aud", "email", "email_verified", "exp", "family_name", "given_name", "iat",
                                 "iss", "name", "picture", "sub"],
        }, headers=cache)

    def _tokeninfo(self, h, path, query, headers, body, record) -> _Reply:
        token = (query.get("access_token") or [""])[0]
        if not token and h.command == "POST":
            token = (urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("access_token") or [""])[0]
        with self._lock:
            t = self._tokens.get(token)
        if t is None or time.time() >= t.expires_at:
            return _Reply(400, {"error": "invalid_token", "error_description": "Invalid Value"})
        record["principal"] = t.principal
        out: dict[str, Any] = {"scope": " ".join(t.scopes), "exp": str(int(t.expires_at)),
                               "expires_in": str(max(0, int(t.expires_at - time.time()))),
                               "principal": t.principal}
        if t.email:
            out.update({"email": t.email, "email_verified": "true"})
        return _Reply(200, out)

    # ------------------------------------------------------------------ Cloud Storage
    def _storage(self, h, path, query, headers, body, record) -> _Reply:
        bucket_name = urllib.parse.unquote(path[len("/storage/v1/b/"):]) if path.startswith("/storage/v1/b/") else None
        if bucket_name is not None and "/" in bucket_name:
            raise _gcs_error(404, "Not Found", "notFound")
        permission = "storage.buckets.get" if bucket_name else "storage.buckets.list"
        raw, tok, problem = self._bearer(headers)
        record["bucket"] = bucket_name
        record["project"] = (query.get("project") or [None])[0]
        if problem == "missing":
            what = "the Google Cloud Storage bucket" if bucket_name else "the Google Cloud project"
            msg = (f"Anonymous caller does not have {permission} access to {what}. Permission '{permission}' "
                   f"denied on resource (or it may not exist).")
            raise _gcs_error(401, msg, "required", "Authorization")
        if problem:
            raise _gcs_error(401, "Invalid Credentials", "authError", "Authorization")
        assert tok is not None
        record["principal"] = tok.principal
        if not _STORAGE_SCOPES.intersection(tok.scopes):
            raise _gcs_error(403, "Provided scope(s) are not authorized", "forbidden")
        who = tok.email or tok.principal
        base = f"http://{headers.get('host') or f'127.0.0.1:{self.port}'}"

        with self._lock:
            buckets = [dict(b) for b in self._buckets.values()]
        readable = [b for b in buckets if any(self._member_matches(m, tok) for m in b["readers"])]

        if bucket_name is not None:
            b = next((b for b in buckets if b["name"] == bucket_name), None)
            if b is None:
                raise _gcs_error(404, "The specified bucket does not exist.", "notFound")
            if b not in readable:
                raise _gcs_error(403, f"{who} does not have storage.buckets.get access to the Google Cloud Storage "
                                      f"bucket. Permission 'storage.buckets.get' denied on resource (or it may not "
                                      f"exist).", "forbidden")
            return _Reply(200, self._bucket_resource(b, base))

        project = record["project"]
        if not project:
            raise _gcs_error(400, "Required parameter: project", "required")
        in_project = sorted((b for b in readable if b["project"] == project), key=lambda b: b["name"])
        if not in_project:
            raise _gcs_error(403, f"{who} does not have storage.buckets.list access to the Google Cloud project. "
                                  f"Permission 'storage.buckets.list' denied on resource (or it may not exist).",
                             "forbidden")
        prefix = (query.get("prefix") or [""])[0]
        in_project = [b for b in in_project if b["name"].startswith(prefix)]
        start = (query.get("pageToken") or [""])[0]
        if start:
            in_project = [b for b in in_project if b["name"] >= start]
        try:
            max_results = int((query.get("maxResults") or ["1000"])[0])
        except ValueError:
            raise _gcs_error(400, "Invalid value for maxResults", "invalid")
        max_results = max(1, min(max_results, 1000))
        page, rest = in_project[:max_results], in_project[max_results:]
        out: dict[str, Any] = {"kind": "storage#buckets"}
        if page:
            out["items"] = [self._bucket_resource(b, base) for b in page]
        if rest:
            out["nextPageToken"] = rest[0]["name"]
        record["returned"] = [b["name"] for b in page]
        return _Reply(200, out)

    @staticmethod
    def _bucket_resource(b: dict, base: str) -> dict:
        ts = _rfc3339_millis(b["created"])
        res = {"kind": "storage#bucket", "selfLink": f"{base}/storage/v1/b/{b['name']}", "id": b["name"],
               "name": b["name"], "metageneration": "1", "location": "US", "storageClass": "STANDARD",
               "etag": "CAE=", "timeCreated": ts, "updated": ts, "locationType": "multi-region", "rpo": "DEFAULT",
               "iamConfiguration": {"bucketPolicyOnly": {"enabled": True},
                                    "uniformBucketLevelAccess": {"enabled": True},
                                    "publicAccessPrevention": "enforced"},
               "generation": b["generation"]}
        if b["project"].isdigit():
            res["projectNumber"] = b["project"]
        return res


# ---------------------------------------------------------------------- AWS XML helpers
def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_find(root: ET.Element, name: str) -> str | None:
    for el in root.iter():
        if _local(el.tag) == name:
            return (el.text or "").strip()
    return None


def _parse_caller_identity(body: bytes) -> dict | None:
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
            res = data["GetCallerIdentityResponse"]["GetCallerIdentityResult"]
            arn, account, userid = res["Arn"], res["Account"], res.get("UserId", "")
        except (ValueError, KeyError, TypeError):
            return None
    else:
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            return None
        arn, account, userid = _xml_find(root, "Arn"), _xml_find(root, "Account"), _xml_find(root, "UserId")
    if not arn or not account:
        return None
    return {"arn": arn, "account": account, "userid": userid or ""}


def _parse_aws_error(body: bytes) -> tuple[str, str]:
    text = body.decode("utf-8", "replace").strip()
    try:
        if text.startswith("{"):
            data = json.loads(text)
            err = data.get("Error", data)
            return str(err.get("Code", "Unknown")), str(err.get("Message", ""))
        root = ET.fromstring(text)
        return _xml_find(root, "Code") or "Unknown", _xml_find(root, "Message") or ""
    except (ValueError, ET.ParseError, AttributeError):
        return "Unknown", text[:200]
