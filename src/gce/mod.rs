//! The GCE metadata API (`/`, `/computeMetadata/v1/…`), as GKE's metadata
//! server answers pods under workload identity: the same paths, headers,
//! status codes and bodies, each pod's credentials minted from its own
//! Kubernetes service account.
//!
//! One request, top to bottom ([`GceApi::handle`]):
//!
//! 1. refusals every path shares: `X-Forwarded-For` (403), then, under
//!    `/computeMetadata/v1`, a missing `Metadata-Flavor: Google` (403) and
//!    methods other than GET/HEAD (405);
//! 2. the hot path: `instance/service-accounts/SA/token` and `…/identity`
//!    identify the caller, ask the [`GoogleCredentialSource`] and answer its
//!    pre-rendered bytes — no tree is built;
//! 3. everything else walks a small directory tree ([`tree`]) built from the
//!    [`GceSettings`], the Node's facts and, only when the path depends on it,
//!    the caller: directory redirects, listings, `?recursive=true`, `?alt=`.
//!
//! Errors are mapped once, in [`wire`].

mod settings;
mod tree;
mod wire;

#[cfg(test)]
mod tests;

use std::{
    borrow::Cow,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, StatusCode, request::Parts};
use parking_lot::RwLock;
use percent_encoding::percent_decode_str;
use tokio::sync::Semaphore;

pub use settings::{DEFAULT_SCOPES, GceSettings, instance_id};
pub use wire::{MISSING_FLAVOR, SERVER};

use self::tree::{Entry, Value};
use crate::{
    credentials::{CredentialError, GoogleAccessToken, GoogleCredentialSource, GoogleIdToken},
    pods::{Caller, GCP_SERVICE_ACCOUNT_ANNOTATION, Identify, NodeFacts, Resolver},
    server::Answer,
};

/// The GCE metadata API over a credential source `S` and a caller
/// identification `I`.
///
/// NB: the defaults exist so the router can name `GceApi` before the
/// credential cache is wired in; `S` is meant to be the cache.
pub struct GceApi<S = NoCredentials, I = Resolver> {
    settings: GceSettings,
    source: Arc<S>,
    identify: I,
    /// The Node's labels and providerID (zone, instance id), kept current by
    /// the node watch; read-locked only for the copy of a string.
    node: Arc<RwLock<NodeFacts>>,
    /// Wall clock for `expires_in`; replaceable in tests.
    clock: fn() -> SystemTime,
    /// Bounds the `?wait_for_change=true` requests held at once, so that
    /// long polls cannot take every connection the listener allows.
    long_polls: Arc<Semaphore>,
}

/// How long a long poll without `timeout_sec` is held.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// The most a long poll is held, whatever `timeout_sec` asks.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// Long polls held at once; more are answered at once.
pub const MAX_LONG_POLLS: usize = 256;
const WAIT_POLL: Duration = Duration::from_secs(1);

/// A tree request, as parsed once and looked at again by a long poll.
#[derive(Clone, Copy)]
struct View<'a> {
    path: &'a str,
    segments: &'a [Cow<'a, str>],
    directory_form: bool,
    recursive: bool,
    alt: Option<Alt>,
    query: Option<&'a str>,
}

/// What a `?…` query asks of a metadata path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alt {
    Json,
    Text,
}

// === impl GceApi ===

impl<S: GoogleCredentialSource, I: Identify> GceApi<S, I> {
    pub fn new(
        settings: GceSettings,
        source: Arc<S>,
        identify: I,
        node: Arc<RwLock<NodeFacts>>,
    ) -> Self {
        Self {
            settings,
            source,
            identify,
            node,
            clock: SystemTime::now,
            long_polls: Arc::new(Semaphore::new(MAX_LONG_POLLS)),
        }
    }

    /// Replaces the clock `expires_in` is counted against.
    pub fn with_clock(mut self, clock: fn() -> SystemTime) -> Self {
        self.clock = clock;
        self
    }

    pub fn settings(&self) -> &GceSettings {
        &self.settings
    }

    /// Answers one request from `peer` (the TCP source address, the only
    /// thing that identifies a caller).
    pub async fn handle(&self, parts: &Parts, peer: IpAddr) -> Answer {
        // A proxy in between would make the proxy, not the pod, the caller.
        if parts.headers.contains_key("x-forwarded-for") {
            return Answer::new("forbidden", wire::forwarded());
        }
        let path = parts.uri.path();
        let query = parts.uri.query();
        let readable = parts.method == Method::GET || parts.method == Method::HEAD;
        match path {
            // The detection probe: Go sends no flavor header here.
            "/" | "/computeMetadata/" => {
                if !readable {
                    return Answer::new("method_not_allowed", wire::method_not_allowed());
                }
                let body: &'static str = if path == "/" {
                    wire::ROOT_LISTING
                } else {
                    "v1/\n"
                };
                return Answer::new(
                    "root",
                    wire::text(StatusCode::OK, Bytes::from_static(body.as_bytes())),
                );
            }
            "/computeMetadata" => {
                if !readable {
                    return Answer::new("method_not_allowed", wire::method_not_allowed());
                }
                return Answer::new("redirect", wire::redirect_to_directory(path, query));
            }
            _ => {}
        }
        let rest = match path.strip_prefix("/computeMetadata/v1") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            // Legacy versions (0.1, v1beta1) and anything else: GKE serves none.
            _ => return Answer::new("not_found", wire::not_found(path)),
        };
        if !has_flavor(parts) {
            return Answer::new("forbidden", wire::missing_flavor());
        }
        if !readable {
            return Answer::new("method_not_allowed", wire::method_not_allowed());
        }
        match rest.strip_prefix('/') {
            None => Answer::new("redirect", wire::redirect_to_directory(path, query)),
            Some(relative) => self.metadata(path, relative, query, peer).await,
        }
    }

    /// A path below `/computeMetadata/v1/`.
    async fn metadata(
        &self,
        path: &str,
        relative: &str,
        query: Option<&str>,
        peer: IpAddr,
    ) -> Answer {
        let directory_form = relative.is_empty() || relative.ends_with('/');
        let trimmed = relative.strip_suffix('/').unwrap_or(relative);
        let mut segments: Vec<Cow<'_, str>> = Vec::with_capacity(4);
        if !trimmed.is_empty() {
            for raw in trimmed.split('/') {
                // Clients may percent-encode the `@` of an email; the router
                // has already refused encoded separators and dots.
                match percent_decode_str(raw).decode_utf8() {
                    Ok(segment) => segments.push(segment),
                    Err(_) => return Answer::new("not_found", wire::not_found(path)),
                }
            }
        }

        // The hot path: credentials, answered without building a tree.
        if let [instance, accounts, account, endpoint] = segments.as_slice()
            && !directory_form
            && instance == "instance"
            && accounts == "service-accounts"
        {
            match endpoint.as_ref() {
                "token" => return self.token(path, account, query, peer).await,
                "identity" => return self.identity(path, account, query, peer).await,
                _ => {}
            }
        }

        let mut recursive = false;
        let mut alt = None;
        let mut wait_for_change = false;
        let mut last_etag: Option<Cow<'_, str>> = None;
        let mut timeout = DEFAULT_WAIT;
        for (key, value) in parse_query(query) {
            match key.as_ref() {
                "recursive" => recursive = value.eq_ignore_ascii_case("true"),
                "alt" => {
                    alt = match value.as_ref() {
                        "json" => Some(Alt::Json),
                        "text" => Some(Alt::Text),
                        other => {
                            return Answer::new(
                                "bad_request",
                                wire::bad_request(&format!(
                                    "invalid alt parameter {other:?}: expected json or text"
                                )),
                            );
                        }
                    }
                }
                "wait_for_change" => wait_for_change = value.eq_ignore_ascii_case("true"),
                "last_etag" => last_etag = Some(value),
                "timeout_sec" => match value.parse::<u64>() {
                    Ok(seconds) => timeout = Duration::from_secs(seconds).min(MAX_WAIT),
                    Err(_) => {
                        return Answer::new(
                            "bad_request",
                            wire::bad_request(&format!(
                                "invalid timeout_sec parameter {value:?}: expected whole seconds"
                            )),
                        );
                    }
                },
                // Anything else is tolerated, as Google does.
                _ => {}
            }
        }

        let view = View {
            path,
            segments: &segments,
            directory_form,
            recursive,
            alt,
            query,
        };
        let answer = self.view(&view, peer).await;
        if !wait_for_change {
            return answer;
        }
        // A long poll (Go's `metadata.Subscribe`): hold the answer until its
        // ETag differs from the one the client has, or the timeout passes —
        // then answer the current value, as Google does. Answering at once
        // would turn every subscriber into a busy loop against us.
        let Some(current) = etag_of(&answer) else {
            return answer; // errors and redirects are answered at once
        };
        let seen = last_etag.map(Cow::into_owned).unwrap_or(current);
        let Ok(_waiter) = self.long_polls.clone().try_acquire_owned() else {
            // Too many pods already waiting: an immediate answer is still correct.
            return answer;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut answer = answer;
        while etag_of(&answer).as_deref() == Some(seen.as_str()) {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            // Values change only with the Node or a ServiceAccount: looking
            // again once a second is prompt enough and costs one tree walk.
            tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
            answer = self.view(&view, peer).await;
        }
        answer
    }

    /// The answer for a tree path (everything but the credential endpoints),
    /// with its `ETag`.
    async fn view(&self, view: &View<'_>, peer: IpAddr) -> Answer {
        let View {
            path,
            segments,
            directory_form,
            recursive,
            alt,
            query,
        } = *view;
        let route = route_of(segments);
        // The caller is identified only when the answer depends on it: the
        // service-account subtree, or a recursive answer that contains it.
        let in_accounts =
            segments.len() >= 2 && segments[0] == "instance" && segments[1] == "service-accounts";
        let contains_accounts = recursive
            && (segments.is_empty() || (segments.len() == 1 && segments[0] == "instance"));
        let caller = if in_accounts || contains_accounts {
            match self.identify.identify(peer).await {
                Ok(caller) => Some(caller),
                Err(error) => {
                    tracing::debug!(%peer, %error, "caller not identified");
                    return Answer::new(route, wire::lookup_error(&error));
                }
            }
        } else {
            None
        };

        let root = self.tree(caller.as_ref());
        let Some(node) = root.walk(segments) else {
            return Answer::new("not_found", wire::not_found(path));
        };
        let (content_type, body): (&'static str, Bytes) = match (node, directory_form) {
            (Value::Dir(_), false) => {
                return Answer::new("redirect", wire::redirect_to_directory(path, query));
            }
            (Value::Dir(_), true) => match (recursive, alt) {
                (true, Some(Alt::Text)) => (wire::TEXT, node.recursive_text().into()),
                (true, _) => (wire::JSON, node.to_json().to_string().into()),
                (false, Some(Alt::Json)) => (wire::JSON, node.listing_json().to_string().into()),
                (false, _) => (wire::TEXT, node.listing().into()),
            },
            // A leaf asked for as a directory, or a credential endpoint with a
            // trailing slash.
            (_, true) | (Value::Credential, _) => {
                return Answer::new("not_found", wire::not_found(path));
            }
            (leaf, false) => match alt {
                Some(Alt::Json) => (wire::JSON, leaf.to_json().to_string().into()),
                _ => (wire::TEXT, leaf.leaf_text().into()),
            },
        };
        Answer::new(route, wire::value(content_type, body))
    }

    /// `instance/service-accounts/ACCOUNT/token?scopes=a,b`.
    async fn token(&self, path: &str, account: &str, query: Option<&str>, peer: IpAddr) -> Answer {
        // Comma-separated and trimmed; repeated `scopes=` add up. Everything
        // else (transport, binding-enforcement, bindCertificateFingerprint,
        // unknown keys) is tolerated and ignored.
        let mut scopes: Vec<String> = Vec::new();
        for (key, value) in parse_query(query) {
            if key == "scopes" {
                for scope in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    if !scopes.iter().any(|s| s == scope) {
                        scopes.push(scope.to_string());
                    }
                }
            }
        }
        let caller = match self.caller_for(path, account, peer, "token").await {
            Ok(caller) => caller,
            Err(answer) => return answer,
        };
        let token: Result<Arc<GoogleAccessToken>, CredentialError> =
            self.source.access_token(&caller, &scopes).await;
        match token {
            Ok(token) => Answer::new(
                "token",
                wire::json(StatusCode::OK, token.body((self.clock)())),
            ),
            Err(error) => {
                tracing::debug!(%peer, pod = %caller.pod.key(), %error, "no access token");
                Answer::new("token", wire::credential_error(&error))
            }
        }
    }

    /// `instance/service-accounts/ACCOUNT/identity?audience=…&format=…`.
    async fn identity(
        &self,
        path: &str,
        account: &str,
        query: Option<&str>,
        peer: IpAddr,
    ) -> Answer {
        let mut audience = Cow::Borrowed("");
        let mut full = false;
        for (key, value) in parse_query(query) {
            match key.as_ref() {
                "audience" => audience = value,
                "format" => match value.as_ref() {
                    "standard" | "" => full = false,
                    "full" => full = true,
                    other => {
                        return Answer::new(
                            "identity",
                            wire::bad_request(&format!(
                                "invalid format parameter {other:?}: expected standard or full"
                            )),
                        );
                    }
                },
                // `licenses` only matters for VM license claims; accepted.
                _ => {}
            }
        }
        if audience.trim().is_empty() {
            return Answer::new(
                "identity",
                wire::bad_request("non-empty audience parameter required"),
            );
        }
        let caller = match self.caller_for(path, account, peer, "identity").await {
            Ok(caller) => caller,
            Err(answer) => return answer,
        };
        let token: Result<Arc<GoogleIdToken>, CredentialError> =
            self.source.id_token(&caller, &audience, full).await;
        match token {
            Ok(token) => Answer::new("identity", wire::text(StatusCode::OK, token.token.clone())),
            Err(error) => {
                tracing::debug!(%peer, pod = %caller.pod.key(), %error, "no identity token");
                Answer::new("identity", wire::credential_error(&error))
            }
        }
    }

    /// The caller, provided `account` names it (`default` or its email).
    async fn caller_for(
        &self,
        path: &str,
        account: &str,
        peer: IpAddr,
        route: &'static str,
    ) -> Result<Caller, Answer> {
        let caller = self.identify.identify(peer).await.map_err(|error| {
            tracing::debug!(%peer, %error, "caller not identified");
            Answer::new(route, wire::lookup_error(&error))
        })?;
        if account == "default" || account == self.email(&caller) {
            Ok(caller)
        } else {
            Err(Answer::new("not_found", wire::not_found(path)))
        }
    }

    /// The caller's email: the Google service account its ServiceAccount is
    /// annotated with, else the pool's name (direct resource access).
    fn email<'a>(&'a self, caller: &'a Caller) -> &'a str {
        caller
            .service_account
            .annotation(GCP_SERVICE_ACCOUNT_ANNOTATION)
            .unwrap_or(&self.settings.direct_access_email)
    }

    /// The metadata tree. Without a caller the service-account directory is
    /// listed but empty; the handler identifies the caller whenever the
    /// answer reaches into it.
    fn tree(&self, caller: Option<&Caller>) -> Value {
        let settings = &self.settings;
        let (zone, provider_id) = {
            let node = self.node.read();
            (
                node.zone().map(str::to_string),
                node.provider_id.clone().filter(|p| !p.is_empty()),
            )
        };
        let zone = zone.or_else(|| settings.cluster_location.clone());
        let id = instance_id(provider_id.as_deref().unwrap_or(&settings.node_name));

        let mut attributes = Vec::new();
        if let Some(location) = &settings.cluster_location {
            attributes.push(Entry::verbatim(
                "cluster-location",
                Value::Text(location.clone().into()),
            ));
        }
        if let Some(name) = &settings.cluster_name {
            attributes.push(Entry::verbatim(
                "cluster-name",
                Value::Text(name.clone().into()),
            ));
        }

        let mut accounts = Vec::new();
        if let Some(caller) = caller {
            let email = self.email(caller).to_string();
            accounts.push(Entry::verbatim("default", account(&email)));
            accounts.push(Entry::verbatim(email.clone(), account(&email)));
        }

        let mut instance = vec![
            Entry::key("attributes", Value::Dir(attributes)),
            Entry::key("hostname", Value::Text(settings.node_name.clone().into())),
            Entry::key("id", Value::Int(id)),
            Entry::key("service-accounts", Value::Dir(accounts)),
        ];
        if let Some(zone) = zone {
            instance.push(Entry::key(
                "zone",
                Value::Text(
                    format!("projects/{}/zones/{zone}", settings.numeric_project_id).into(),
                ),
            ));
        }
        let project = vec![
            Entry::key(
                "numeric-project-id",
                Value::Int(settings.numeric_project_id),
            ),
            Entry::key(
                "project-id",
                Value::Text(settings.project_id.clone().into()),
            ),
        ];
        Value::Dir(vec![
            Entry::key("instance", Value::Dir(instance)),
            Entry::key("project", Value::Dir(project)),
        ])
    }
}

/// One account's directory: what GKE serves under `default/` and `EMAIL/`.
fn account(email: &str) -> Value {
    Value::Dir(vec![
        Entry::key("aliases", Value::Lines(vec![Cow::Borrowed("default")])),
        Entry::key("email", Value::Text(email.to_string().into())),
        Entry::key("identity", Value::Credential),
        Entry::key(
            "scopes",
            Value::Lines(DEFAULT_SCOPES.iter().map(|s| Cow::Borrowed(*s)).collect()),
        ),
        Entry::key("token", Value::Credential),
    ])
}

/// The bounded metric route of a metadata path.
fn route_of(segments: &[Cow<'_, str>]) -> &'static str {
    let first = segments.first().map(|s| s.as_ref());
    let second = segments.get(1).map(|s| s.as_ref());
    match (first, second) {
        (None, _) => "root",
        (Some("project"), _) => "project",
        (Some("instance"), Some("attributes")) => "attributes",
        (Some("instance"), Some("service-accounts")) => match segments.get(3).map(|s| s.as_ref()) {
            Some("email") if segments.len() == 4 => "email",
            _ => "service_accounts",
        },
        (Some("instance"), _) => "instance",
        _ => "not_found",
    }
}

fn has_flavor(parts: &Parts) -> bool {
    parts
        .headers
        .get("metadata-flavor")
        .is_some_and(|v| v.as_bytes() == b"Google")
}

fn etag_of(answer: &Answer) -> Option<String> {
    let etag = answer.response.headers().get(http::header::ETAG)?;
    Some(etag.to_str().ok()?.to_owned())
}

fn parse_query(query: Option<&str>) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
}

/// A credential source that has none: every request is answered 404 naming
/// the problem. Stands in until the credential cache is wired to the router.
pub struct NoCredentials;

impl NoCredentials {
    fn error() -> CredentialError {
        CredentialError::NotConfigured {
            message: "metabridge: no Google credential source is configured on this node".into(),
        }
    }
}

impl GoogleCredentialSource for NoCredentials {
    async fn access_token(
        &self,
        _caller: &Caller,
        _scopes: &[String],
    ) -> Result<Arc<GoogleAccessToken>, CredentialError> {
        Err(Self::error())
    }

    async fn id_token(
        &self,
        _caller: &Caller,
        _audience: &str,
        _full: bool,
    ) -> Result<Arc<GoogleIdToken>, CredentialError> {
        Err(Self::error())
    }
}
