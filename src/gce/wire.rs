//! Responses as Google's metadata server shapes them: its headers on every
//! answer, its content types, its 404 page, and the one mapping of our
//! errors to statuses the SDKs understand.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::{credentials::CredentialError, pods::LookupError, server::Body};

/// `Server` header. We answer with GKE's name, not GCE's (`Metadata Server
/// for VM`): what we serve is GKE's workload identity subset (no
/// `instance/name`, no custom attributes, pool names as emails), and a person
/// reading the headers should expect that subset. No client checks it.
pub const SERVER: &str = "GKE Metadata Server";
/// The body of `/`: the one version we serve (real GCE also lists `0.1/`,
/// long retired and not served by GKE).
pub const ROOT_LISTING: &str = "computeMetadata/\n";

pub const TEXT: &str = "application/text";
pub const JSON: &str = "application/json";
pub const HTML: &str = "text/html; charset=UTF-8";

/// A response with GCE's headers: `Metadata-Flavor: Google` on every answer
/// (Node's gcp-metadata refuses successes without it, Python's ping needs
/// it), the server name and the two hardening headers Google sends.
pub fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert("metadata-flavor", HeaderValue::from_static("Google"));
    headers.insert(header::SERVER, HeaderValue::from_static(SERVER));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::X_XSS_PROTECTION, HeaderValue::from_static("0"));
    headers.insert(
        header::X_FRAME_OPTIONS,
        HeaderValue::from_static("SAMEORIGIN"),
    );
    res
}

/// A metadata value (200) with the `ETag` Google sends: a digest of the
/// body, so it changes exactly when the value does (long polls compare it).
pub fn value(content_type: &'static str, body: Bytes) -> Response<Body> {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(&body);
    let etag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut response = respond(StatusCode::OK, content_type, body);
    response.headers_mut().insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex is a valid header value"),
    );
    response
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, TEXT, body.into())
}

pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, JSON, body.into())
}

/// The exact refusal of a request under `/computeMetadata/v1` without the
/// flavor header (GKE's metadata server and its emulators).
pub const MISSING_FLAVOR: &str = "Missing required header \"Metadata-Flavor\": \"Google\"\n";

pub fn missing_flavor() -> Response<Body> {
    text(
        StatusCode::FORBIDDEN,
        Bytes::from_static(MISSING_FLAVOR.as_bytes()),
    )
}

/// GCE refuses anything a proxy forwarded: the caller must be the pod itself.
pub fn forwarded() -> Response<Body> {
    text(
        StatusCode::FORBIDDEN,
        Bytes::from_static(
            b"Request refused: the metadata server does not accept requests carrying \
              X-Forwarded-For; call it directly, not through a proxy\n",
        ),
    )
}

pub fn method_not_allowed() -> Response<Body> {
    let mut res = text(
        StatusCode::METHOD_NOT_ALLOWED,
        Bytes::from_static(b"Method Not Allowed: the metadata server answers GET and HEAD\n"),
    );
    res.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    res
}

pub fn bad_request(message: &str) -> Response<Body> {
    text(StatusCode::BAD_REQUEST, format!("{message}\n"))
}

/// 301 to the directory form of `path`, keeping the query. The Location is
/// path-absolute so it resolves against whatever host the client used (the
/// IP, `metadata.google.internal`, or `GCE_METADATA_HOST`).
pub fn redirect_to_directory(path: &str, query: Option<&str>) -> Response<Body> {
    let mut location = String::with_capacity(path.len() + 2 + query.map_or(0, str::len));
    location.push_str(path);
    location.push('/');
    if let Some(q) = query {
        location.push('?');
        location.push_str(q);
    }
    let body = format!(
        "<a href=\"{}\">Moved Permanently</a>.\n\n",
        html_escape(&location)
    );
    let mut res = respond(StatusCode::MOVED_PERMANENTLY, HTML, body.into());
    // The path and query come from a parsed request URI: valid header bytes.
    if let Ok(value) = HeaderValue::try_from(location) {
        res.headers_mut().insert(header::LOCATION, value);
    }
    res
}

/// Google's own 404 page, as GCE's metadata server returns it for any path
/// it does not serve (Go maps the 404 to `NotDefinedError`; Python treats a
/// 404 on `universe/universe-domain` as the default universe).
pub fn not_found(path: &str) -> Response<Body> {
    let body = format!(
        "<!DOCTYPE html>\n\
         <html lang=en>\n  \
         <meta charset=utf-8>\n  \
         <meta name=viewport content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n  \
         <title>Error 404 (Not Found)!!1</title>\n  \
         <a href=//www.google.com/><span id=logo aria-label=Google></span></a>\n  \
         <p><b>404.</b> <ins>That\u{2019}s an error.</ins>\n  \
         <p>The requested URL <code>{}</code> was not found on this server.  \
         <ins>That\u{2019}s all we know.</ins>\n",
        html_escape(path)
    );
    respond(StatusCode::NOT_FOUND, HTML, body.into())
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A caller that could not be identified.
///
/// Transient failures (the pod is seconds old, the API server is slow) are
/// 503, which Python's google-auth and Go's client retry; GKE's docs warn its
/// server too needs a few seconds for a new pod. Permanent refusals are 403
/// (hostNetwork, an IP claimed twice), or 404 when the pod's ServiceAccount
/// does not exist.
pub fn lookup_error(error: &LookupError) -> Response<Body> {
    let status = if error.is_transient() {
        StatusCode::SERVICE_UNAVAILABLE
    } else if matches!(error, LookupError::ServiceAccountNotFound { .. }) {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::FORBIDDEN
    };
    text(status, format!("metabridge: {error}\n"))
}

/// A credential that could not be handed out, mapped once:
///
/// - `NotConfigured` → 404 with its message (GKE answers `identity` for an
///   unannotated ServiceAccount this way, naming the annotation to add);
/// - `InvalidAnnotation` → 403 with its message;
/// - a failed Kubernetes TokenRequest → 503 when retryable, else 403;
/// - an upstream refusal → its own 4xx (429 stays 429), and 5xx or no answer
///   at all → 503, so SDKs that retry 429/503 do;
/// - an identity at its limit of distinct credentials → 429.
///
/// Errors from services are JSON `{"error","error_description"}` (the OAuth
/// shape Google's STS uses), the description naming the service, its status
/// and its reason.
pub fn credential_error(error: &CredentialError) -> Response<Body> {
    match error {
        CredentialError::NotConfigured { message } => {
            text(StatusCode::NOT_FOUND, format!("{message}\n"))
        }
        CredentialError::InvalidAnnotation { message } => {
            text(StatusCode::FORBIDDEN, format!("{message}\n"))
        }
        CredentialError::KubeToken { .. } => {
            let status = if error.is_retryable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::FORBIDDEN
            };
            error_json(status, "kubernetes_token_request_failed", error)
        }
        CredentialError::Upstream { status, code, .. } => {
            let mapped = match status {
                Some(s @ 400..=499) => StatusCode::from_u16(*s).unwrap_or(StatusCode::FORBIDDEN),
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let code = if code.is_empty() {
                "upstream_error"
            } else {
                code
            };
            error_json(mapped, code, error)
        }
        CredentialError::TooManyCredentials { .. } => {
            error_json(StatusCode::TOO_MANY_REQUESTS, "too_many_credentials", error)
        }
    }
}

fn error_json(status: StatusCode, code: &str, error: &CredentialError) -> Response<Body> {
    let body = serde_json::json!({
        "error": code,
        "error_description": error.to_string(),
    });
    json(status, body.to_string())
}
