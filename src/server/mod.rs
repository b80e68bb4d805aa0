//! The metadata listener: a hardened HTTP/1.1 server facing every pod on the
//! node, and the routing of each request to an API by path.
//!
//! The caller is the TCP peer address and nothing else: no header can claim an
//! identity.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    credentials::{Budgeted, Credentials},
    gce::GceApi,
    imds::ImdsApi,
    metrics::Metrics,
    pods::Resolver,
};

pub type Body = Full<Bytes>;

/// Longest request target accepted; real metadata paths are far shorter.
const MAX_URI_LEN: usize = 2048;
/// Bound on request headers: count and total bytes.
const MAX_HEADERS: usize = 64;
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// A response and the bounded route name it is counted under.
pub struct Answer {
    pub route: &'static str,
    pub response: Response<Body>,
}

impl Answer {
    pub fn new(route: &'static str, response: Response<Body>) -> Self {
        Self { route, response }
    }
}

/// A `text/plain` response.
pub fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// A JSON response.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

pub struct Router {
    pub gce: Option<Arc<GceApi<Budgeted<Credentials>, Resolver>>>,
    pub imds: Option<Arc<ImdsApi<Budgeted<Credentials>, Resolver>>>,
    pub resolver: Resolver,
    pub whoami: bool,
}

impl Router {
    pub async fn route(
        &self,
        parts: &http::request::Parts,
        peer: IpAddr,
    ) -> (&'static str, Answer) {
        if let Some(refusal) = refuse_malformed(parts) {
            return ("none", refusal);
        }
        let path = parts.uri.path();
        if path == "/" {
            // GCE clients probe `/` to detect the metadata server; IMDS has
            // its own root listing.
            if let Some(gce) = &self.gce {
                return ("gce", gce.handle(parts, peer).await);
            }
            if let Some(imds) = &self.imds {
                return ("imds", imds.handle(parts, peer).await);
            }
        } else if path == "/computeMetadata" || path.starts_with("/computeMetadata/") {
            if let Some(gce) = &self.gce {
                return ("gce", gce.handle(parts, peer).await);
            }
        } else if path == "/latest" || path.starts_with("/latest/") {
            if let Some(imds) = &self.imds {
                return ("imds", imds.handle(parts, peer).await);
            }
        } else if path == "/metabridge/v1/whoami" && self.whoami {
            return ("none", self.whoami(parts, peer).await);
        } else if let Some(gce) = &self.gce {
            // Everything else GCE-shaped (legacy versions, typos) gets the
            // GCE server's own 404.
            return ("gce", gce.handle(parts, peer).await);
        }
        (
            "none",
            Answer::new("not_found", plain(StatusCode::NOT_FOUND, "Not Found\n")),
        )
    }

    async fn whoami(&self, parts: &http::request::Parts, peer: IpAddr) -> Answer {
        if parts.method != Method::GET {
            return Answer::new(
                "whoami",
                plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n"),
            );
        }
        match self.resolver.resolve(peer).await {
            Ok(caller) => {
                let body = serde_json::json!({
                    "ip": peer.to_string(),
                    "namespace": caller.pod.namespace,
                    "pod": caller.pod.name,
                    "uid": caller.pod.uid,
                    "serviceAccount": caller.service_account.name,
                    "annotations": caller.service_account.annotations,
                });
                Answer::new("whoami", json(StatusCode::OK, body.to_string()))
            }
            Err(error) => {
                let status = if error.is_transient() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::FORBIDDEN
                };
                let body =
                    serde_json::json!({ "ip": peer.to_string(), "error": error.to_string() });
                Answer::new("whoami", json(status, body.to_string()))
            }
        }
    }
}

/// Refuses requests no metadata client sends: oversized or non-canonical
/// paths (dot segments, empty segments, encoded separators) that could make
/// two spellings of one path be treated differently.
fn refuse_malformed(parts: &http::request::Parts) -> Option<Answer> {
    let uri = &parts.uri;
    let len = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    if len > MAX_URI_LEN {
        return Some(Answer::new(
            "malformed",
            plain(StatusCode::URI_TOO_LONG, "Request-URI Too Long\n"),
        ));
    }
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Some(Answer::new(
            "malformed",
            plain(
                StatusCode::BAD_REQUEST,
                "absolute-form request targets are not accepted\n",
            ),
        ));
    }
    let path = uri.path();
    // Lower-cased copy only for the rare path that has escapes at all.
    let encoded_separator = path.contains('%') && {
        let lower = path.to_ascii_lowercase();
        lower.contains("%2f") || lower.contains("%2e") || lower.contains("%5c")
    };
    let bad = !path.starts_with('/')
        || path.contains("//")
        || path.split('/').any(|seg| seg == "." || seg == "..")
        || encoded_separator
        || path.contains('\\');
    if bad {
        return Some(Answer::new(
            "malformed",
            plain(StatusCode::BAD_REQUEST, "non-canonical request path\n"),
        ));
    }
    None
}

pub struct ServerLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub connection_max_age: Duration,
}

/// Serves metadata requests on `listener` until `shutdown` resolves, then
/// lets in-flight connections finish (the caller bounds that with a grace).
pub async fn serve(
    listener: TcpListener,
    router: Arc<Router>,
    limits: ServerLimits,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()>,
) -> tokio::task::JoinSet<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .half_close(false);
    let http = Arc::new(http);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let metrics = metrics.clone();
        let http = http.clone();
        let mut stop = stop_rx.clone();
        let max_age = limits.connection_max_age;
        connections.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let router = router.clone();
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(handle(&router, &metrics, req, peer).await) }
            });
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let age = tokio::time::sleep(max_age);
            tokio::pin!(age);
            let mut draining = false;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(error) = res {
                            tracing::debug!(%error, %peer, "connection ended with an error");
                        }
                        break;
                    }
                    _ = &mut age, if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = stop.wait_for(|s| *s), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    let _ = stop_tx.send(true);
    connections
}

async fn handle(
    router: &Router,
    metrics: &Metrics,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let start = tokio::time::Instant::now();
    let (parts, _body) = req.into_parts();
    // IPv4 peers on a dual-stack socket arrive as ::ffff:a.b.c.d.
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    let (api, answer) = router.route(&parts, ip).await;
    let status = answer.response.status();
    metrics
        .requests
        .with_label_values(&[api, answer.route, status.as_str()])
        .inc();
    metrics
        .request_duration
        .with_label_values(&[api, answer.route])
        .observe(start.elapsed().as_secs_f64());
    tracing::debug!(%ip, method = %parts.method, path = parts.uri.path(), status = status.as_u16(), api, route = answer.route, "request");
    answer.response
}

/// What the GCE and IMDS API tests need to call `handle` and read the answer.
#[cfg(test)]
pub(crate) mod testing {
    use http::{HeaderMap, Request, StatusCode, request::Parts};
    use http_body_util::BodyExt;

    use super::Answer;

    /// The request head of `method uri` with `headers`.
    pub fn request_parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    /// An [`Answer`] with its body read.
    pub struct Reply {
        pub route: &'static str,
        pub status: StatusCode,
        pub headers: HeaderMap,
        pub body: String,
    }

    impl Reply {
        pub async fn of(answer: Answer) -> Self {
            let (head, body) = answer.response.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            Self {
                route: answer.route,
                status: head.status,
                headers: head.headers,
                body: String::from_utf8(body.to_vec()).unwrap(),
            }
        }

        /// The header's value, or "" when absent.
        pub fn header(&self, name: &str) -> &str {
            self.headers
                .get(name)
                .map(|v| v.to_str().unwrap())
                .unwrap_or("")
        }

        pub fn parse_json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> http::request::Parts {
        Request::builder().uri(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn refuses_non_canonical_paths() {
        for uri in [
            "/computeMetadata/v1/../v1/x",
            "/latest//meta-data",
            "/latest/meta-data/%2e%2e/x",
            "/latest/meta-data%2Fiam",
            "/./latest",
            "http://evil/latest/",
        ] {
            let refusal = refuse_malformed(&parts(uri)).unwrap_or_else(|| panic!("{uri} accepted"));
            assert_eq!(refusal.response.status(), StatusCode::BAD_REQUEST, "{uri}");
        }
        let long = format!("/latest/{}", "a".repeat(3000));
        assert_eq!(
            refuse_malformed(&parts(&long)).unwrap().response.status(),
            StatusCode::URI_TOO_LONG
        );
        for uri in [
            "/",
            "/computeMetadata/v1/instance/service-accounts/default/token?scopes=a,b",
            "/latest/api/token",
        ] {
            assert!(refuse_malformed(&parts(uri)).is_none(), "{uri} refused");
        }
    }
}
