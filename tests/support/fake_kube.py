"""An in-process fake kube-apiserver for metabridge's tests.

A stdlib ``ThreadingHTTPServer`` (HTTP/1.1, daemon threads): ``Content-Length``
on ordinary responses, ``Transfer-Encoding: chunked`` newline-delimited JSON
for watch streams.  It serves what metabridge's kube-rs client uses, the way
the real apiserver does:

* ``GET /api/v1/{pods,serviceaccounts,nodes}`` (cluster-wide list/watch),
  ``GET /api/v1/namespaces/{ns}/{pods,serviceaccounts}`` (namespaced list/watch),
  ``GET /api/v1/namespaces/{ns}/{pods,serviceaccounts}/{name}``,
  ``GET /api/v1/nodes/{name}``;
* ``POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token`` (TokenRequest,
  ``pkg/registry/core/serviceaccount/storage/token.go``);
* ``GET /.well-known/openid-configuration`` and ``GET /openid/v1/jwks``
  (anonymous, as with a ``system:service-account-issuer-discovery`` binding
  for ``system:unauthenticated``); ``/version``, ``/healthz``, ``/livez``,
  ``/readyz`` (anonymous too, ``system:public-info-viewer``), ``/api``,
  ``/api/v1``, ``/apis``.

Fidelity notes (sources: kubernetes ``staging/src/k8s.io/apiserver`` handlers,
``apimachinery`` errors/field/validation, the watch cache ``cacheWatcher``, and
``pkg/apis/core/v1/conversion.go`` / ``pkg/registry/core/pod/strategy.go``):

* One global resourceVersion counter (a string on the wire).  Lists carry
  ``metadata.resourceVersion``; items inside a List omit ``kind``/``apiVersion``.
* ``limit``/``continue``: pages are a consistent snapshot at the first page's
  resourceVersion (the token is base64 JSON ``{"v","rv","start"}`` like etcd3's).
  A token older than the compaction point answers 410 Expired.
* ``resourceVersion``/``resourceVersionMatch`` on lists: ``""`` = most recent,
  ``"0"`` = any, ``N`` + ``NotOlderThan`` = current state (a future ``N`` waits
  ``too_large_rv_wait`` seconds then 504 "Too large resource version"),
  ``N`` + ``Exact`` (or legacy ``N`` + ``limit`` without a match) = the snapshot
  at ``N``; older than the compaction point → 410.  ``ListOptions`` validation
  (422) follows ``ValidateListOptions``.
* Field selectors: the real per-kind field-label conversion and error strings —
  pods ``field label not supported: X``; serviceaccounts (no registered
  conversion) ``"X" is not a known field selector: only "metadata.name",
  "metadata.namespace"``; nodes ``metadata.name`` and ``spec.unschedulable``
  only (``metadata.namespace`` is *rejected* for Nodes by the real server).
  ``status.podIP`` is the first pod IP only.  Operators ``=``, ``==``, ``!=``;
  comma = AND; backslash escapes.
* Watch: from ``resourceVersion`` N (events with RV > N), or ``""``/``"0"``
  → synthetic ADDED for the current state first; ``sendInitialEvents=true``
  (WatchList) → ADDED for the current state then a BOOKMARK annotated
  ``k8s.io/initial-events-end: "true"``.  N older than the compaction point → a
  single ``ERROR`` event (410 Expired, ``too old resource version: N (C)``)
  then the stream ends.  Selectors apply per watcher with the cacheWatcher's
  rule: an object that starts matching → ADDED, stops matching → DELETED (old
  content, new RV).  ``allowWatchBookmarks=true`` → ``BOOKMARK`` every
  ``bookmark_interval`` seconds (the real one is ~1 min; tests want it fast)
  and one right before a ``timeoutSeconds`` close.
* Auth: ``Authorization: Bearer <bearer_token>``; a wrong token is 401 on every
  path; no credentials is 401 except on the anonymous paths above (the
  ``AnonymousAuthConfigurableEndpoints`` model).
* ``Accept: application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1``
  (kube-rs ``metadata_watcher``) returns metadata-only objects.

Known simplifications: no writes through the API other than TokenRequest
(``POST/PUT/PATCH/DELETE`` elsewhere → 405); no Secrets are stored, so a
Secret-bound TokenRequest answers 404; ``/api/v1/watch/...`` legacy paths and
protobuf are not served.

Never derived from matheuscscp/gke-metadata-server (AGPL).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import json
import queue
import random
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import jwt  # PyJWT
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["FakeKube", "ApiError"]

# Kubernetes version the fake claims to be (``/version``).
_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.3",
    "gitCommit": "32cc146f75aad04beaaa245a7157eb35063a9f99",
    "gitTreeState": "clean",
    "buildDate": "2025-03-11T19:52:21Z",
    "goVersion": "go1.23.6",
    "compiler": "gc",
    "platform": "linux/amd64",
}

# Paths an anonymous request may reach.
_ANONYMOUS_PATHS = frozenset(
    {"/.well-known/openid-configuration", "/openid/v1/jwks", "/version", "/healthz", "/livez", "/readyz"}
)

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

_MIN_TOKEN_SECONDS = 10 * 60
_MAX_TOKEN_SECONDS = 1 << 32
_DEFAULT_TOKEN_SECONDS = 60 * 60
_INITIAL_EVENTS_END = "k8s.io/initial-events-end"
_META_MIME = "as=partialobjectmetadata"


# ---------------------------------------------------------------------------
# time / encoding helpers


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64url_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------
# apimachinery-style errors


class ApiError(Exception):
    """A ``metav1.Status`` failure (``k8s.io/apimachinery/pkg/api/errors``)."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: Optional[str] = None,
        details: Optional[dict] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason if reason is not None else _REASONS.get(code, "Unknown")
        self.details = details
        self.headers = headers or {}

    def status(self) -> dict:
        s: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
        }
        if self.reason:
            s["reason"] = self.reason
        if self.details is not None:
            s["details"] = self.details
        s["code"] = self.code
        return s


def _details(name: str = "", group: str = "", kind: str = "", causes=None, retry_after=None) -> dict:
    # metav1.StatusDetails field order, empty fields omitted (omitempty).
    d: dict[str, Any] = {}
    if name:
        d["name"] = name
    if group:
        d["group"] = group
    if kind:
        d["kind"] = kind
    if causes:
        d["causes"] = causes
    if retry_after:
        d["retryAfterSeconds"] = retry_after
    return d


def _not_found(resource: str, name: str, group: str = "") -> ApiError:
    qualified = f"{resource}.{group}" if group else resource
    return ApiError(404, f'{qualified} "{name}" not found', details=_details(name=name, group=group, kind=resource))


def _bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def _expired(message: str) -> ApiError:
    # errors.NewResourceExpired: no details.
    return ApiError(410, message)


def _too_large_rv(wanted: int, current: int) -> ApiError:
    # storage.NewTooLargeResourceVersionError → errors.NewTimeoutError.
    return ApiError(
        504,
        f"Timeout: Too large resource version: {wanted}, current: {current}",
        details={
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        },
    )


class _FieldError:
    """``k8s.io/apimachinery/pkg/util/validation/field.Error``."""

    _TYPES = {
        "invalid": ("Invalid value", "FieldValueInvalid"),
        "forbidden": ("Forbidden", "FieldValueForbidden"),
        "notsupported": ("Unsupported value", "FieldValueNotSupported"),
    }

    def __init__(self, kind: str, field: str, value: Any, detail: str):
        self.kind, self.field, self.value, self.detail = kind, field, value, detail

    def body(self) -> str:
        type_str = self._TYPES[self.kind][0]
        if self.kind == "forbidden":
            s = type_str
        elif isinstance(self.value, bool):
            s = f"{type_str}: {'true' if self.value else 'false'}"
        elif isinstance(self.value, (int, float)):
            s = f"{type_str}: {self.value}"
        elif isinstance(self.value, str):
            s = f"{type_str}: {json.dumps(self.value)}"
        elif self.value is None:
            s = f"{type_str}: null"
        else:
            s = f"{type_str}: {self.value!r}"
        if self.detail:
            s += f": {self.detail}"
        return s

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"

    def cause(self) -> dict:
        return {"reason": self._TYPES[self.kind][1], "message": self.body(), "field": self.field}


def _invalid(kind: str, group: str, name: str, errs: list[_FieldError]) -> ApiError:
    """errors.NewInvalid."""
    qualified = f"{kind}.{group}" if group else kind
    agg = str(errs[0]) if len(errs) == 1 else "[" + ", ".join(str(e) for e in errs) + "]"
    return ApiError(
        422,
        f'{qualified} "{name}" is invalid: {agg}',
        details=_details(name=name, group=group, kind=kind, causes=[e.cause() for e in errs]),
    )


def _not_supported_detail(values: list[str]) -> str:
    return "supported values: " + ", ".join(json.dumps(v) for v in values)


# ---------------------------------------------------------------------------
# selectors


def _split_unescaped(s: str, sep: str) -> list[str]:
    """Split on ``sep`` not preceded by a backslash escape (fields.splitTerms)."""
    out, cur, escaped = [], [], False
    for ch in s:
        if escaped:
            cur.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if escaped:
        cur.append("\\")
    out.append("".join(cur))
    return out


def _unescape_field_value(v: str) -> str:
    out, i = [], 0
    while i < len(v):
        if v[i] == "\\" and i + 1 < len(v) and v[i + 1] in "\\,=!":
            out.append(v[i + 1])
            i += 2
        elif v[i] == "\\":
            raise _bad_request(f"invalid field selector value: {v!r}: unescaped backslash")
        else:
            out.append(v[i])
            i += 1
    return "".join(out)


def _parse_field_selector(raw: str) -> list[tuple[str, str, str]]:
    """fields.ParseSelector: list of (field, op, value) with op in {"=", "!="}."""
    if raw == "":
        return []
    terms = []
    for term in _split_unescaped(raw, ","):
        if term == "":
            continue
        # Find the first unescaped operator ("!=", "==", "=" in that order at each index).
        i, found = 0, None
        while i < len(term):
            if term[i] == "\\":
                i += 2
                continue
            for op in ("!=", "==", "="):
                if term.startswith(op, i):
                    found = (term[:i], op, term[i + len(op):])
                    break
            if found:
                break
            i += 1
        if not found:
            raise _bad_request(f"invalid selector: '{raw}'; can't understand '{term}'")
        field, op, value = found
        terms.append((field, "!=" if op == "!=" else "=", _unescape_field_value(value)))
    return terms


def _parse_label_selector(raw: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """A practical subset of labels.Parse: =, ==, !=, in, notin, exists, !exists."""
    if raw.strip() == "":
        return []
    parts, depth, cur = [], 0, []
    for ch in raw:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    reqs = []
    for p in parts:
        p = p.strip()
        if not p:
            raise _bad_request(f"unable to parse requirement: found '', expected: identifier in {raw!r}")
        lowered = p.replace("\t", " ")
        if " notin " in lowered or " in " in lowered:
            op = "notin" if " notin " in lowered else "in"
            key, _, rest = lowered.partition(f" {op} ")
            rest = rest.strip()
            if not (rest.startswith("(") and rest.endswith(")")):
                raise _bad_request(f"unable to parse requirement: found '{rest}', expected: '('")
            values = tuple(v.strip() for v in rest[1:-1].split(",") if v.strip())
            reqs.append((key.strip(), op, values))
        elif "!=" in p:
            key, _, value = p.partition("!=")
            reqs.append((key.strip(), "!=", (value.strip(),)))
        elif "==" in p:
            key, _, value = p.partition("==")
            reqs.append((key.strip(), "=", (value.strip(),)))
        elif "=" in p:
            key, _, value = p.partition("=")
            reqs.append((key.strip(), "=", (value.strip(),)))
        elif p.startswith("!"):
            reqs.append((p[1:].strip(), "!exists", ()))
        else:
            reqs.append((p, "exists", ()))
    for key, _, _ in reqs:
        if not key or any(c in key for c in " ()!=,"):
            raise _bad_request(f"unable to parse requirement: invalid label key {key!r}")
    return reqs


def _labels_match(reqs, labels: dict) -> bool:
    for key, op, values in reqs:
        present = key in labels
        val = labels.get(key)
        if op == "=" and not (present and val == values[0]):
            return False
        if op == "!=" and present and val == values[0]:
            return False
        if op == "in" and not (present and val in values):
            return False
        if op == "notin" and present and val in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
    return True


# ---------------------------------------------------------------------------
# resources


def _pod_fields(obj: dict) -> dict:
    """pod.ToSelectableFields (pkg/registry/core/pod/strategy.go)."""
    spec, status, meta = obj.get("spec", {}), obj.get("status", {}), obj["metadata"]
    pod_ips = status.get("podIPs") or []
    return {
        "metadata.name": meta["name"],
        "metadata.namespace": meta.get("namespace", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.restartPolicy": spec.get("restartPolicy", ""),
        "spec.schedulerName": spec.get("schedulerName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "spec.hostNetwork": "true" if spec.get("hostNetwork") else "false",
        "status.phase": status.get("phase", ""),
        # NB: only the first IP is selectable, exactly like the real server.
        "status.podIP": pod_ips[0]["ip"] if pod_ips else "",
        "status.nominatedNodeName": status.get("nominatedNodeName", ""),
    }


def _pod_field_label(label: str) -> str:
    """Field-label conversion for v1 Pod (pkg/apis/core/v1/conversion.go)."""
    if label in (
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.podIPs",  # accepted by the conversion, never in the field set
        "status.nominatedNodeName",
    ):
        return label
    if label == "spec.host":  # backwards compatibility alias
        return "spec.nodeName"
    raise _bad_request(f"field label not supported: {label}")


def _node_fields(obj: dict) -> dict:
    return {
        "metadata.name": obj["metadata"]["name"],
        "spec.unschedulable": "true" if obj.get("spec", {}).get("unschedulable") else "false",
    }


def _node_field_label(label: str) -> str:
    if label in ("metadata.name", "spec.unschedulable"):
        return label
    raise _bad_request(f"field label not supported: {label}")


def _meta_fields(obj: dict) -> dict:
    meta = obj["metadata"]
    return {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", "")}


def _default_field_label(label: str) -> str:
    """runtime.DefaultMetaV1FieldSelectorConversion (used for ServiceAccount)."""
    if label in ("metadata.name", "metadata.namespace"):
        return label
    raise _bad_request(f'"{label}" is not a known field selector: only "metadata.name", "metadata.namespace"')


class _Resource:
    def __init__(self, plural, kind, namespaced, fields_fn, label_fn):
        self.plural = plural
        self.kind = kind
        self.list_kind = kind + "List"
        self.namespaced = namespaced
        self.fields_fn: Callable[[dict], dict] = fields_fn
        self.label_fn: Callable[[str], str] = label_fn


_RESOURCES = {
    "pods": _Resource("pods", "Pod", True, _pod_fields, _pod_field_label),
    "serviceaccounts": _Resource("serviceaccounts", "ServiceAccount", True, _meta_fields, _default_field_label),
    "nodes": _Resource("nodes", "Node", False, _node_fields, _node_field_label),
}


def _key(ns: str, name: str) -> str:
    # The etcd key suffix; lists are ordered by it, like etcd's range reads.
    return f"{ns}/{name}" if ns else name


class _Filter:
    """Namespace + field selector + label selector predicate for one request."""

    def __init__(self, res: _Resource, namespace: Optional[str], fsel: list, lsel: list):
        self.res, self.namespace, self.fsel, self.lsel = res, namespace, fsel, lsel

    @property
    def empty(self) -> bool:
        return not self.fsel and not self.lsel

    def __call__(self, obj: Optional[dict]) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace", "") != self.namespace:
            return False
        if self.fsel:
            fields = self.res.fields_fn(obj)
            for f, op, v in self.fsel:
                have = fields.get(f, "")
                if (op == "=" and have != v) or (op == "!=" and have == v):
                    return False
        return _labels_match(self.lsel, meta.get("labels") or {})


class _Event:
    __slots__ = ("rv", "resource", "type", "key", "obj", "prev")

    def __init__(self, rv, resource, etype, key, obj, prev):
        self.rv, self.resource, self.type, self.key, self.obj, self.prev = rv, resource, etype, key, obj, prev


class _Watch:
    def __init__(self, res: _Resource, flt: _Filter):
        self.res = res
        self.filter = flt
        self.q: "queue.Queue[tuple]" = queue.Queue()

    def convert(self, ev: _Event) -> Optional[tuple[str, dict]]:
        """cacheWatcher.convertToWatchEvent."""
        cur = ev.type != "DELETED" and self.filter(ev.obj)
        old = ev.prev is not None and self.filter(ev.prev)
        if cur and not old:
            return "ADDED", ev.obj
        if cur and old:
            return "MODIFIED", ev.obj
        if old and not cur:
            gone = copy.deepcopy(ev.prev)
            gone["metadata"]["resourceVersion"] = str(ev.rv)
            return "DELETED", gone
        return None


# ---------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr, handler, fake: "FakeKube", family=socket.AF_INET):
        self.address_family = family
        self.fake = fake
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self):
        with self.conns_lock:
            conns = list(self.conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _StreamClosed(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def version_string(self) -> str:
        return "fake-kube-apiserver"

    def do_GET(self):
        self.server.fake._dispatch(self, "GET")

    def do_POST(self):
        self.server.fake._dispatch(self, "POST")

    def do_PUT(self):
        self.server.fake._dispatch(self, "PUT")

    def do_PATCH(self):
        self.server.fake._dispatch(self, "PATCH")

    def do_DELETE(self):
        self.server.fake._dispatch(self, "DELETE")

    # -- helpers used by FakeKube

    def read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_bytes(self, code: int, body: bytes, content_type: str, headers: Optional[dict] = None):
        self.send_response(code)
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", (headers or {}).pop("Cache-Control", "no-cache, private"))
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, code: int, obj: Any, headers: Optional[dict] = None):
        self.send_bytes(code, _dumps(obj), "application/json", dict(headers or {}))

    def send_error_status(self, err: ApiError):
        self.send_json(err.code, err.status(), err.headers)

    def start_chunked(self):
        self.send_response(200)
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (OSError, ValueError) as e:
            raise _StreamClosed() from e

    def end_chunked(self):
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, ValueError):
            self.close_connection = True


# ---------------------------------------------------------------------------
# the fake


class FakeKube:
    """A fake kube-apiserver; see the module docstring for what it serves.

    Tunables (plain attributes, set before or while running):

    * ``bookmark_interval`` (1.0 s): period of watch BOOKMARK events.
    * ``too_large_rv_wait`` (3.0 s): how long a list/watch at a future
      resourceVersion waits before 504 (the real watch cache waits 3 s).
    * ``max_token_expiration_seconds`` (None): like
      ``--service-account-max-token-expiration``; longer requests are shortened
      with a ``Warning`` header.
    * ``api_audiences`` ([issuer]): the ``--api-audiences`` that an empty
      TokenRequest ``audiences`` defaults to.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 0, issuer: Optional[str] = None,
                 bearer_token: str = "fake-admin-token"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = _Server((host, port), _Handler, self, family=family)
        bound_port = self._server.server_address[1]
        if host in ("0.0.0.0", ""):
            url_host = "127.0.0.1"
        elif host == "::":
            url_host = "[::1]"
        elif ":" in host:
            url_host = f"[{host}]"
        else:
            url_host = host
        self.host = host
        self.port = bound_port
        self.url = f"http://{url_host}:{bound_port}"
        self.issuer = issuer or self.url
        self.jwks_url = self.url + "/openid/v1/jwks"
        self.bearer_token = bearer_token
        self.api_audiences: list[str] = [self.issuer]
        self.bookmark_interval = 1.0
        self.too_large_rv_wait = 3.0
        self.max_token_expiration_seconds: Optional[int] = None

        self.token_requests: list[dict] = []
        self.request_log: list[tuple[str, str]] = []

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._rv = 1  # a fresh cluster never starts at 0; "0" means "any" on the wire
        self._compacted = 0
        self._objects: dict[str, dict[str, dict]] = {r: {} for r in _RESOURCES}
        self._history: list[_Event] = []
        self._watches: set[_Watch] = set()
        self._unavailable = False
        self._token_failures: list[int] = []
        self._node_ip_counter = 0
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # pkg/serviceaccount/jwt.go keyIDFromPublicKey: base64url(sha256(PKIX DER)).
        self.kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        self._private_pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "FakeKube":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                name=f"fake-kube:{self.port}", daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._end_watches(abort=True)
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        self._server.close_all_connections()

    def __enter__(self) -> "FakeKube":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_kubeconfig(self, path) -> str:
        """Write a kubeconfig (JSON, which every YAML parser reads) for this server."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake-kube", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-admin", "user": {"token": self.bearer_token}}],
            "contexts": [{"name": "fake-kube", "context": {"cluster": "fake-kube", "user": "fake-admin",
                                                           "namespace": "default"}}],
            "current-context": "fake-kube",
            "preferences": {},
        }
        path = str(path)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        return path

    # -- JWT -----------------------------------------------------------------

    def jwks(self) -> dict:
        pub = self._key.public_key().public_numbers()
        return {"keys": [{"use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256",
                          "n": _b64url_uint(pub.n), "e": _b64url_uint(pub.e)}]}

    def discovery(self) -> dict:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def sign_jwt(self, claims: dict) -> str:
        """RS256 with the issuer key; header is exactly {"alg","kid"} like go-jose's."""
        return jwt.encode(claims, self._private_pem, algorithm="RS256", headers={"kid": self.kid, "typ": None})

    def verify_token(self, token: str, audience) -> dict:
        """Verify signature (against this server's JWKS), iss, aud, exp/nbf/iat; raise on failure."""
        header = jwt.get_unverified_header(token)
        keys = {k["kid"]: k for k in self.jwks()["keys"]}
        if header.get("kid") not in keys:
            raise jwt.InvalidTokenError(f"unknown kid {header.get('kid')!r}")
        key = jwt.PyJWK(keys[header["kid"]])
        return jwt.decode(
            token, key, algorithms=["RS256"], audience=audience, issuer=self.issuer,
            options={"require": ["exp", "iat", "nbf", "iss", "sub", "aud"]},
        )

    # -- fault injection ---------------------------------------------------

    def set_unavailable(self, flag: bool) -> None:
        with self._lock:
            self._unavailable = bool(flag)
        if flag:
            self._end_watches(abort=True)

    def fail_token_requests(self, status: int, count: int = 1) -> None:
        with self._lock:
            self._token_failures.extend([int(status)] * int(count))

    def close_watches(self) -> None:
        self._end_watches(abort=False)

    def compact(self) -> None:
        """Drop all history.

        NB: also advances the global resourceVersion by one, as the constant
        unrelated writes (leases, events) in a real cluster do, so that *every*
        resourceVersion handed out before this call is now too old: a watch or an
        Exact list from it gets 410 Expired; a fresh list works again.
        """
        with self._cond:
            self._rv += 1
            self._compacted = self._rv
            self._history.clear()
            self._cond.notify_all()

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion."""
        with self._lock:
            return str(self._rv)

    def _end_watches(self, abort: bool) -> None:
        with self._lock:
            for w in list(self._watches):
                w.q.put(("end", abort))

    # -- object store --------------------------------------------------------

    def _commit(self, resource: str, etype: str, key: str, new: Optional[dict]) -> dict:
        """Apply one write under the lock and fan the event out to watchers."""
        with self._cond:
            self._rv += 1
            rv = self._rv
            store = self._objects[resource]
            prev = store.get(key)
            if etype == "DELETED":
                obj = copy.deepcopy(prev)
                obj["metadata"]["resourceVersion"] = str(rv)
                del store[key]
            else:
                obj = new
                obj["metadata"]["resourceVersion"] = str(rv)
                store[key] = obj
            ev = _Event(rv, resource, etype, key, obj, prev)
            self._history.append(ev)
            for w in self._watches:
                if w.res.plural == resource:
                    w.q.put(("event", ev))
            self._cond.notify_all()
            return copy.deepcopy(obj)

    def _get(self, resource: str, ns: str, name: str) -> Optional[dict]:
        with self._lock:
            return self._objects[resource].get(_key(ns, name))

    def _require(self, resource: str, ns: str, name: str) -> dict:
        obj = self._get(resource, ns, name)
        if obj is None:
            raise KeyError(f"{resource} {ns + '/' if ns else ''}{name} does not exist")
        return obj

    @staticmethod
    def _new_meta(name: str, namespace: Optional[str], uid: Optional[str], labels=None, annotations=None) -> dict:
        meta: dict[str, Any] = {"name": name}
        if namespace is not None:
            meta["namespace"] = namespace
        meta["uid"] = uid or str(uuid.uuid4())
        meta["resourceVersion"] = ""
        meta["creationTimestamp"] = _rfc3339(time.time())
        if labels:
            meta["labels"] = dict(labels)
        if annotations:
            meta["annotations"] = dict(annotations)
        return meta

    # nodes

    def add_node(self, name: str, labels: Optional[dict] = None, provider_id: Optional[str] = None,
                 addresses=None) -> dict:
        """Register a Node.  ``addresses``: list of IP strings (InternalIP) or of
        ``{"type","address"}`` dicts; default one auto-assigned InternalIP plus Hostname."""
        with self._lock:
            if self._get("nodes", "", name) is not None:
                raise ValueError(f"node {name} already exists")
            if addresses is None:
                self._node_ip_counter += 1
                n = self._node_ip_counter
                addresses = [f"10.0.{n // 250}.{n % 250 + 4}"]
            addrs = []
            for a in addresses:
                if isinstance(a, dict):
                    addrs.append({"type": a["type"], "address": a["address"]})
                else:
                    ipaddress.ip_address(a)
                    addrs.append({"type": "InternalIP", "address": a})
            if not any(a["type"] == "Hostname" for a in addrs):
                addrs.append({"type": "Hostname", "address": name})
            all_labels = {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
            }
            all_labels.update(labels or {})
            now = _rfc3339(time.time())
            node = {
                "kind": "Node",
                "apiVersion": "v1",
                "metadata": self._new_meta(name, None, None, labels=all_labels),
                "spec": {"providerID": provider_id} if provider_id else {},
                "status": {
                    "conditions": [{
                        "type": "Ready", "status": "True", "lastHeartbeatTime": now,
                        "lastTransitionTime": now, "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                    }],
                    "addresses": addrs,
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                    "nodeInfo": {
                        "machineID": uuid.uuid4().hex, "systemUUID": str(uuid.uuid4()),
                        "bootID": str(uuid.uuid4()), "kernelVersion": "6.1.0",
                        "osImage": "Fake Linux", "containerRuntimeVersion": "containerd://1.7.0",
                        "kubeletVersion": _VERSION["gitVersion"], "kubeProxyVersion": "",
                        "operatingSystem": "linux", "architecture": "amd64",
                    },
                },
            }
            return self._commit("nodes", "ADDED", _key("", name), node)

    def delete_node(self, name: str) -> None:
        with self._lock:
            self._require("nodes", "", name)
            self._commit("nodes", "DELETED", _key("", name), None)

    def _host_ip(self, node: Optional[str]) -> Optional[str]:
        if not node:
            return None
        n = self._get("nodes", "", node)
        if n is None:
            return None
        for a in n["status"].get("addresses", []):
            if a["type"] == "InternalIP":
                return a["address"]
        return None

    # service accounts

    def add_service_account(self, namespace: str, name: str, annotations: Optional[dict] = None) -> dict:
        with self._lock:
            if self._get("serviceaccounts", namespace, name) is not None:
                raise ValueError(f"serviceaccount {namespace}/{name} already exists")
            sa = {"kind": "ServiceAccount", "apiVersion": "v1",
                  "metadata": self._new_meta(name, namespace, None, annotations=annotations)}
            return self._commit("serviceaccounts", "ADDED", _key(namespace, name), sa)

    def update_service_account(self, namespace: str, name: str, annotations: Optional[dict]) -> dict:
        """Replace the ServiceAccount's annotations (MODIFIED event)."""
        with self._lock:
            sa = copy.deepcopy(self._require("serviceaccounts", namespace, name))
            sa["metadata"].pop("annotations", None)
            if annotations:
                sa["metadata"]["annotations"] = dict(annotations)
            return self._commit("serviceaccounts", "MODIFIED", _key(namespace, name), sa)

    def delete_service_account(self, namespace: str, name: str) -> None:
        with self._lock:
            self._require("serviceaccounts", namespace, name)
            self._commit("serviceaccounts", "DELETED", _key(namespace, name), None)

    # pods

    @staticmethod
    def _check_ips(ips) -> list[str]:
        if isinstance(ips, str):
            ips = [ips]
        out = []
        for ip in ips or ():
            ipaddress.ip_address(ip)  # ValueError on garbage
            out.append(str(ip))
        return out

    def _pod_status(self, pod: dict, phase: str, ips: list[str]) -> dict:
        spec = pod["spec"]
        created = pod["metadata"]["creationTimestamp"]
        host_ip = self._host_ip(spec.get("nodeName"))
        if spec.get("hostNetwork") and not ips and host_ip:
            ips = [host_ip]
        running = phase == "Running"
        scheduled = bool(spec.get("nodeName"))
        conds = [{"type": "PodScheduled", "status": "True" if scheduled else "False",
                  "lastProbeTime": None, "lastTransitionTime": created}]
        if scheduled:
            for t in ("Initialized", "PodReadyToStartContainers", "ContainersReady", "Ready"):
                ok = "True" if (running or t in ("Initialized",)) else "False"
                conds.append({"type": t, "status": ok, "lastProbeTime": None, "lastTransitionTime": created})
        status: dict[str, Any] = {"phase": phase, "conditions": conds}
        if host_ip and scheduled:
            status["hostIP"] = host_ip
            status["hostIPs"] = [{"ip": host_ip}]
        if ips:
            status["podIP"] = ips[0]
            status["podIPs"] = [{"ip": ip} for ip in ips]
        if scheduled:
            status["startTime"] = created
        status["qosClass"] = "BestEffort"
        return status

    def add_pod(self, namespace: str, name: str, *, node: str, ips=(), service_account: str = "default",
                host_network: bool = False, phase: str = "Running", uid: Optional[str] = None,
                labels: Optional[dict] = None) -> dict:
        ips = self._check_ips(ips)
        with self._lock:
            if self._get("pods", namespace, name) is not None:
                raise ValueError(f"pod {namespace}/{name} already exists")
            spec: dict[str, Any] = {
                "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}],
                "containers": [{
                    "name": "app", "image": "registry.k8s.io/pause:3.10", "resources": {},
                    "volumeMounts": [{"name": "kube-api-access", "readOnly": True,
                                      "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
                }],
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 30,
                "dnsPolicy": "ClusterFirstWithHostNet" if host_network else "ClusterFirst",
                "serviceAccountName": service_account,
                "serviceAccount": service_account,
            }
            if node:
                spec["nodeName"] = node
            if host_network:
                spec["hostNetwork"] = True
            spec.update({
                "securityContext": {},
                "schedulerName": "default-scheduler",
                "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                     "tolerationSeconds": 300},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                     "tolerationSeconds": 300},
                ],
                "priority": 0,
                "enableServiceLinks": True,
                "preemptionPolicy": "PreemptLowerPriority",
            })
            pod = {"kind": "Pod", "apiVersion": "v1",
                   "metadata": self._new_meta(name, namespace, uid, labels=labels), "spec": spec}
            pod["status"] = self._pod_status(pod, phase, ips)
            return self._commit("pods", "ADDED", _key(namespace, name), pod)

    def update_pod(self, namespace: str, name: str, *, ips=None, phase: Optional[str] = None,
                   service_account: Optional[str] = None, host_network: Optional[bool] = None,
                   node: Optional[str] = None, labels: Optional[dict] = None) -> dict:
        """Change a pod (MODIFIED event).  ``node``/``labels`` are extras to
        exercise selectors (a real pod never changes node)."""
        with self._lock:
            pod = copy.deepcopy(self._require("pods", namespace, name))
            spec, status = pod["spec"], pod["status"]
            if service_account is not None:
                spec["serviceAccountName"] = spec["serviceAccount"] = service_account
            if host_network is not None:
                spec.pop("hostNetwork", None)
                if host_network:
                    spec["hostNetwork"] = True
            if node is not None:
                spec.pop("nodeName", None)
                if node:
                    spec["nodeName"] = node
            if labels is not None:
                pod["metadata"].pop("labels", None)
                if labels:
                    pod["metadata"]["labels"] = dict(labels)
            new_ips = self._check_ips(ips) if ips is not None else [p["ip"] for p in status.get("podIPs", [])]
            pod["status"] = self._pod_status(pod, phase or status.get("phase", "Running"), new_ips)
            return self._commit("pods", "MODIFIED", _key(namespace, name), pod)

    def mark_pod_deleting(self, namespace: str, name: str) -> dict:
        """Graceful deletion start: deletionTimestamp (= now + grace) and deletionGracePeriodSeconds."""
        with self._lock:
            pod = copy.deepcopy(self._require("pods", namespace, name))
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            pod["metadata"]["deletionTimestamp"] = _rfc3339(time.time() + grace)
            pod["metadata"]["deletionGracePeriodSeconds"] = grace
            return self._commit("pods", "MODIFIED", _key(namespace, name), pod)

    def delete_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            self._require("pods", namespace, name)
            self._commit("pods", "DELETED", _key(namespace, name), None)

    def get_object(self, resource: str, namespace: str, name: str) -> Optional[dict]:
        """A copy of a stored object (resource: "pods", "serviceaccounts", "nodes")."""
        obj = self._get(resource, namespace if _RESOURCES[resource].namespaced else "", name)
        return copy.deepcopy(obj) if obj is not None else None

    # -- snapshots -----------------------------------------------------------

    def _snapshot(self, resource: str, rv: int) -> dict[str, dict]:
        """State of ``resource`` at global RV ``rv`` (caller holds the lock, rv >= compacted)."""
        state = dict(self._objects[resource])
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            if ev.resource != resource:
                continue
            if ev.type == "ADDED":
                state.pop(ev.key, None)
            else:
                state[ev.key] = ev.prev
        return state

    def _wait_fresh(self, wanted: int) -> None:
        """Block (lock held via the condition) until the RV reaches ``wanted``, else 504."""
        deadline = time.monotonic() + self.too_large_rv_wait
        while self._rv < wanted:
            left = deadline - time.monotonic()
            if left <= 0 or self._stopped:
                raise _too_large_rv(wanted, self._rv)
            self._cond.wait(timeout=min(left, 0.1))

    # -- request dispatch ----------------------------------------------------

    def _dispatch(self, h: _Handler, method: str) -> None:
        self.request_log.append((method, h.path))
        try:
            body = h.read_body() if method in ("POST", "PUT", "PATCH", "DELETE") else b""
            parts = urlsplit(h.path)
            path = parts.path
            params: dict[str, str] = {}
            for k, v in parse_qs(parts.query, keep_blank_values=True).items():
                params[k] = v[0]  # Go's url.Values.Get: the first value
            if self._unavailable:
                raise ApiError(503, "service unavailable", headers={"Retry-After": "1"})
            self._authenticate(h, path)
            self._route(h, method, path, params, body)
        except ApiError as e:
            h.send_error_status(e)
        except _StreamClosed:
            h.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def _is_anonymous_path(self, path: str) -> bool:
        if path in _ANONYMOUS_PATHS:
            return True
        issuer_path = urlsplit(self.issuer).path.rstrip("/")
        return bool(issuer_path) and path == issuer_path + "/.well-known/openid-configuration"

    def _authenticate(self, h: _Handler, path: str) -> None:
        auth = h.headers.get("Authorization")
        if auth is None:
            if self._is_anonymous_path(path):
                return
            raise ApiError(401, "Unauthorized")
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.bearer_token:
            raise ApiError(401, "Unauthorized")

    def _route(self, h: _Handler, method: str, path: str, params: dict, body: bytes) -> None:
        segs = [unquote(s) for s in path.split("/") if s != ""]

        if self._is_anonymous_path(path) and path.endswith("/.well-known/openid-configuration"):
            self._only_get(method)
            h.send_bytes(200, _dumps(self.discovery()), "application/json",
                         {"Cache-Control": "public, max-age=3600"})
            return
        if path == "/openid/v1/jwks":
            self._only_get(method)
            h.send_bytes(200, _dumps(self.jwks()), "application/jwk-set+json",
                         {"Cache-Control": "public, max-age=3600"})
            return
        if path == "/version":
            self._only_get(method)
            h.send_json(200, _VERSION)
            return
        if path in ("/healthz", "/livez", "/readyz"):
            self._only_get(method)
            h.send_bytes(200, b"ok", "text/plain; charset=utf-8", {"X-Content-Type-Options": "nosniff"})
            return
        if segs == ["api"]:
            h.send_json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": self.url.split("://", 1)[1]}]})
            return
        if segs == ["apis"]:
            h.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
            return
        if segs == ["api", "v1"]:
            h.send_json(200, self._api_resource_list())
            return

        if len(segs) >= 3 and segs[0] == "api" and segs[1] == "v1":
            rest = segs[2:]
            # /api/v1/{resource}[/{name}]
            if len(rest) in (1, 2) and rest[0] in _RESOURCES:
                res = _RESOURCES[rest[0]]
                if len(rest) == 1:
                    self._only_get(method)
                    self._collection(h, res, None, params)
                    return
                if not res.namespaced:
                    self._only_get(method)
                    self._object(h, res, "", rest[1], params)
                    return
            # /api/v1/namespaces/{ns}/{resource}[/{name}[/token]]
            if len(rest) >= 3 and rest[0] == "namespaces":
                ns, resname = rest[1], rest[2]
                res = _RESOURCES.get(resname)
                if res is not None and res.namespaced:
                    if len(rest) == 3:
                        self._only_get(method)
                        self._collection(h, res, ns, params)
                        return
                    if len(rest) == 4:
                        self._only_get(method)
                        self._object(h, res, ns, rest[3], params)
                        return
                    if len(rest) == 5 and resname == "serviceaccounts" and rest[4] == "token":
                        if method != "POST":
                            raise self._method_not_allowed()
                        self._token_request(h, ns, rest[3], body)
                        return

        if segs and segs[0] in ("api", "apis"):
            raise ApiError(404, "the server could not find the requested resource", details={})
        # Non-API paths get the mux's plain 404, like the real server.
        h.send_bytes(404, b"404 page not found\n", "text/plain; charset=utf-8", {"X-Content-Type-Options": "nosniff"})

    @staticmethod
    def _method_not_allowed() -> ApiError:
        return ApiError(405, "the server does not allow this method on the requested resource", details={})

    def _only_get(self, method: str) -> None:
        if method != "GET":
            raise self._method_not_allowed()

    @staticmethod
    def _api_resource_list() -> dict:
        def r(name, kind, namespaced, verbs, singular=""):
            return {"name": name, "singularName": singular, "namespaced": namespaced, "kind": kind, "verbs": verbs}

        rw = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        return {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            r("nodes", "Node", False, rw, "node"),
            r("pods", "Pod", True, rw, "pod"),
            r("serviceaccounts", "ServiceAccount", True, rw, "serviceaccount"),
            {"name": "serviceaccounts/token", "singularName": "", "namespaced": True, "group": "authentication.k8s.io",
             "version": "v1", "kind": "TokenRequest", "verbs": ["create"]},
        ]}

    # -- reads -------------------------------------------------------------

    @staticmethod
    def _wants_metadata(h: _Handler) -> bool:
        return _META_MIME in (h.headers.get("Accept") or "").lower().replace(" ", "")

    @staticmethod
    def _as_metadata(obj: dict) -> dict:
        return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": copy.deepcopy(obj["metadata"])}

    def _object(self, h: _Handler, res: _Resource, ns: str, name: str, params: dict) -> None:
        if params.get("watch") is not None and _parse_bool(params["watch"]):
            # GET .../name?watch=true is a watch on metadata.name=name.
            fs = params.get("fieldSelector", "")
            params = dict(params, fieldSelector=("metadata.name=" + _escape_field(name)) + ("," + fs if fs else ""))
            self._collection(h, res, ns if res.namespaced else None, params)
            return
        obj = self._get(res.plural, ns, name)
        if obj is None:
            raise _not_found(res.plural, name)
        h.send_json(200, self._as_metadata(obj) if self._wants_metadata(h) else obj)

    def _build_filter(self, res: _Resource, ns: Optional[str], params: dict) -> _Filter:
        fsel = []
        for f, op, v in _parse_field_selector(params.get("fieldSelector", "")):
            fsel.append((res.label_fn(f), op, v))
        lsel = _parse_label_selector(params.get("labelSelector", ""))
        return _Filter(res, ns, fsel, lsel)

    def _collection(self, h: _Handler, res: _Resource, ns: Optional[str], params: dict) -> None:
        watch = "watch" in params and _parse_bool(params["watch"])
        _validate_list_options(params, watch)
        flt = self._build_filter(res, ns, params)
        if watch:
            self._watch(h, res, flt, params)
        else:
            self._list(h, res, flt, params)

    def _list(self, h: _Handler, res: _Resource, flt: _Filter, params: dict) -> None:
        rv_param = params.get("resourceVersion", "")
        match = params.get("resourceVersionMatch", "")
        cont = params.get("continue", "")
        limit = _parse_int(params.get("limit", ""), "limit") or 0
        with self._cond:
            start_key = ""
            if cont:
                if rv_param not in ("", "0"):
                    raise _bad_request("specifying resource version is not allowed when using continue")
                list_rv, start_key = _decode_continue(cont)
                if list_rv < self._compacted:
                    raise _expired(
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter, or use the continue token "
                        "in this response to retrieve the remainder of the results. Continuing with the "
                        "provided token results in an inconsistent list - objects that were created, modified, "
                        "or deleted between the time the first chunk was returned and now may show up in the list."
                    )
                state = self._snapshot(res.plural, list_rv)
            elif rv_param in ("", "0"):
                list_rv, state = self._rv, dict(self._objects[res.plural])
            else:
                wanted = _parse_rv(rv_param)
                exact = match == "Exact" or (match == "" and limit > 0)
                self._wait_fresh(wanted)
                if exact:
                    if wanted < self._compacted:
                        raise _expired("The resourceVersion for the provided list is too old.")
                    list_rv, state = wanted, self._snapshot(res.plural, wanted)
                else:
                    list_rv, state = self._rv, dict(self._objects[res.plural])
            keys = sorted(k for k in state if k >= start_key and flt(state[k]))
            meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
            if limit > 0 and len(keys) > limit:
                page = keys[:limit]
                meta["continue"] = _encode_continue(list_rv, page[-1] + "\x00")
                if flt.empty:
                    meta["remainingItemCount"] = len(keys) - limit
            else:
                page = keys
            items = [state[k] for k in page]
        if self._wants_metadata(h):
            out_items = [self._as_metadata(o) for o in items]
            body = {"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta, "items": out_items}
        else:
            # NB: items of a typed List carry no kind/apiVersion on the wire.
            out_items = []
            for o in items:
                o = dict(o)
                o.pop("kind", None)
                o.pop("apiVersion", None)
                out_items.append(o)
            body = {"kind": res.list_kind, "apiVersion": "v1", "metadata": meta, "items": out_items}
        h.send_json(200, body)

    def _bookmark(self, res: _Resource, rv: int, meta_only: bool, annotations: Optional[dict] = None) -> dict:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if annotations:
            meta["annotations"] = annotations
        if meta_only:
            return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
        return {"kind": res.kind, "apiVersion": "v1", "metadata": meta}

    def _watch(self, h: _Handler, res: _Resource, flt: _Filter, params: dict) -> None:
        rv_param = params.get("resourceVersion", "")
        sie = params.get("sendInitialEvents")
        send_initial = _parse_bool(sie) if sie is not None else None
        bookmarks = "allowWatchBookmarks" in params and _parse_bool(params["allowWatchBookmarks"])
        meta_only = self._wants_metadata(h)
        timeout = _parse_int(params.get("timeoutSeconds", ""), "timeoutSeconds") or 0
        if timeout <= 0:
            timeout = 1800 * (random.random() + 1.0)  # --min-request-timeout=1800, randomized like the server

        def ev_bytes(etype: str, obj: dict) -> bytes:
            if meta_only and etype != "ERROR":
                obj = obj if obj.get("apiVersion") == "meta.k8s.io/v1" else self._as_metadata(obj)
            return _dumps({"type": etype, "object": obj}) + b"\n"

        # A malformed resourceVersion fails the request itself (HTTP 400).
        wanted = _parse_rv(rv_param) if rv_param not in ("", "0") else None
        initial: list[bytes] = []
        w: Optional[_Watch] = None
        with self._cond:
            try:
                if wanted is not None:
                    # A future RV waits, then becomes an ERROR event (the cacher's errWatcher).
                    self._wait_fresh(wanted)
                if send_initial is True or (send_initial is None and wanted is None):
                    state = self._objects[res.plural]
                    for k in sorted(state):
                        if flt(state[k]):
                            initial.append(ev_bytes("ADDED", state[k]))
                    w = _Watch(res, flt)
                    if send_initial is True and bookmarks:
                        initial.append(ev_bytes("BOOKMARK", self._bookmark(
                            res, self._rv, meta_only, {_INITIAL_EVENTS_END: "true"})))
                elif wanted is not None and wanted < self._compacted:
                    initial.append(ev_bytes("ERROR", _expired(
                        f"too old resource version: {wanted} ({self._compacted})").status()))
                else:
                    w = _Watch(res, flt)
                    since = wanted if wanted is not None else self._rv
                    for ev in self._history:
                        if ev.rv > since and ev.resource == res.plural:
                            out = w.convert(ev)
                            if out:
                                initial.append(ev_bytes(*out))
            except ApiError as e:
                # Errors found after the watch was accepted go out as an ERROR event.
                initial.append(ev_bytes("ERROR", e.status()))
                w = None
            if w is not None:
                self._watches.add(w)

        abort = False
        try:
            h.start_chunked()
            for b in initial:
                h.write_chunk(b)
            if w is None:
                return
            start = time.monotonic()
            deadline = start + timeout
            next_bookmark = start + self.bookmark_interval if bookmarks else float("inf")
            timed_out = False
            while True:
                now = time.monotonic()
                if not timed_out and now >= deadline:
                    timed_out = True
                    with self._lock:
                        if bookmarks:
                            w.q.put(("bookmark", self._rv))
                        w.q.put(("end", False))
                elif bookmarks and not timed_out and now >= next_bookmark:
                    with self._lock:
                        w.q.put(("bookmark", self._rv))
                    next_bookmark = now + self.bookmark_interval
                wait = max(0.005, min(deadline, next_bookmark, now + 0.25) - now)
                try:
                    item = w.q.get(timeout=wait)
                except queue.Empty:
                    continue
                kind = item[0]
                if kind == "event":
                    out = w.convert(item[1])
                    if out:
                        h.write_chunk(ev_bytes(*out))
                elif kind == "bookmark":
                    h.write_chunk(ev_bytes("BOOKMARK", self._bookmark(res, item[1], meta_only)))
                elif kind == "end":
                    abort = item[1]
                    break
        except _StreamClosed:
            abort = True
        finally:
            if w is not None:
                with self._lock:
                    self._watches.discard(w)
            if abort:
                h.close_connection = True
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            else:
                h.end_chunked()

    # -- TokenRequest --------------------------------------------------------

    def _token_request(self, h: _Handler, ns: str, sa_name: str, body: bytes) -> None:
        record: dict[str, Any] = {"namespace": ns, "service_account": sa_name, "audiences": [],
                                  "expiration_seconds": None, "bound_object_ref": None, "status_code": None}
        try:
            try:
                req = json.loads(body.decode() or "{}")
            except (ValueError, UnicodeDecodeError) as e:
                raise _bad_request(f"couldn't get version/kind; json parse error: {e}")
            if not isinstance(req, dict):
                raise _bad_request("couldn't get version/kind; json parse error: not an object")
            spec = req.get("spec") or {}
            if not isinstance(spec, dict):
                raise _bad_request("TokenRequest in version \"v1\" cannot be handled as a TokenRequest: spec must be an object")
            auds = spec.get("audiences")
            record["audiences"] = list(auds) if isinstance(auds, list) else ([] if auds is None else auds)
            record["expiration_seconds"] = spec.get("expirationSeconds")
            record["bound_object_ref"] = copy.deepcopy(spec.get("boundObjectRef"))
            status, headers = self._issue_token(ns, sa_name, req, spec, record)
            record["status_code"] = 201
        except ApiError as e:
            record["status_code"] = e.code
            raise
        finally:
            # NB: recorded before the response goes out, so a client that has
            # its answer always finds the request in token_requests.
            with self._lock:
                self.token_requests.append(record)
        h.send_json(201, status, headers)

    def _injected_token_error(self, code: int, ns: str, sa: str) -> ApiError:
        if code == 403:
            return ApiError(403, f'serviceaccounts "{sa}" is forbidden: User '
                                 f'"system:serviceaccount:kube-system:metabridge" cannot create resource '
                                 f'"serviceaccounts/token" in API group "" in the namespace "{ns}"',
                            details=_details(name=sa, kind="serviceaccounts"))
        if code == 404:
            return _not_found("serviceaccounts", sa)
        if code == 429:
            return ApiError(429, "Too many requests, please try again later.",
                            details=_details(retry_after=1), headers={"Retry-After": "1"})
        if code == 500:
            return ApiError(500, "Internal error occurred: injected failure",
                            details={"causes": [{"message": "injected failure"}]})
        if code == 503:
            return ApiError(503, "service unavailable", headers={"Retry-After": "1"})
        if code == 504:
            return ApiError(504, "Timeout: request did not complete within the allotted timeout",
                            details=_details(retry_after=0))
        return ApiError(code, "injected failure", details=_details(name=sa, kind="serviceaccounts"))

    def _issue_token(self, ns: str, name: str, req: dict, spec: dict, record: dict) -> tuple[dict, dict]:
        group, kind = "authentication.k8s.io", "TokenRequest"
        with self._lock:
            if self._token_failures:
                raise self._injected_token_error(self._token_failures.pop(0), ns, name)

            # Decoding (a malformed body fails before any lookup).
            audiences = spec.get("audiences") or []
            if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
                raise _bad_request('TokenRequest in version "v1" cannot be handled as a TokenRequest: '
                                   'json: cannot unmarshal into Go struct field TokenRequestSpec.spec.audiences '
                                   'of type []string')
            exp_s = spec.get("expirationSeconds")
            if exp_s is None:
                exp_s = _DEFAULT_TOKEN_SECONDS  # v1 defaulting
            if isinstance(exp_s, bool) or not isinstance(exp_s, int):
                raise _bad_request('TokenRequest in version "v1" cannot be handled as a TokenRequest: '
                                   'json: cannot unmarshal into Go struct field TokenRequestSpec.spec.expirationSeconds '
                                   'of type int64')

            meta = req.get("metadata") or {}
            if meta.get("name") and meta["name"] != name:
                raise _invalid(kind, group, name, [_FieldError(
                    "invalid", "metadata.name", meta["name"], "must match the service account name if specified")])
            if meta.get("namespace") and meta["namespace"] != ns:
                raise _invalid(kind, group, name, [_FieldError(
                    "invalid", "metadata.namespace", meta["namespace"],
                    "must match the service account namespace if specified")])

            sa = self._get("serviceaccounts", ns, name)
            if sa is None:
                raise _not_found("serviceaccounts", name)

            if not audiences:
                audiences = list(self.api_audiences)
            now = int(time.time())

            errs = []
            if exp_s < _MIN_TOKEN_SECONDS:
                errs.append(_FieldError("invalid", "spec.expirationSeconds", exp_s,
                                        "may not specify a duration less than 10 minutes"))
            if exp_s > _MAX_TOKEN_SECONDS:
                errs.append(_FieldError("invalid", "spec.expirationSeconds", exp_s,
                                        "may not specify a duration larger than 2^32 seconds"))
            if errs:
                # NB: the real server passes an empty name here (token.go).
                raise _invalid(kind, group, "", errs)

            pod = node = None
            node_ref: Optional[dict] = None
            ref = spec.get("boundObjectRef")
            if ref is not None:
                if not isinstance(ref, dict):
                    raise _bad_request("boundObjectRef must be an object")
                api_version = ref.get("apiVersion") or ""
                ref_group, _, ref_version = api_version.rpartition("/") if "/" in api_version else ("", "", api_version)
                ref_kind = ref.get("kind") or ""
                ref_name = ref.get("name") or ""
                if ref_group == "" and ref_kind == "Pod":
                    if not ref_name:
                        raise _bad_request("Name parameter required.")
                    pod = self._get("pods", ns, ref_name)
                    if pod is None:
                        raise _not_found("pods", ref_name)
                    if name != pod["spec"].get("serviceAccountName"):
                        raise _bad_request(f'cannot bind token for serviceaccount "{name}" '
                                           f"to pod running with different serviceaccount name.")
                    uid = pod["metadata"]["uid"]
                    node_name = pod["spec"].get("nodeName")
                    if node_name:
                        n = self._get("nodes", "", node_name)
                        node_ref = {"name": node_name, "uid": n["metadata"]["uid"]} if n else {"name": node_name}
                elif ref_group == "" and ref_kind == "Node":
                    if not ref_name:
                        raise _bad_request("Name parameter required.")
                    node = self._get("nodes", "", ref_name)
                    if node is None:
                        raise _not_found("nodes", ref_name)
                    uid = node["metadata"]["uid"]
                    node_ref = {"name": ref_name, "uid": uid}
                elif ref_group == "" and ref_kind == "Secret":
                    raise _not_found("secrets", ref_name)  # this fake stores no Secrets
                else:
                    raise _bad_request(f"cannot bind token to object of type {ref_group}/{ref_version}, Kind={ref_kind}")
                if ref.get("uid") and ref["uid"] != uid:
                    raise ApiError(
                        409,
                        f'Operation cannot be fulfilled on {ref_kind} "{ref_name}": the UID in the bound object '
                        f"reference ({ref['uid']}) does not match the UID in record. The object might have been "
                        f"deleted and then recreated",
                        details=_details(name=ref_name, kind=ref_kind),
                    )

            headers: dict[str, str] = {}
            if self.max_token_expiration_seconds and exp_s > self.max_token_expiration_seconds:
                headers["Warning"] = (f'299 - "requested expiration of {exp_s} seconds shortened to '
                                      f'{self.max_token_expiration_seconds} seconds"')
                exp_s = self.max_token_expiration_seconds

            k8s: dict[str, Any] = {"namespace": ns,
                                   "serviceaccount": {"name": name, "uid": sa["metadata"]["uid"]}}
            if pod is not None:
                k8s["pod"] = {"name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
            if node_ref is not None:
                k8s["node"] = node_ref
            claims = {
                "aud": audiences,
                "exp": now + exp_s,
                "iat": now,
                "iss": self.issuer,
                "jti": str(uuid.uuid4()),
                "kubernetes.io": k8s,
                "nbf": now,
                "sub": f"system:serviceaccount:{ns}:{name}",
            }
            token = self.sign_jwt(claims)
            exp_ts = _rfc3339(now + exp_s)
            out_spec: dict[str, Any] = {"audiences": audiences, "expirationSeconds": exp_s}
            if ref is not None:
                out_spec["boundObjectRef"] = copy.deepcopy(ref)
            out = {
                "kind": "TokenRequest",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": ns, "creationTimestamp": _rfc3339(now)},
                "spec": out_spec,
                "status": {"token": token, "expirationTimestamp": exp_ts},
            }
            record["token"] = token
            record["expiration_timestamp"] = exp_ts
            return out, headers


# ---------------------------------------------------------------------------
# query parameter helpers


def _parse_bool(v: str) -> bool:
    """runtime.Convert_Slice_string_To_bool: only "0"/"false" are false."""
    return not (v == "0" or v.lower() == "false")


def _parse_int(v: str, name: str) -> Optional[int]:
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise _bad_request(f'{name}: Invalid value: "{v}": strconv.ParseInt: parsing "{v}": invalid syntax')


def _parse_rv(v: str) -> int:
    try:
        n = int(v)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        raise _bad_request(f'invalid resource version "{v}"')


def _escape_field(v: str) -> str:
    return v.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace("!", "\\!")


def _encode_continue(rv: int, start: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        d = json.loads(raw)
        if d.get("v") != "meta.k8s.io/v1":
            raise ValueError("unrecognized version")
        return int(d["rv"]), str(d["start"])
    except (ValueError, KeyError, TypeError) as e:
        raise _bad_request(f"continue key is not valid: {e}")


def _validate_list_options(params: dict, watch: bool) -> None:
    """metainternalversion/validation.ValidateListOptions (→ 422 ListOptions)."""
    errs: list[_FieldError] = []
    match = params.get("resourceVersionMatch", "")
    rv = params.get("resourceVersion", "")
    cont = params.get("continue", "")
    sie = params.get("sendInitialEvents")
    if watch:
        if sie is not None and match != "NotOlderThan":
            errs.append(_FieldError("forbidden", "resourceVersionMatch", None,
                                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"))
        if match:
            if sie is None:
                errs.append(_FieldError("forbidden", "resourceVersionMatch", None,
                                        "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"))
            if match != "NotOlderThan":
                errs.append(_FieldError("notsupported", "resourceVersionMatch", match,
                                        _not_supported_detail(["NotOlderThan"])))
            if cont:
                errs.append(_FieldError("forbidden", "resourceVersionMatch", None,
                                        "resourceVersionMatch is forbidden when continue is provided"))
    else:
        if match:
            if rv == "":
                errs.append(_FieldError("forbidden", "resourceVersionMatch", None,
                                        "resourceVersionMatch is forbidden unless resourceVersion is provided"))
            if cont:
                errs.append(_FieldError("forbidden", "resourceVersionMatch", None,
                                        "resourceVersionMatch is forbidden when continue is provided"))
            if match not in ("Exact", "NotOlderThan"):
                errs.append(_FieldError("notsupported", "resourceVersionMatch", match,
                                        _not_supported_detail(["Exact", "NotOlderThan", ""])))
            if match == "Exact" and rv == "0":
                errs.append(_FieldError("forbidden", "resourceVersionMatch", None,
                                        'resourceVersionMatch "exact" is forbidden for resourceVersion "0"'))
        if sie is not None:
            errs.append(_FieldError("forbidden", "sendInitialEvents", None, "sendInitialEvents is forbidden for list"))
    if errs:
        raise _invalid("ListOptions", "meta.k8s.io", "", errs)
