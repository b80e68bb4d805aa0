//! The AWS EC2 instance metadata API (`/latest/…`), as AWS SDKs' default
//! credential chains and region providers use it (research/aws.md §3–4).
//!
//! One request, top to bottom ([`ImdsApi::handle`]):
//!
//! 1. `PUT /latest/api/token` issues an IMDSv2 session token bound to the
//!    calling pod ([`token`]); any other method there is 405, and every other
//!    path takes only GET.
//! 2. A GET presents a token (checked: issued to this IP by this process,
//!    unexpired) or none (IMDSv1: served only with `--imds-allow-v1`).
//! 3. Paths whose answer is the same for every pod on the node (listings,
//!    placement, instance id) are answered from the configuration and the
//!    Node object without identifying the caller ([`instance`]).
//! 4. Paths whose answer depends on the caller (`iam/…`, the identity
//!    document's `accountId`) identify the pod by source IP, check that a
//!    token was minted for *this* pod (not an earlier one with the same IP),
//!    read the role from its ServiceAccount's `eks.amazonaws.com/role-arn`
//!    and, for credentials, ask the [`AwsCredentialSource`] (the cache).
//!
//! Wire choices, each as the real IMDS does unless noted:
//!
//! - Every 200 is `text/plain`, the credential JSON and the identity document
//!   included: the real IMDS sends `text/plain`, and no SDK looks at the
//!   content type (botocore, Go, JS and Rust all parse the body as JSON
//!   regardless), so there is nothing to gain by differing.
//! - Listings and the role name carry no trailing newline: botocore pastes the
//!   role-name body straight into the next URL.
//! - 401/404/405 carry the real IMDS's small XHTML page; refusals with
//!   something specific to say (no role annotation, bad TTL, pod unknown)
//!   carry a one-line `text/plain` message instead, for the person with curl.
//! - A credential refusal that retrying will not fix (STS `AccessDenied`,
//!   `InvalidIdentityToken`, a failed TokenRequest) is **200** with
//!   `{"Code":…,"Message":…,"LastUpdated":…}`, as the real IMDS reports a role
//!   EC2 cannot assume: Go and Rust then surface Code and Message to the
//!   user (Rust maps `AssumeRoleUnauthorizedAccess` to an "invalid
//!   configuration" error), botocore and JS treat it as "no credentials here"
//!   without retrying or hanging. STS's `AccessDenied` becomes
//!   `AssumeRoleUnauthorizedAccess` (exactly that situation); other codes pass
//!   through. Errors a retry may fix (throttling, 5xx, unreachable, pod not
//!   in the index yet) are **503** with a message: Go and Rust retry 5xx;
//!   botocore and JS give up on this attempt and try again on the next call.
//! - A caller the resolver refuses for good (IP claimed by several pods, its
//!   ServiceAccount missing) gets 404 on GET (Rust stops at once instead of
//!   retrying) and 403 on the token PUT, with the reason.

mod instance;
mod token;

#[cfg(test)]
mod tests;

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use parking_lot::RwLock;

use self::{
    instance::{
        CredentialsErrorBody, IamInfo, IdentityDocument, Instance, RoleArn, imds_time, instance_id,
    },
    token::{TokenKey, UidHash, uid_hash},
};
use crate::{
    config::RunConfig,
    credentials::{AwsCredentialSource, AwsSession, CredentialError},
    pods::{AWS_ROLE_ARN_ANNOTATION, Caller, Identify, LookupError, NodeFacts, Resolver},
    server::{Answer, Body, plain},
};

/// The IMDSv2 token endpoint.
const TOKEN_PATH: &str = "/latest/api/token";
/// Header carrying a session token on GETs.
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Header carrying the requested token lifetime on the PUT, echoed back.
const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Longest token lifetime IMDS grants (6 hours).
const MAX_TOKEN_TTL_SECS: u64 = 21_600;

/// What the IMDS API needs from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsSettings {
    /// `placement/region` and the region of the identity document.
    pub region: String,
    /// Serve GETs that carry no session token (IMDSv1).
    pub allow_v1: bool,
    /// This node's name; the instance id is derived from it.
    pub node_name: String,
}

impl ImdsSettings {
    /// The settings when `--aws-region` is set; an error naming the value
    /// otherwise.
    pub fn from_config(config: &RunConfig) -> Result<Self, String> {
        let region = config
            .aws
            .aws_region
            .as_deref()
            .map(str::trim)
            .ok_or_else(|| "--aws-region is required for the IMDS API".to_string())?;
        if !looks_like_region(region) {
            return Err(format!(
                "--aws-region {region:?}: not an AWS region name like us-east-1"
            ));
        }
        Ok(Self {
            region: region.to_string(),
            allow_v1: config.aws.imds_allow_v1,
            node_name: config.node_name.clone(),
        })
    }
}

/// `us-east-1`, `us-gov-west-1`, `cn-north-1`, `eu-central-2`: dash-separated
/// lowercase words ending in a number.
fn looks_like_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
}

/// Stand-in credential source until the credential cache is wired in: every
/// credential path answers that minting is unavailable (404, with that
/// message). Default type parameter of [`ImdsApi`] so the router's
/// `Option<Arc<ImdsApi>>` names a concrete type.
pub struct Unwired;

impl AwsCredentialSource for Unwired {
    async fn session(
        &self,
        _caller: &Caller,
        _role_arn: &str,
    ) -> Result<Arc<AwsSession>, CredentialError> {
        Err(CredentialError::NotConfigured {
            message: "AWS credential minting is not wired into this metabridge build".into(),
        })
    }
}

/// The AWS IMDS API: answers `/latest/…` (and `/` when the GCE API is off).
pub struct ImdsApi<S: AwsCredentialSource = Unwired, I: Identify = Resolver> {
    settings: ImdsSettings,
    source: Arc<S>,
    identify: I,
    node: Arc<RwLock<NodeFacts>>,
    tokens: TokenKey,
    /// `i-…`, fixed for the node.
    instance_id: String,
    /// The identity document's `pendingTime`: when this process started.
    pending_time: String,
}

/// How a GET authenticated.
#[derive(Debug, Clone, Copy)]
enum Auth {
    /// No token, IMDSv1 allowed.
    V1,
    /// A valid token minted for the pod whose uid hashes to this.
    Token(UidHash),
}

// === impl ImdsApi ===

impl<S: AwsCredentialSource, I: Identify> ImdsApi<S, I> {
    pub fn new(
        settings: ImdsSettings,
        source: Arc<S>,
        identify: I,
        node: Arc<RwLock<NodeFacts>>,
    ) -> Self {
        Self {
            instance_id: instance_id(&settings.node_name),
            pending_time: imds_time(SystemTime::now()),
            settings,
            source,
            identify,
            node,
            tokens: TokenKey::random(),
        }
    }

    /// Answers one request from `peer` (the TCP source address; nothing in
    /// the request can claim another).
    pub async fn handle(&self, parts: &http::request::Parts, peer: IpAddr) -> Answer {
        let path = parts.uri.path();
        if path == TOKEN_PATH {
            if parts.method == Method::PUT {
                return self.issue_token(parts, peer).await;
            }
            return method_not_allowed("PUT");
        }
        if parts.method != Method::GET {
            return method_not_allowed("GET");
        }
        let Some(auth) = self.authenticate(parts, peer) else {
            return unauthorized();
        };
        self.get(path, auth, peer).await
    }

    /// `PUT /latest/api/token`.
    async fn issue_token(&self, parts: &http::request::Parts, peer: IpAddr) -> Answer {
        const ROUTE: &str = "token";
        // A PUT that went through a proxy is not the pod's own: refuse, as
        // IMDS does, so a proxy in the pod cannot fetch tokens for others.
        if parts.headers.contains_key("x-forwarded-for") {
            return Answer::new(
                ROUTE,
                plain(
                    StatusCode::FORBIDDEN,
                    "IMDSv2 token requests carrying X-Forwarded-For are refused\n",
                ),
            );
        }
        let Some(ttl) = token_ttl(parts) else {
            return Answer::new(
                ROUTE,
                plain(
                    StatusCode::BAD_REQUEST,
                    "X-aws-ec2-metadata-token-ttl-seconds must be a whole number of seconds from 1 to 21600\n",
                ),
            );
        };
        let caller = match self.identify.identify(peer).await {
            Ok(caller) => caller,
            Err(error) => return lookup_failure(ROUTE, &error, StatusCode::FORBIDDEN),
        };
        let token = self
            .tokens
            .issue(peer, &caller.pod.uid, Duration::from_secs(ttl));
        let mut response = plain(StatusCode::OK, token);
        response
            .headers_mut()
            .insert(TOKEN_TTL_HEADER, HeaderValue::from(ttl));
        Answer::new(ROUTE, response)
    }

    /// Token check of a GET; `None` (answered 401) for a missing (v2
    /// required), malformed, foreign or expired token.
    fn authenticate(&self, parts: &http::request::Parts, peer: IpAddr) -> Option<Auth> {
        let mut tokens = parts.headers.get_all(TOKEN_HEADER).iter();
        match (tokens.next(), tokens.next()) {
            (None, _) => self.settings.allow_v1.then_some(Auth::V1),
            (Some(token), None) => match self.tokens.verify(token.as_bytes(), peer) {
                Ok(uid_hash) => Some(Auth::Token(uid_hash)),
                Err(why) => {
                    tracing::debug!(%peer, why = why.as_str(), "IMDS token refused");
                    None
                }
            },
            // Two tokens: which one would the pod mean? Neither.
            (Some(_), Some(_)) => None,
        }
    }

    async fn get(&self, path: &str, auth: Auth, peer: IpAddr) -> Answer {
        const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
        const CREDS_EXT: &str = "/latest/meta-data/iam/security-credentials-extended/";
        // IMDS answers a leaf asked for with a trailing slash as the leaf
        // itself (botocore's region lookup asks for
        // `placement/availability-zone/`); every directory arm below accepts
        // both spellings, so dropping one trailing slash is safe. Role names
        // stay exact: `security-credentials/ROLE/` is not a role.
        let path = match path.strip_suffix('/') {
            Some(leaf)
                if !leaf.is_empty() && !leaf.starts_with(CREDS) && !leaf.starts_with(CREDS_EXT) =>
            {
                leaf
            }
            _ => path,
        };
        match path {
            "/" => listing("latest"),
            "/latest" | "/latest/" => listing("dynamic\nmeta-data"),
            "/latest/meta-data" | "/latest/meta-data/" => self.meta_data_listing(),
            "/latest/meta-data/iam" | "/latest/meta-data/iam/" => {
                listing("info\nsecurity-credentials/")
            }
            "/latest/meta-data/iam/info" => self.iam_info(auth, peer).await,
            "/latest/meta-data/iam/security-credentials"
            | CREDS
            | "/latest/meta-data/iam/security-credentials-extended"
            | CREDS_EXT => self.role_name(auth, peer).await,
            _ if path.starts_with(CREDS) => {
                self.credentials(&path[CREDS.len()..], false, auth, peer)
                    .await
            }
            _ if path.starts_with(CREDS_EXT) => {
                self.credentials(&path[CREDS_EXT.len()..], true, auth, peer)
                    .await
            }
            "/latest/meta-data/placement" | "/latest/meta-data/placement/" => {
                listing("availability-zone\nregion")
            }
            "/latest/meta-data/placement/region" => {
                Answer::new("placement", ok(self.settings.region.clone()))
            }
            "/latest/meta-data/placement/availability-zone" => {
                Answer::new("placement", ok(self.instance().availability_zone))
            }
            "/latest/meta-data/instance-id" => {
                Answer::new("instance", ok(self.instance_id.clone()))
            }
            "/latest/meta-data/instance-type" => match self.instance().instance_type {
                Some(instance_type) => Answer::new("instance", ok(instance_type)),
                None => not_found(),
            },
            "/latest/meta-data/local-ipv4" => match self.instance().local_ipv4 {
                Some(ip) => Answer::new("instance", ok(ip)),
                None => not_found(),
            },
            "/latest/dynamic" | "/latest/dynamic/" => listing("instance-identity/"),
            "/latest/dynamic/instance-identity" | "/latest/dynamic/instance-identity/" => {
                listing("document")
            }
            "/latest/dynamic/instance-identity/document" => {
                self.identity_document(auth, peer).await
            }
            _ => not_found(),
        }
    }

    fn instance(&self) -> Instance {
        Instance::new(&self.settings.region, &self.instance_id, &self.node.read())
    }

    fn meta_data_listing(&self) -> Answer {
        let instance = self.instance();
        let mut entries = vec!["iam/", "instance-id"];
        if instance.instance_type.is_some() {
            entries.push("instance-type");
        }
        if instance.local_ipv4.is_some() {
            entries.push("local-ipv4");
        }
        entries.push("placement/");
        listing(entries.join("\n"))
    }

    /// Identifies the caller of a caller-dependent path and checks that its
    /// token (if any) was minted for this very pod.
    async fn caller(
        &self,
        route: &'static str,
        auth: Auth,
        peer: IpAddr,
    ) -> Result<Caller, Answer> {
        let caller = self
            .identify
            .identify(peer)
            .await
            .map_err(|error| lookup_failure(route, &error, StatusCode::NOT_FOUND))?;
        if let Auth::Token(bound) = auth
            && bound != uid_hash(&caller.pod.uid)
        {
            tracing::debug!(%peer, pod = %caller.pod.key(), "IMDS token minted for an earlier pod with this IP");
            return Err(unauthorized());
        }
        Ok(caller)
    }

    /// `…/security-credentials/` (and `-extended/`): the role's name.
    async fn role_name(&self, auth: Auth, peer: IpAddr) -> Answer {
        const ROUTE: &str = "role_name";
        let caller = match self.caller(ROUTE, auth, peer).await {
            Ok(caller) => caller,
            Err(answer) => return answer,
        };
        match role_of(&caller) {
            Ok(role) => Answer::new(ROUTE, ok(role.name.to_string())),
            Err(message) => Answer::new(ROUTE, plain(StatusCode::NOT_FOUND, message)),
        }
    }

    /// `…/security-credentials[-extended]/<role>`.
    async fn credentials(
        &self,
        requested: &str,
        extended: bool,
        auth: Auth,
        peer: IpAddr,
    ) -> Answer {
        let route = if extended {
            "credentials_extended"
        } else {
            "credentials"
        };
        let caller = match self.caller(route, auth, peer).await {
            Ok(caller) => caller,
            Err(answer) => return answer,
        };
        let role = match role_of(&caller) {
            Ok(role) => role,
            Err(message) => return Answer::new(route, plain(StatusCode::NOT_FOUND, message)),
        };
        let requested = percent_encoding::percent_decode_str(requested).decode_utf8_lossy();
        if requested != role.name {
            // Another role: as IMDS, which only knows its own.
            return Answer::new(route, imds_page(StatusCode::NOT_FOUND));
        }
        match self.source.session(&caller, role.arn).await {
            Ok(session) => {
                let body = if extended {
                    session.imds_extended_body.clone()
                } else {
                    session.imds_body.clone()
                };
                Answer::new(route, ok(body))
            }
            Err(error) => credential_failure(route, &error, &caller, &role),
        }
    }

    /// `iam/info`.
    async fn iam_info(&self, auth: Auth, peer: IpAddr) -> Answer {
        const ROUTE: &str = "iam_info";
        let caller = match self.caller(ROUTE, auth, peer).await {
            Ok(caller) => caller,
            Err(answer) => return answer,
        };
        let role = match role_of(&caller) {
            Ok(role) => role,
            Err(message) => return Answer::new(ROUTE, plain(StatusCode::NOT_FOUND, message)),
        };
        let info = IamInfo {
            code: "Success",
            last_updated: imds_time(SystemTime::now()),
            instance_profile_arn: role.instance_profile_arn(),
            instance_profile_id: role.instance_profile_id(),
        };
        Answer::new(ROUTE, ok(to_json(&info)))
    }

    /// `/latest/dynamic/instance-identity/document`; `accountId` is the
    /// caller's role's account (`null` without a role).
    async fn identity_document(&self, auth: Auth, peer: IpAddr) -> Answer {
        const ROUTE: &str = "identity_document";
        let caller = match self.caller(ROUTE, auth, peer).await {
            Ok(caller) => caller,
            Err(answer) => return answer,
        };
        let role = role_of(&caller).ok();
        let instance = self.instance();
        let document = IdentityDocument::new(
            &instance,
            role.as_ref().map(|r| r.account),
            &self.pending_time,
        );
        Answer::new(ROUTE, ok(to_json(&document)))
    }

    #[cfg(test)]
    fn advance_clock(&self, by: Duration) {
        self.tokens.advance(by);
    }
}

/// The caller's role, or the message explaining why it has none.
fn role_of(caller: &Caller) -> Result<RoleArn<'_>, String> {
    let sa = &caller.service_account;
    let Some(value) = sa.annotation(AWS_ROLE_ARN_ANNOTATION) else {
        return Err(format!(
            "pod {} runs as service account {}/{}, which has no {AWS_ROLE_ARN_ANNOTATION} annotation; \
             annotate the service account with the ARN of the AWS role it may assume\n",
            caller.pod.key(),
            sa.namespace,
            sa.name,
        ));
    };
    RoleArn::parse(value).ok_or_else(|| {
        format!(
            "service account {}/{} has {AWS_ROLE_ARN_ANNOTATION}={value:?}, which is not an IAM role ARN \
             (arn:aws:iam::ACCOUNT:role/NAME)\n",
            sa.namespace, sa.name,
        )
    })
}

/// The `X-aws-ec2-metadata-token-ttl-seconds` of a PUT, if exactly one valid
/// value (1–21600) is present.
fn token_ttl(parts: &http::request::Parts) -> Option<u64> {
    let mut values = parts.headers.get_all(TOKEN_TTL_HEADER).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let value = value.to_str().ok()?.trim();
    if value.is_empty() || value.len() > 5 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ttl: u64 = value.parse().ok()?;
    (1..=MAX_TOKEN_TTL_SECS).contains(&ttl).then_some(ttl)
}

/// Maps a failed caller lookup: transient → 503 (retry), else `refusal`.
fn lookup_failure(route: &'static str, error: &LookupError, refusal: StatusCode) -> Answer {
    if error.is_transient() {
        return Answer::new(
            route,
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{error}; retry shortly\n"),
            ),
        );
    }
    Answer::new(route, plain(refusal, format!("{error}\n")))
}

/// Maps a [`CredentialError`] to IMDS's wire form (see the module docs).
fn credential_failure(
    route: &'static str,
    error: &CredentialError,
    caller: &Caller,
    role: &RoleArn<'_>,
) -> Answer {
    let sa = &caller.service_account;
    tracing::debug!(pod = %caller.pod.key(), role = role.arn, %error, "no AWS credentials for the pod");
    if error.is_retryable() {
        return Answer::new(
            route,
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "credentials for role {} are not available yet: {error}; retry shortly\n",
                    role.arn
                ),
            ),
        );
    }
    let code = match error {
        CredentialError::NotConfigured { message }
        | CredentialError::InvalidAnnotation { message } => {
            return Answer::new(route, plain(StatusCode::NOT_FOUND, format!("{message}\n")));
        }
        CredentialError::Upstream { code, .. } if code == "AccessDenied" => {
            "AssumeRoleUnauthorizedAccess"
        }
        CredentialError::Upstream { code, .. } if !code.is_empty() => code.as_str(),
        CredentialError::Upstream { .. } => "InternalError",
        CredentialError::KubeToken { .. } => "KubernetesTokenRequestFailed",
        CredentialError::TooManyCredentials { .. } => "TooManyCredentials",
    };
    let message = format!(
        "{error} (role {}, service account {}/{})",
        role.arn, sa.namespace, sa.name
    );
    let body = CredentialsErrorBody {
        code,
        message: &message,
        last_updated: imds_time(SystemTime::now()),
    };
    Answer::new(route, ok(to_json(&body)))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("plain structs serialise")
}

fn ok(body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn listing(body: impl Into<Bytes>) -> Answer {
    Answer::new("listing", ok(body))
}

fn not_found() -> Answer {
    Answer::new("not_found", imds_page(StatusCode::NOT_FOUND))
}

fn unauthorized() -> Answer {
    Answer::new("unauthorized", imds_page(StatusCode::UNAUTHORIZED))
}

fn method_not_allowed(allow: &'static str) -> Answer {
    let mut response = imds_page(StatusCode::METHOD_NOT_ALLOWED);
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    Answer::new("method_not_allowed", response)
}

/// The small XHTML error page the real IMDS sends with 401/404/405.
fn imds_page(status: StatusCode) -> Response<Body> {
    let title = format!(
        "{} - {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
         <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
         \t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
         <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n \
         <head>\n  <title>{title}</title>\n </head>\n \
         <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response
}
