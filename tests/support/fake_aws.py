"""A fake AWS STS endpoint that behaves like the real one on the wire.

It speaks the STS query protocol (form POST or query-string GET, XML replies
in the ``https://sts.amazonaws.com/doc/2011-06-15/`` namespace) for two
actions:

* ``AssumeRoleWithWebIdentity`` (unsigned): validates parameters like the
  service model, verifies the web identity token against the JWKS of an
  IAM-style OIDC provider (fetched over real HTTP), evaluates the role's trust
  policy conditions and mints session credentials.
* ``GetCallerIdentity``: requires a SigV4 signature made with credentials this
  fake issued; the signature is verified here from the AWS SigV4 spec (header
  or presigned query form), using the ``Host`` header as received.

Errors use the real ``ErrorResponse`` shape, codes and HTTP statuses (see
shared/research/exchange.md section 3). Faults (latency, error codes) can be
injected per action.

Usage::

    with FakeAwsSts() as sts:                      # binds 0.0.0.0, random port
        sts.add_oidc_provider(issuer, client_ids=["sts.amazonaws.com"])
        role = sts.add_role("app", provider="127.0.0.1:PORT",
                            conditions={"127.0.0.1:PORT:sub": "system:serviceaccount:ns:sa"})
        boto3.client("sts", endpoint_url=sts.url, region_name="us-east-1", ...)

Interface (beyond the constructor/start/stop/context manager):

* ``url`` (``http://127.0.0.1:PORT``), ``url_for(host_ip)``, ``port``.
* ``add_oidc_provider(issuer_url, client_ids, jwks_url=None, *, ssl_context=None)``
  -> ``arn:aws:iam::ACCT:oidc-provider/<issuer without scheme>``.
  ``"https://accounts.google.com"`` with ``client_ids=[]`` and ``jwks_url`` is
  the built-in Google provider (no client-id check).
* ``add_role(name, *, provider, conditions, max_session_duration=3600)`` ->
  role ARN. Condition keys: ``<provider>:sub``, ``<provider>:aud`` (the token's
  ``azp`` when present, else ``aud``; multi-valued aud matches any),
  ``<provider>:amr``, and for accounts.google.com also ``:oaud`` (= ``aud``).
  Any other key has no value, so a condition on it never holds.
* ``set_fault(action, *, latency=0.0, code=None, status=None, count=None,
  message=None)`` (action may be ``"*"``); ``clear_faults()``.
* ``calls``: one dict per request: ``action, status, code, message, role_arn,
  session_name, subject, duration, access_key_id, signed`` (the request
  carried an Authorization header or X-Amz-Signature), ``client`` (source
  IP), ``request_id``, ``time``. ``calls_for(action)`` filters.
* ``issued``: access key id -> ``secret, session_token, expiration``
  (``YYYY-MM-DDTHH:MM:SSZ``), ``expiration_epoch, arn`` (assumed-role ARN),
  ``role_arn, session_name, assumed_role_id, subject, audience, provider,
  issued_at``. ``identity_of(access_key_id)`` -> assumed-role ARN or None.
* ``expire_credentials(access_key_id)``; ``clock_offset`` (seconds added to the
  fake's clock, for SigV4 skew / token expiry tests); ``now()``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import hashlib
import hmac
import json
import re
import secrets
import ssl
import string
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from xml.sax.saxutils import escape as _xml_escape

import jwt  # PyJWT

STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
API_VERSION = "2011-06-15"
ACTIONS = ("AssumeRoleWithWebIdentity", "GetCallerIdentity")
GOOGLE_PROVIDER = "accounts.google.com"

# Asymmetric algorithms STS accepts for OIDC ID tokens.
SUPPORTED_JWT_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")

# Maximum clock difference between x-amz-date and the server (SigV4).
SIGV4_MAX_SKEW = 15 * 60

# Region names as they appear in a credential scope (us-east-1, us-gov-west-1,
# cn-north-1, eu-central-2, ap-southeast-5, us-isob-east-1, ...).
_REGION_RE = re.compile(r"^[a-z]{2}(-(gov|iso[a-z]?))?-[a-z]+-\d{1,2}$")
_SESSION_NAME_RE = re.compile(r"^[\w+=,.@-]*$", re.ASCII)
_ARN_CHARS_RE = re.compile(
    "^[\u0009\u000a\u000d\u0020-\u007e\u0085\u00a0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]+$"
)
_POLICY_CHARS_RE = re.compile("^[\u0009\u000a\u000d\u0020-\u00ff]+$")
_ROLE_ARN_RE = re.compile(r"^arn:(aws[a-zA-Z-]*):iam::(\d{12}):role/(?:[\w+=,.@-]+/)*([\w+=,.@-]{1,64})$", re.ASCII)
_AMZ_DATE_FMT = "%Y%m%dT%H%M%SZ"

# Messages as AWS words them.
MSG_VERIFICATION_KEY = (
    "Couldn't retrieve verification key from your identity provider,  "
    "please reference AssumeRoleWithWebIdentity documentation for requirements"
)
MSG_NOT_A_JWT = (
    "The ID Token provided is not a valid JWT. (You may see this error if you sent an Access Token)"
)
MSG_ACCESS_DENIED = "Not authorized to perform sts:AssumeRoleWithWebIdentity"
MSG_INVALID_TOKEN_ID = "The security token included in the request is invalid."
MSG_EXPIRED_TOKEN = "The security token included in the request is expired"
MSG_SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
MSG_MISSING_AUTH = "Request is missing Authentication Token"
MSG_DURATION_OVER_ROLE_MAX = (
    "The requested DurationSeconds exceeds the MaxSessionDuration set for this role."
)

# Default status and message for injected faults, by error code.
FAULT_DEFAULTS = {
    "Throttling": (400, "Rate exceeded"),
    "IDPCommunicationError": (
        400,
        "The request could not be fulfilled because the identity provider (IDP) "
        "that was asked to verify the incoming identity token could not be reached.",
    ),
    "IDPRejectedClaim": (403, "The identity provider (IdP) reported that authentication failed."),
    "InvalidIdentityToken": (400, MSG_VERIFICATION_KEY),
    "ExpiredTokenException": (400, "Token expired"),
    "AccessDenied": (403, MSG_ACCESS_DENIED),
    "RegionDisabledException": (
        403,
        "STS is not activated in this region for account:123456789012. "
        "Your account administrator can activate STS in this region using the IAM Console.",
    ),
    "InternalFailure": (
        500,
        "The request processing has failed because of an unknown error, exception or failure.",
    ),
    "ServiceUnavailable": (503, "The request has failed due to a temporary failure of the server."),
    "InvalidClientTokenId": (403, MSG_INVALID_TOKEN_ID),
    "ExpiredToken": (403, MSG_EXPIRED_TOKEN),
    "SignatureDoesNotMatch": (403, MSG_SIGNATURE_MISMATCH),
}


class StsError(Exception):
    """An error answered with the STS ErrorResponse XML."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @property
    def fault_type(self) -> str:
        return "Receiver" if self.status >= 500 else "Sender"


def _validation_error(problems: list[str]) -> StsError:
    n = len(problems)
    noun = "error" if n == 1 else "errors"
    return StsError(400, "ValidationError", f"{n} validation {noun} detected: " + "; ".join(problems))


def _iso8601(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(int(epoch), tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _amz_date(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(int(epoch), tz=_dt.timezone.utc).strftime(_AMZ_DATE_FMT)


def _random_id(prefix: str, n: int) -> str:
    alphabet = string.ascii_uppercase + "234567"  # AWS unique IDs are base32-like
    return prefix + "".join(secrets.choice(alphabet) for _ in range(n))


def _strip_scheme(url: str) -> str:
    for scheme in ("https://", "http://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


def _normalize_provider(provider: str) -> str:
    """IAM names an OIDC provider by its URL without scheme (the ARN suffix)."""
    m = re.match(r"^arn:[^:]+:iam::\d*:oidc-provider/(.+)$", provider)
    if m:
        return m.group(1)
    return _strip_scheme(provider)


def _aws_uri_encode(value: str, safe: str = "-_.~") -> str:
    # SigV4: encode every byte except unreserved characters, uppercase hex.
    return urllib.parse.quote(value, safe=safe)


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 5.2.4, as botocore's normalize_url_path does.
    if not path:
        return "/"
    out: list[str] = []
    for seg in path.split("/"):
        if seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    result = "/".join(out)
    if path.startswith("/") and not result.startswith("/"):
        result = "/" + result
    if path.endswith("/") and not result.endswith("/"):
        result += "/"
    return result or "/"


def _glob_match(pattern: str, value: str) -> bool:
    """IAM StringLike: '*' any run of characters, '?' one character, case-sensitive."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


@dataclass
class _Provider:
    key: str  # issuer without scheme, as IAM stores it
    issuer_url: str
    client_ids: list[str]
    jwks_url: Optional[str]
    arn: str
    ssl_context: Optional[ssl.SSLContext]
    keys: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_google(self) -> bool:
        return self.key == GOOGLE_PROVIDER

    def _get_json(self, url: str) -> Any:
        req = urllib.request.Request(url, headers={"Accept": "application/json"})
        ctx = self.ssl_context if url.startswith("https://") else None
        with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
            if resp.status != 200:
                raise OSError(f"GET {url}: HTTP {resp.status}")
            return json.loads(resp.read().decode("utf-8"))

    def fetch_keys(self) -> list[dict]:
        jwks_url = self.jwks_url
        if jwks_url is None:
            discovery = self._get_json(self.issuer_url.rstrip("/") + "/.well-known/openid-configuration")
            jwks_url = discovery["jwks_uri"]
        jwks = self._get_json(jwks_url)
        keys = jwks["keys"]
        if not isinstance(keys, list):
            raise ValueError("jwks keys is not a list")
        with self.lock:
            self.keys = keys
        return keys

    def keys_for(self, kid: Optional[str]) -> list[dict]:
        """Cached keys matching kid; refetches once when the kid is unknown."""
        with self.lock:
            cached = list(self.keys)

        def pick(keys: list[dict]) -> list[dict]:
            return [k for k in keys if kid is None or k.get("kid") == kid]

        found = pick(cached)
        if found:
            return found
        return pick(self.fetch_keys())


@dataclass
class _Condition:
    operator: str
    key: str
    values: list[str]


@dataclass
class _Role:
    name: str
    arn: str
    role_id: str
    provider: str
    conditions: list[_Condition]
    max_session_duration: int


_OPERATORS = ("StringEquals", "StringLike", "StringNotEquals", "StringNotLike")


def _parse_conditions(conditions: Optional[dict]) -> list[_Condition]:
    if not conditions:
        return []
    if all(k in _OPERATORS for k in conditions):
        blocks = conditions.items()
    elif any(k in _OPERATORS for k in conditions):
        raise ValueError("conditions mixes operator blocks and bare keys")
    else:
        blocks = [("StringEquals", conditions)]
    out = []
    for op, block in blocks:
        if not isinstance(block, dict):
            raise ValueError(f"condition block {op} must be a dict")
        for key, values in block.items():
            if isinstance(values, str):
                values = [values]
            values = list(values)
            if not values or not all(isinstance(v, str) for v in values):
                raise ValueError(f"condition {op} {key}: values must be strings")
            out.append(_Condition(op, key, values))
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    fake: "FakeAwsSts"  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        # Like AWS: a Date header, no Server header.
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        request_id = str(uuid.uuid4())
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        status, payload = self.fake._dispatch(self, body, request_id)
        data = payload.encode("utf-8")
        self.send_response(status)
        self.send_header("x-amzn-RequestId", request_id)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeAwsSts:
    """In-process fake of the AWS STS query API. See the module docstring."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0, account_id: str = "123456789012",
                 region: str = "us-east-1"):
        if not re.fullmatch(r"\d{12}", account_id):
            raise ValueError("account_id must be 12 digits")
        self.host = host
        self.port = port
        self.account_id = account_id
        self.region = region
        self.calls: list[dict] = []
        self.issued: dict[str, dict] = {}
        # Seconds added to the wall clock (tests move time with it).
        self.clock_offset = 0.0
        self._lock = threading.RLock()
        self._providers: dict[str, _Provider] = {}
        self._roles: dict[str, _Role] = {}
        self._faults: dict[str, dict] = {}
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "FakeAwsSts":
        if self._server is not None:
            return self
        handler = type("FakeAwsStsHandler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer((self.host, self.port), handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="fake-aws-sts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeAwsSts":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.url_for("127.0.0.1")

    def url_for(self, host_ip: str) -> str:
        if self._server is None:
            raise RuntimeError("FakeAwsSts is not started")
        host = f"[{host_ip}]" if ":" in host_ip else host_ip
        return f"http://{host}:{self.port}"

    def now(self) -> float:
        return time.time() + self.clock_offset

    # ------------------------------------------------------------ configuration

    def add_oidc_provider(self, issuer_url: str, client_ids: list[str], jwks_url: Optional[str] = None,
                          *, ssl_context: Optional[ssl.SSLContext] = None) -> str:
        """Register an IAM OIDC provider; returns its ARN.

        Keys come from ``<issuer_url>/.well-known/openid-configuration`` ->
        ``jwks_uri``, or from ``jwks_url`` when given, fetched on first use and
        again when a token names an unknown ``kid``. For accounts.google.com
        (built into real AWS) there is no client-id check: the role's
        conditions carry the trust.
        """
        key = _normalize_provider(issuer_url)
        if not key:
            raise ValueError("issuer_url is empty")
        if "://" not in issuer_url:
            issuer_url = "https://" + issuer_url
        arn = f"arn:aws:iam::{self.account_id}:oidc-provider/{key}"
        provider = _Provider(key=key, issuer_url=issuer_url, client_ids=list(client_ids),
                             jwks_url=jwks_url, arn=arn, ssl_context=ssl_context)
        with self._lock:
            self._providers[key] = provider
        return arn

    def add_role(self, name: str, *, provider: str, conditions: Optional[dict] = None,
                 max_session_duration: int = 3600) -> str:
        """Create a role trusting ``provider`` for sts:AssumeRoleWithWebIdentity.

        ``conditions`` is a flat dict (StringEquals) or
        ``{"StringEquals": {...}, "StringLike": {...}}`` (also StringNotEquals,
        StringNotLike); a value may be a list (any of).
        """
        if not re.fullmatch(r"[\w+=,.@-]{1,64}", name, re.ASCII):
            raise ValueError(f"invalid role name {name!r}")
        if not 3600 <= int(max_session_duration) <= 43200:
            raise ValueError("max_session_duration must be 3600..43200 (IAM's limits)")
        role = _Role(
            name=name,
            arn=f"arn:aws:iam::{self.account_id}:role/{name}",
            role_id=_random_id("AROA", 17),
            provider=_normalize_provider(provider),
            conditions=_parse_conditions(conditions),
            max_session_duration=int(max_session_duration),
        )
        with self._lock:
            self._roles[name] = role
        return role.arn

    def set_fault(self, action: str, *, latency: float = 0.0, code: Optional[str] = None,
                  status: Optional[int] = None, count: Optional[int] = None,
                  message: Optional[str] = None) -> None:
        """Inject a fault for ``action`` ("AssumeRoleWithWebIdentity",
        "GetCallerIdentity" or "*"): sleep ``latency`` seconds, then answer the
        error ``code`` (if any) with the real XML shape. ``count`` requests are
        affected (None: until cleared)."""
        if action not in ACTIONS and action != "*":
            raise ValueError(f"unknown action {action!r}")
        if count is not None and count < 1:
            raise ValueError("count must be None or >= 1")
        if code is not None and status is None:
            if code not in FAULT_DEFAULTS:
                raise ValueError(f"no default status for {code!r}; pass status=")
            status = FAULT_DEFAULTS[code][0]
        if code is not None and message is None:
            message = FAULT_DEFAULTS.get(code, (status, code))[1]
        with self._lock:
            self._faults[action] = {"latency": float(latency), "code": code, "status": status,
                                    "message": message, "count": count}

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def identity_of(self, access_key_id: str) -> Optional[str]:
        with self._lock:
            rec = self.issued.get(access_key_id)
            return rec["arn"] if rec else None

    def expire_credentials(self, access_key_id: str) -> None:
        """Make issued credentials expired now (as if their time had passed)."""
        with self._lock:
            rec = self.issued[access_key_id]
            past = self.now() - 1
            rec["expiration_epoch"] = past
            rec["expiration"] = _iso8601(past)

    def calls_for(self, action: str) -> list[dict]:
        with self._lock:
            return [c for c in self.calls if c["action"] == action]

    # ----------------------------------------------------------------- dispatch

    def _take_fault(self, action: str) -> Optional[dict]:
        with self._lock:
            for name in (action, "*"):
                fault = self._faults.get(name)
                if fault is None:
                    continue
                if fault["count"] is not None:
                    fault["count"] -= 1
                    if fault["count"] <= 0:
                        del self._faults[name]
                return dict(fault)
        return None

    def _dispatch(self, handler: _Handler, body: bytes, request_id: str) -> tuple[int, str]:
        split = urllib.parse.urlsplit(handler.path)
        query = split.query
        params: dict[str, str] = {}
        for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
            params.setdefault(k, v)
        ctype = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if handler.command == "POST" and body and ctype in ("application/x-www-form-urlencoded", ""):
            try:
                form = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
            except UnicodeDecodeError:
                form = []
            for k, v in form:
                params.setdefault(k, v)

        action = params.get("Action")
        record: dict[str, Any] = {
            "action": action, "status": None, "code": None, "message": None,
            "role_arn": params.get("RoleArn"), "session_name": params.get("RoleSessionName"),
            "subject": None, "duration": None, "access_key_id": None,
            "signed": bool(handler.headers.get("Authorization") or "X-Amz-Signature" in params),
            "client": handler.client_address[0], "request_id": request_id, "time": self.now(),
        }
        try:
            if handler.command not in ("GET", "POST"):
                raise StsError(405, "MethodNotAllowed", f"The HTTP method {handler.command} is not allowed")
            if action is None:
                raise StsError(400, "MissingAction", "Missing Action")
            version = params.get("Version")
            if action not in ACTIONS or version != API_VERSION:
                raise StsError(400, "InvalidAction",
                               f"Could not find operation {action} for version {version or 'NO_VERSION_SPECIFIED'}")
            fault = self._take_fault(action)
            if fault is not None:
                if fault["latency"] > 0:
                    time.sleep(fault["latency"])
                if fault["code"] is not None:
                    raise StsError(fault["status"], fault["code"], fault["message"])
            if action == "AssumeRoleWithWebIdentity":
                xml = self._assume_role_with_web_identity(params, request_id, record)
            else:
                xml = self._get_caller_identity(handler, split, body, params, request_id, record)
            record["status"] = 200
            status = 200
        except StsError as e:
            record.update(status=e.status, code=e.code, message=e.message)
            status, xml = e.status, self._error_xml(e, request_id)
        except Exception as e:  # a bug in the fake: still answer like AWS would
            err = StsError(500, "InternalFailure", f"{type(e).__name__}: {e}")
            record.update(status=500, code=err.code, message=err.message)
            status, xml = 500, self._error_xml(err, request_id)
        with self._lock:
            self.calls.append(record)
        return status, xml

    @staticmethod
    def _error_xml(err: StsError, request_id: str) -> str:
        return (
            f'<ErrorResponse xmlns="{STS_NAMESPACE}">\n'
            "  <Error>\n"
            f"    <Type>{err.fault_type}</Type>\n"
            f"    <Code>{_xml_escape(err.code)}</Code>\n"
            f"    <Message>{_xml_escape(err.message)}</Message>\n"
            "  </Error>\n"
            f"  <RequestId>{request_id}</RequestId>\n"
            "</ErrorResponse>\n"
        )

    # ------------------------------------------------ AssumeRoleWithWebIdentity

    def _validate_awrwi(self, params: dict[str, str]) -> tuple[int, Optional[str], list[str]]:
        problems: list[str] = []

        def length(member: str, value: str, lo: int, hi: int, sensitive: bool = False) -> bool:
            shown = "Value" if sensitive else f"Value '{value}'"
            if len(value) < lo:
                problems.append(f"{shown} at '{member}' failed to satisfy constraint: "
                                f"Member must have length greater than or equal to {lo}")
                return False
            if len(value) > hi:
                problems.append(f"{shown} at '{member}' failed to satisfy constraint: "
                                f"Member must have length less than or equal to {hi}")
                return False
            return True

        def pattern(member: str, value: str, regex: re.Pattern, text: str) -> None:
            if not regex.match(value):
                problems.append(f"Value '{value}' at '{member}' failed to satisfy constraint: "
                                f"Member must satisfy regular expression pattern: {text}")

        for member, pname in (("roleArn", "RoleArn"), ("roleSessionName", "RoleSessionName"),
                              ("webIdentityToken", "WebIdentityToken")):
            if pname not in params:
                problems.append(f"Value null at '{member}' failed to satisfy constraint: Member must not be null")

        role_arn = params.get("RoleArn")
        if role_arn is not None and length("roleArn", role_arn, 20, 2048):
            pattern("roleArn", role_arn, _ARN_CHARS_RE,
                    "[\\u0009\\u000A\\u000D\\u0020-\\u007E\\u0085\\u00A0-\\uD7FF\\uE000-\\uFFFD\\u10000-\\u10FFFF]+")
        session = params.get("RoleSessionName")
        if session is not None:
            pattern("roleSessionName", session, _SESSION_NAME_RE, "[\\w+=,.@-]*")
            length("roleSessionName", session, 2, 64)
        token = params.get("WebIdentityToken")
        if token is not None:
            length("webIdentityToken", token, 4, 20000, sensitive=True)
        if "ProviderId" in params:
            length("providerId", params["ProviderId"], 4, 2048)
        policy = params.get("Policy")
        if policy is not None and length("policy", policy, 1, 2048):
            pattern("policy", policy, _POLICY_CHARS_RE, "[\\u0009\\u000A\\u000D\\u0020-\\u00FF]+")
        policy_arns = []
        i = 1
        while f"PolicyArns.member.{i}.arn" in params:
            arn = params[f"PolicyArns.member.{i}.arn"]
            length(f"policyArns.{i}.member.arn", arn, 20, 2048)
            policy_arns.append(arn)
            i += 1
        duration = 3600
        raw = params.get("DurationSeconds")
        if raw is not None:
            try:
                duration = int(raw)
            except ValueError:
                problems.append(f"Value '{raw}' at 'durationSeconds' failed to satisfy constraint: "
                                "Member must be a valid integer")
            else:
                if duration < 900:
                    problems.append(f"Value '{duration}' at 'durationSeconds' failed to satisfy constraint: "
                                    "Member must have value greater than or equal to 900")
                elif duration > 43200:
                    problems.append(f"Value '{duration}' at 'durationSeconds' failed to satisfy constraint: "
                                    "Member must have value less than or equal to 43200")
        if problems:
            raise _validation_error(problems)
        return duration, policy, policy_arns

    def _verify_token(self, token: str) -> tuple[_Provider, dict]:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise StsError(400, "InvalidIdentityToken", MSG_NOT_A_JWT)
        if not isinstance(claims, dict):
            raise StsError(400, "InvalidIdentityToken", MSG_NOT_A_JWT)
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise StsError(400, "InvalidIdentityToken", MSG_NOT_A_JWT)
        with self._lock:
            provider = self._providers.get(_strip_scheme(iss))
        if provider is None:
            raise StsError(400, "InvalidIdentityToken", f"No OpenIDConnect provider found in your account for {iss}")

        alg = header.get("alg")
        if alg not in SUPPORTED_JWT_ALGS:
            raise StsError(400, "InvalidIdentityToken",
                           f"Unsupported token signing algorithm {alg}. "
                           f"Supported algorithms are: {', '.join(SUPPORTED_JWT_ALGS)}")
        kid = header.get("kid")
        try:
            keys = provider.keys_for(kid if isinstance(kid, str) else None)
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError):
            raise StsError(400, "InvalidIdentityToken", MSG_VERIFICATION_KEY)
        if not keys:
            raise StsError(400, "InvalidIdentityToken", MSG_VERIFICATION_KEY)
        verified = False
        for jwk in keys:
            try:
                key = jwt.PyJWK(jwk, algorithm=alg).key
                jwt.api_jws.decode(token, key=key, algorithms=[alg])
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue
            verified = True
            break
        if not verified:
            raise StsError(400, "InvalidIdentityToken", "Couldn't verify the signature of the token using the keys "
                           "published by your identity provider")

        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise StsError(400, "InvalidIdentityToken", MSG_NOT_A_JWT)
        now = int(self.now())
        if now >= int(exp):
            raise StsError(400, "ExpiredTokenException",
                           f"Token expired: current date/time {now} must be before the expiration date/time {int(exp)}")
        return provider, claims

    @staticmethod
    def _audiences(claims: dict) -> list[str]:
        """Value(s) of the '<provider>:aud' key: azp when present, else aud."""
        azp = claims.get("azp")
        if isinstance(azp, str) and azp:
            return [azp]
        aud = claims.get("aud")
        if isinstance(aud, str):
            return [aud]
        if isinstance(aud, list):
            return [a for a in aud if isinstance(a, str)]
        return []

    def _context_keys(self, provider: _Provider, claims: dict, audiences: list[str]) -> dict[str, list[str]]:
        ctx: dict[str, list[str]] = {}
        p = provider.key
        ctx[f"{p}:aud"] = audiences
        sub = claims.get("sub")
        if isinstance(sub, str):
            ctx[f"{p}:sub"] = [sub]
        if provider.is_google:
            aud = claims.get("aud")
            ctx[f"{p}:oaud"] = [aud] if isinstance(aud, str) else [a for a in (aud or []) if isinstance(a, str)]
        amr = claims.get("amr")
        if isinstance(amr, list):
            ctx[f"{p}:amr"] = [a for a in amr if isinstance(a, str)]
        return ctx

    @staticmethod
    def _condition_holds(cond: _Condition, ctx: dict[str, list[str]]) -> bool:
        present = ctx.get(cond.key)
        if cond.operator in ("StringEquals", "StringLike"):
            if not present:
                return False
            match = (lambda pat, v: pat == v) if cond.operator == "StringEquals" else _glob_match
            return any(match(p, v) for v in present for p in cond.values)
        # Negated operators hold when the key is absent (IAM semantics).
        if not present:
            return True
        match = (lambda pat, v: pat == v) if cond.operator == "StringNotEquals" else _glob_match
        return not any(match(p, v) for v in present for p in cond.values)

    def _assume_role_with_web_identity(self, params: dict[str, str], request_id: str, record: dict) -> str:
        duration, policy, policy_arns = self._validate_awrwi(params)
        record["duration"] = duration
        role_arn = params["RoleArn"]
        session_name = params["RoleSessionName"]
        m = _ROLE_ARN_RE.match(role_arn)
        if not m:
            raise StsError(400, "ValidationError", "Request ARN is invalid")

        provider, claims = self._verify_token(params["WebIdentityToken"])
        sub = claims.get("sub") if isinstance(claims.get("sub"), str) else None
        record["subject"] = sub
        audiences = self._audiences(claims)
        if provider.is_google:
            audience = audiences[0] if audiences else None
        else:
            matched = [a for a in audiences if a in provider.client_ids]
            if not matched:
                raise StsError(400, "InvalidIdentityToken", "Incorrect token audience")
            audience = matched[0]

        with self._lock:
            role = self._roles.get(m.group(3))
        if (role is None or role.arn != role_arn or role.provider != provider.key
                or not all(self._condition_holds(c, self._context_keys(provider, claims, audiences))
                           for c in role.conditions)):
            raise StsError(403, "AccessDenied", MSG_ACCESS_DENIED)
        if duration > role.max_session_duration:
            raise StsError(400, "ValidationError", MSG_DURATION_OVER_ROLE_MAX)

        packed = None
        if policy is not None:
            try:
                doc = json.loads(policy)
                if not isinstance(doc, dict):
                    raise ValueError
            except ValueError:
                raise StsError(400, "MalformedPolicyDocument", "The policy is not in the valid JSON format.")
            compact = json.dumps(doc, separators=(",", ":"))
            packed = len(compact) * 100 // 2048 + 1
        if policy_arns:
            packed = (packed or 0) + 2 * len(policy_arns)
        if packed is not None and packed > 100:
            raise StsError(400, "PackedPolicyTooLarge",
                           f"Packed policy consumes {packed}% of allotted space, please use smaller policy.")

        now = self.now()
        access_key_id = _random_id("ASIA", 16)
        secret = "".join(secrets.choice(string.ascii_letters + string.digits + "+/") for _ in range(40))
        session_token = "IQoJb3JpZ2luX2Vj" + base64.b64encode(secrets.token_bytes(640)).decode()
        expiration = now + duration
        assumed_arn = f"arn:aws:sts::{self.account_id}:assumed-role/{role.name}/{session_name}"
        assumed_id = f"{role.role_id}:{session_name}"
        provider_name = GOOGLE_PROVIDER if provider.is_google else provider.arn
        with self._lock:
            self.issued[access_key_id] = {
                "secret": secret, "session_token": session_token, "expiration": _iso8601(expiration),
                "expiration_epoch": float(int(expiration)), "arn": assumed_arn, "role_arn": role.arn,
                "session_name": session_name, "assumed_role_id": assumed_id, "subject": sub,
                "audience": audience, "provider": provider_name, "issued_at": now,
            }
        record["access_key_id"] = access_key_id

        parts = [
            f'<AssumeRoleWithWebIdentityResponse xmlns="{STS_NAMESPACE}">',
            "  <AssumeRoleWithWebIdentityResult>",
            "    <Credentials>",
            f"      <AccessKeyId>{access_key_id}</AccessKeyId>",
            f"      <SecretAccessKey>{_xml_escape(secret)}</SecretAccessKey>",
            f"      <SessionToken>{_xml_escape(session_token)}</SessionToken>",
            f"      <Expiration>{_iso8601(expiration)}</Expiration>",
            "    </Credentials>",
        ]
        if sub is not None:
            parts.append(f"    <SubjectFromWebIdentityToken>{_xml_escape(sub)}</SubjectFromWebIdentityToken>")
        parts += [
            "    <AssumedRoleUser>",
            f"      <Arn>{_xml_escape(assumed_arn)}</Arn>",
            f"      <AssumedRoleId>{_xml_escape(assumed_id)}</AssumedRoleId>",
            "    </AssumedRoleUser>",
        ]
        if packed is not None:
            parts.append(f"    <PackedPolicySize>{packed}</PackedPolicySize>")
        parts.append(f"    <Provider>{_xml_escape(provider_name)}</Provider>")
        if audience is not None:
            parts.append(f"    <Audience>{_xml_escape(audience)}</Audience>")
        parts += [
            "  </AssumeRoleWithWebIdentityResult>",
            "  <ResponseMetadata>",
            f"    <RequestId>{request_id}</RequestId>",
            "  </ResponseMetadata>",
            "</AssumeRoleWithWebIdentityResponse>",
            "",
        ]
        return "\n".join(parts)

    # ------------------------------------------------------- GetCallerIdentity

    def _get_caller_identity(self, handler: _Handler, split: urllib.parse.SplitResult, body: bytes,
                             params: dict[str, str], request_id: str, record: dict) -> str:
        access_key_id = self._verify_sigv4(handler, split, body, record)
        with self._lock:
            rec = dict(self.issued[access_key_id])
        record.update(role_arn=rec["role_arn"], session_name=rec["session_name"], subject=rec["subject"])
        return (
            f'<GetCallerIdentityResponse xmlns="{STS_NAMESPACE}">\n'
            "  <GetCallerIdentityResult>\n"
            f"    <Arn>{_xml_escape(rec['arn'])}</Arn>\n"
            f"    <UserId>{_xml_escape(rec['assumed_role_id'])}</UserId>\n"
            f"    <Account>{self.account_id}</Account>\n"
            "  </GetCallerIdentityResult>\n"
            "  <ResponseMetadata>\n"
            f"    <RequestId>{request_id}</RequestId>\n"
            "  </ResponseMetadata>\n"
            "</GetCallerIdentityResponse>\n"
        )

    def _verify_sigv4(self, handler: _Handler, split: urllib.parse.SplitResult, body: bytes,
                      record: dict) -> str:
        """Verify an AWS4-HMAC-SHA256 signature; returns the access key id."""
        headers = handler.headers
        raw_pairs = [p.partition("=") for p in split.query.split("&") if p] if split.query else []
        query = [(urllib.parse.unquote(k), urllib.parse.unquote(v)) for k, _, v in raw_pairs]
        qdict: dict[str, str] = {}
        for k, v in query:
            qdict.setdefault(k, v)

        authorization = headers.get("Authorization")
        presigned = authorization is None and ("X-Amz-Signature" in qdict or "X-Amz-Algorithm" in qdict)
        if authorization is None and not presigned:
            raise StsError(403, "MissingAuthenticationToken", MSG_MISSING_AUTH)

        if presigned:
            missing = [n for n in ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature",
                                   "X-Amz-SignedHeaders", "X-Amz-Date") if n not in qdict]
            if missing:
                raise StsError(400, "IncompleteSignature",
                               " ".join(f"AWS query-string parameters must include '{n}'." for n in missing)
                               + " Re-examine the query-string parameters.")
            if qdict["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
                raise StsError(400, "IncompleteSignature", f"Unsupported AWS 'algorithm': '{qdict['X-Amz-Algorithm']}'")
            credential = qdict["X-Amz-Credential"]
            signed_headers = qdict["X-Amz-SignedHeaders"]
            signature = qdict["X-Amz-Signature"]
            amz_date = qdict["X-Amz-Date"]
            session_token = qdict.get("X-Amz-Security-Token")
        else:
            if not authorization.startswith("AWS4-HMAC-SHA256 "):
                raise StsError(400, "IncompleteSignature",
                               f"Unsupported AWS 'algorithm': '{authorization.split(' ', 1)[0]}'")
            fields: dict[str, str] = {}
            for part in authorization[len("AWS4-HMAC-SHA256 "):].split(","):
                name, eq, value = part.strip().partition("=")
                if eq:
                    fields[name] = value
            problems = [f"Authorization header requires '{n}' parameter."
                        for n in ("Credential", "Signature", "SignedHeaders") if n not in fields]
            amz_date = headers.get("X-Amz-Date")
            if amz_date is None and headers.get("Date"):
                try:
                    parsed = email.utils.parsedate_to_datetime(headers["Date"])
                    amz_date = parsed.astimezone(_dt.timezone.utc).strftime(_AMZ_DATE_FMT)
                except (TypeError, ValueError):
                    amz_date = headers["Date"]
            if amz_date is None:
                problems.append("Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.")
            if problems:
                raise StsError(400, "IncompleteSignature", " ".join(problems) + f" Authorization={authorization}")
            credential = fields["Credential"]
            signed_headers = fields["SignedHeaders"]
            signature = fields["Signature"]
            session_token = headers.get("X-Amz-Security-Token")

        # Time window (15 minutes either way).
        try:
            signed_at = _dt.datetime.strptime(amz_date, _AMZ_DATE_FMT).replace(tzinfo=_dt.timezone.utc).timestamp()
        except ValueError:
            raise StsError(400, "IncompleteSignature", f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'.")
        now = self.now()
        if signed_at < now - SIGV4_MAX_SKEW:
            raise StsError(403, "SignatureDoesNotMatch",
                           f"Signature expired: {amz_date} is now earlier than {_amz_date(now - SIGV4_MAX_SKEW)} "
                           f"({_amz_date(now)} - 15 min.)")
        if signed_at > now + SIGV4_MAX_SKEW:
            raise StsError(403, "SignatureDoesNotMatch",
                           f"Signature not yet current: {amz_date} is still later than "
                           f"{_amz_date(now + SIGV4_MAX_SKEW)} ({_amz_date(now)} + 15 min.)")

        # Credential scope: AKID/yyyymmdd/region/sts/aws4_request
        scope = credential.split("/")
        if len(scope) != 5:
            raise StsError(400, "IncompleteSignature",
                           f"Credential should be scoped to a valid region, not '{credential}'. ")
        access_key_id, scope_date, scope_region, scope_service, terminator = scope
        if scope_date != amz_date[:8]:
            raise StsError(403, "SignatureDoesNotMatch",
                           "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from "
                           f"HTTP: '{scope_date}' != '{amz_date[:8]}', from '{amz_date}'.")
        if not _REGION_RE.match(scope_region):
            raise StsError(403, "SignatureDoesNotMatch",
                           f"Credential should be scoped to a valid region, not '{scope_region}'. ")
        if scope_service != "sts":
            raise StsError(403, "SignatureDoesNotMatch",
                           "Credential should be scoped to correct service: 'sts'. ")
        if terminator != "aws4_request":
            raise StsError(403, "SignatureDoesNotMatch",
                           f"Credential should be scoped with a valid terminator: 'aws4_request', not '{terminator}'. ")

        record["access_key_id"] = access_key_id
        with self._lock:
            rec = self.issued.get(access_key_id)
            rec = dict(rec) if rec else None
        if rec is None or session_token is None or not hmac.compare_digest(
                session_token.encode(), rec["session_token"].encode()):
            raise StsError(403, "InvalidClientTokenId", MSG_INVALID_TOKEN_ID)
        if now >= rec["expiration_epoch"]:
            raise StsError(403, "ExpiredToken", MSG_EXPIRED_TOKEN)

        names = [h for h in signed_headers.split(";") if h]
        if "host" not in names:
            raise StsError(400, "IncompleteSignature",
                           "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")

        # Canonical request.
        canonical_uri = _aws_uri_encode(_remove_dot_segments(split.path or "/"), safe="/~")
        cq_pairs = sorted((_aws_uri_encode(k), _aws_uri_encode(v)) for k, v in query
                          if not (presigned and k == "X-Amz-Signature"))
        canonical_query = "&".join(f"{k}={v}" for k, v in cq_pairs)
        canonical_headers = ""
        for name in names:
            values = headers.get_all(name) or []
            canonical_headers += f"{name}:{','.join(' '.join(v.split()) for v in values)}\n"
        payload_hash = headers.get("X-Amz-Content-SHA256") or hashlib.sha256(body).hexdigest()
        canonical_request = "\n".join([handler.command, canonical_uri, canonical_query, canonical_headers,
                                       signed_headers, payload_hash])
        credential_scope = f"{scope_date}/{scope_region}/{scope_service}/{terminator}"
        string_to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, credential_scope,
                                    hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()])

        def sign(key: bytes, msg: str) -> bytes:
            return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()

        k = sign(("AWS4" + rec["secret"]).encode("utf-8"), scope_date)
        k = sign(k, scope_region)
        k = sign(k, scope_service)
        k = sign(k, terminator)
        expected = hmac.new(k, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise StsError(403, "SignatureDoesNotMatch", MSG_SIGNATURE_MISMATCH)
        return access_key_id


__all__ = ["FakeAwsSts", "StsError", "STS_NAMESPACE", "API_VERSION"]
