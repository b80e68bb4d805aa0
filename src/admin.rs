//! The admin listener: liveness, readiness and Prometheus metrics, on a port
//! separate from the metadata listener so pods never reach it through the
//! interception rules.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{Method, Request, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{
    metrics::Metrics,
    server::{Body, plain},
};

/// What readiness waits for.
#[derive(Clone)]
pub struct Readiness {
    pub pods_synced: tokio::sync::watch::Receiver<bool>,
    pub rules_installed: tokio::sync::watch::Receiver<bool>,
}

impl Readiness {
    /// `Ok` when ready, else the reason.
    pub fn check(&self) -> Result<(), &'static str> {
        if !*self.pods_synced.borrow() {
            return Err("pod index not synced yet");
        }
        if !*self.rules_installed.borrow() {
            return Err("interception rules not in place");
        }
        Ok(())
    }
}

pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let state = Arc::new((readiness, metrics));
    let mut http = hyper::server::conn::http1::Builder::new();
    // Port scanners and stuck scrapers must not pin connections.
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .max_buf_size(16 * 1024);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state.0, &state.1, &req)) }
            }),
        );
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn respond(
    readiness: &Readiness,
    metrics: &Metrics,
    req: &Request<Incoming>,
) -> http::Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
    }
    match req.uri().path() {
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/readyz" => match readiness.check() {
            Ok(()) => plain(StatusCode::OK, "ready\n"),
            Err(reason) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        "/metrics" => {
            let mut res = plain(StatusCode::OK, metrics.render());
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            res
        }
        _ => plain(StatusCode::NOT_FOUND, "Not Found\n"),
    }
}
