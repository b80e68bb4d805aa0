//! Google: workload identity provider configuration, the STS token exchange,
//! IAM Credentials (`generateAccessToken`, `generateIdToken`) and the
//! `aws4_request` subject token of Google's external-account AWS flow
//! (exchange.md §2).

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::{CredentialError, GoogleAccessToken, GoogleIdToken, parse_rfc3339};
use crate::{
    config::{GcpConfig, GcpProviderType},
    metrics::Metrics,
};

/// What GCE's metadata server grants by default (and gke-metadata-server).
pub const DEFAULT_SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/userinfo.email",
];
/// Scope of the STS token used only to call IAM Credentials.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_AWS4: &str = "urn:ietf:params:aws:token-type:aws4_request";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

const STS: &str = "Google STS";
const IAM: &str = "IAM Credentials";

/// Which workload identity pool the pods' tokens are exchanged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolKind {
    /// A pool provider: `projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROV`.
    Provider { name: String },
    /// GKE's built-in pool `PROJECT.svc.id.goog`.
    GkeBuiltin { pool: String, issuer: String },
}

/// The validated Google side of the configuration.
#[derive(Debug, Clone)]
pub struct GoogleSettings {
    pub pool: PoolKind,
    /// `audience` of the STS exchange (and the aws4_request target resource).
    pub sts_audience: String,
    /// Audience of the pod's Kubernetes token.
    pub token_audience: String,
    /// Numeric project, if known (from the provider name or the flag).
    pub project_number: Option<String>,
    pub provider_type: GcpProviderType,
    /// `…/v1/token`.
    pub sts_token_url: String,
    /// Base of IAM Credentials, without a trailing slash.
    pub iamcredentials_url: String,
}

impl GoogleSettings {
    /// `Ok(None)` when the GCE API is not enabled (no provider configured).
    /// Errors are one line naming the flag.
    pub fn from_config(cfg: &GcpConfig) -> Result<Option<Self>, String> {
        let Some(raw) = cfg.gcp_workload_identity_provider.as_deref() else {
            return Ok(None);
        };
        let raw = raw.trim();
        if let Some(n) = cfg.gcp_project_number.as_deref()
            && (n.is_empty() || !n.chars().all(|c| c.is_ascii_digit()))
        {
            return Err(format!(
                "--gcp-project-number {n:?}: must be the numeric project id"
            ));
        }
        let (pool, sts_audience, default_token_audience, project_number) = if let Some(pool) =
            raw.strip_suffix(".svc.id.goog")
        {
            if !valid_project_id(pool) {
                return Err(format!(
                    "--gcp-workload-identity-provider {raw:?}: not a PROJECT_ID.svc.id.goog pool"
                ));
            }
            let issuer = cfg
                .gcp_cluster_issuer
                .as_deref()
                .map(str::trim)
                .unwrap_or("");
            if !issuer.starts_with("https://") || issuer.len() <= "https://".len() {
                return Err(format!(
                    "--gcp-cluster-issuer is required with GKE's built-in pool {raw} (an https:// URL such as https://container.googleapis.com/v1/projects/P/locations/L/clusters/C)"
                ));
            }
            if cfg.gcp_provider_type == GcpProviderType::Aws {
                return Err(format!(
                    "--gcp-provider-type aws needs a pool provider name (projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROV), not {raw}"
                ));
            }
            (
                PoolKind::GkeBuiltin {
                    pool: raw.to_string(),
                    issuer: issuer.to_string(),
                },
                format!("identitynamespace:{raw}:{issuer}"),
                raw.to_string(),
                cfg.gcp_project_number.clone(),
            )
        } else {
            let name = raw
                .strip_prefix("//iam.googleapis.com/")
                .or_else(|| raw.strip_prefix("https://iam.googleapis.com/"))
                .unwrap_or(raw);
            let number = parse_provider_name(name).ok_or_else(|| {
                    format!(
                        "--gcp-workload-identity-provider {raw:?}: expected projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROV or PROJECT_ID.svc.id.goog"
                    )
                })?;
            if let Some(flag) = cfg.gcp_project_number.as_deref()
                && flag != number
            {
                return Err(format!(
                    "--gcp-project-number {flag} contradicts the provider's project {number}"
                ));
            }
            let audience = format!("//iam.googleapis.com/{name}");
            (
                PoolKind::Provider {
                    name: name.to_string(),
                },
                audience.clone(),
                audience,
                Some(number.to_string()),
            )
        };
        let token_audience = match cfg.gcp_token_audience.as_deref().map(str::trim) {
            Some("") => return Err("--gcp-token-audience must not be empty".into()),
            Some(a) => a.to_string(),
            None => default_token_audience,
        };
        Ok(Some(Self {
            pool,
            sts_audience,
            token_audience,
            project_number,
            provider_type: cfg.gcp_provider_type,
            sts_token_url: format!("{}/v1/token", base_url(&cfg.gcp_sts_url, "--gcp-sts-url")?),
            iamcredentials_url: base_url(&cfg.gcp_iamcredentials_url, "--gcp-iamcredentials-url")?,
        }))
    }
}

/// Returns the project number of a provider resource name.
fn parse_provider_name(name: &str) -> Option<&str> {
    let parts: Vec<&str> = name.split('/').collect();
    let [
        "projects",
        number,
        "locations",
        "global",
        "workloadIdentityPools",
        pool,
        "providers",
        provider,
    ] = parts.as_slice()
    else {
        return None;
    };
    let id_ok = |s: &str| {
        (4..=32).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    (!number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit())
        && id_ok(pool)
        && id_ok(provider))
    .then_some(*number)
}

/// A project id (`my-project`), optionally domain-scoped (`example.com:my-project`).
fn valid_project_id(id: &str) -> bool {
    let local = id.rsplit(':').next().unwrap_or(id);
    (6..=30).contains(&local.len())
        && local.starts_with(|c: char| c.is_ascii_lowercase())
        && !local.ends_with('-')
        && local
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'))
}

fn base_url(url: &str, flag: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("https://") || url.starts_with("http://")) || !url.contains("://") {
        return Err(format!(
            "{flag} {url:?}: must be an http:// or https:// URL"
        ));
    }
    url.parse::<http::Uri>()
        .map_err(|e| format!("{flag} {url:?}: {e}"))?;
    Ok(url.to_string())
}

/// A federated token from STS.
#[derive(Clone)]
pub struct StsToken {
    pub access_token: String,
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for StsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: never print the token itself.
        f.debug_struct("StsToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The HTTP client for Google STS and IAM Credentials.
#[derive(Clone)]
pub struct GoogleClient {
    http: reqwest::Client,
    settings: std::sync::Arc<GoogleSettings>,
    metrics: Metrics,
}

impl GoogleClient {
    pub fn new(settings: GoogleSettings, metrics: Metrics) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("metabridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the Google HTTP client: {e}"))?;
        Ok(Self {
            http,
            settings: std::sync::Arc::new(settings),
            metrics,
        })
    }

    pub fn settings(&self) -> &GoogleSettings {
        &self.settings
    }

    /// The STS token exchange: form-encoded, **no Authorization header**.
    pub async fn sts_exchange(
        &self,
        subject_token: &str,
        subject_token_type: &str,
        scopes: &[String],
    ) -> Result<StsToken, CredentialError> {
        let scope = scopes.join(" ");
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", GRANT_TYPE)
            .append_pair("audience", &self.settings.sts_audience)
            .append_pair("scope", &scope)
            .append_pair("requested_token_type", ACCESS_TOKEN_TYPE)
            .append_pair("subject_token", subject_token)
            .append_pair("subject_token_type", subject_token_type)
            .finish();
        let timer = self.metrics.upstream_timer("google_sts");
        let now = SystemTime::now();
        let result = self
            .http
            .post(&self.settings.sts_token_url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await;
        let (status, bytes) = match read(result).await {
            Ok(r) => r,
            Err(message) => {
                timer.finish(false);
                return Err(network_error(STS, message));
            }
        };
        timer.finish(status == 200);
        if status != 200 {
            return Err(sts_error(status, &bytes));
        }
        parse_sts_success(&bytes, now)
    }

    /// `generateAccessToken` of `gsa` with the federated token as Bearer.
    pub async fn generate_access_token(
        &self,
        federated: &str,
        gsa: &str,
        scopes: &[String],
    ) -> Result<GoogleAccessToken, CredentialError> {
        let url = format!(
            "{}/v1/projects/-/serviceAccounts/{}:generateAccessToken",
            self.settings.iamcredentials_url, gsa
        );
        let body = serde_json::json!({"scope": scopes, "lifetime": "3600s"});
        let (status, bytes) = self
            .iam_call("google_generate_access_token", &url, federated, &body)
            .await?;
        if status != 200 {
            return Err(iam_error(status, &bytes));
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Response {
            access_token: String,
            expire_time: String,
        }
        let r: Response = serde_json::from_slice(&bytes)
            .map_err(|e| bad_response(IAM, format!("generateAccessToken answered {e}")))?;
        let expires_at = parse_rfc3339(&r.expire_time).ok_or_else(|| {
            bad_response(
                IAM,
                format!("expireTime {:?} is not RFC 3339", r.expire_time),
            )
        })?;
        Ok(GoogleAccessToken::new(r.access_token, expires_at))
    }

    /// `generateIdToken` of `gsa` for `audience`.
    pub async fn generate_id_token(
        &self,
        federated: &str,
        gsa: &str,
        audience: &str,
        include_email: bool,
    ) -> Result<GoogleIdToken, CredentialError> {
        let url = format!(
            "{}/v1/projects/-/serviceAccounts/{}:generateIdToken",
            self.settings.iamcredentials_url, gsa
        );
        let body = serde_json::json!({"audience": audience, "includeEmail": include_email});
        let (status, bytes) = self
            .iam_call("google_generate_id_token", &url, federated, &body)
            .await?;
        if status != 200 {
            return Err(iam_error(status, &bytes));
        }
        #[derive(Deserialize)]
        struct Response {
            token: String,
        }
        let r: Response = serde_json::from_slice(&bytes)
            .map_err(|e| bad_response(IAM, format!("generateIdToken answered {e}")))?;
        let expires_at =
            jwt_expiry(&r.token).unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600));
        Ok(GoogleIdToken {
            token: Bytes::from(r.token),
            expires_at,
        })
    }

    async fn iam_call(
        &self,
        endpoint: &'static str,
        url: &str,
        bearer: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, Bytes), CredentialError> {
        let timer = self.metrics.upstream_timer(endpoint);
        let result = self
            .http
            .post(url)
            .bearer_auth(bearer)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await;
        match read(result).await {
            Ok((status, bytes)) => {
                timer.finish(status == 200);
                Ok((status, bytes))
            }
            Err(message) => {
                timer.finish(false);
                Err(network_error(IAM, message))
            }
        }
    }
}

async fn read(result: Result<reqwest::Response, reqwest::Error>) -> Result<(u16, Bytes), String> {
    let response = result.map_err(|e| error_chain(&e))?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await.map_err(|e| error_chain(&e))?;
    Ok((status, bytes))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn network_error(service: &'static str, message: String) -> CredentialError {
    CredentialError::Upstream {
        service,
        status: None,
        code: "unavailable".into(),
        message,
        retryable: true,
    }
}

fn bad_response(service: &'static str, message: String) -> CredentialError {
    CredentialError::Upstream {
        service,
        status: Some(200),
        code: "invalid_response".into(),
        message,
        retryable: true,
    }
}

fn retryable_status(status: u16) -> bool {
    status == 429 || status >= 500
}

fn parse_sts_success(bytes: &[u8], now: SystemTime) -> Result<StsToken, CredentialError> {
    #[derive(Deserialize)]
    struct Response {
        access_token: String,
        #[serde(default)]
        expires_in: Option<serde_json::Value>,
    }
    let r: Response = serde_json::from_slice(bytes)
        .map_err(|e| bad_response(STS, format!("token exchange answered {e}")))?;
    // google-auth accepts expires_in as a number or a string.
    let secs = match r.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .unwrap_or(3600);
    Ok(StsToken {
        access_token: r.access_token,
        expires_at: now + Duration::from_secs(secs),
    })
}

/// RFC 6749 error JSON `{"error","error_description"}` from STS; its front
/// end answers overload and quota errors (503, 429) in Google's general error
/// shape instead, which is parsed too.
pub(crate) fn sts_error(status: u16, body: &[u8]) -> CredentialError {
    if let CredentialError::Upstream { code, message, .. } = iam_error(status, body)
        && !code.starts_with("http_")
    {
        return CredentialError::Upstream {
            service: STS,
            status: Some(status),
            code,
            message,
            retryable: retryable_status(status),
        };
    }
    #[derive(Deserialize)]
    struct Rfc6749 {
        error: String,
        #[serde(default)]
        error_description: Option<String>,
    }
    let (code, message) = match serde_json::from_slice::<Rfc6749>(body) {
        Ok(e) => (e.error, e.error_description.unwrap_or_default()),
        Err(_) => (format!("http_{status}"), snippet(body)),
    };
    CredentialError::Upstream {
        service: STS,
        status: Some(status),
        code,
        message,
        retryable: retryable_status(status),
    }
}

/// Google error JSON `{"error":{"code","message","status"}}` from IAM Credentials.
pub(crate) fn iam_error(status: u16, body: &[u8]) -> CredentialError {
    #[derive(Deserialize)]
    struct Outer {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        message: String,
        #[serde(default)]
        status: Option<String>,
    }
    let (code, message) = match serde_json::from_slice::<Outer>(body) {
        Ok(e) => (
            e.error.status.unwrap_or_else(|| format!("http_{status}")),
            e.error.message,
        ),
        Err(_) => (format!("http_{status}"), snippet(body)),
    };
    CredentialError::Upstream {
        service: IAM,
        status: Some(status),
        code,
        message,
        retryable: retryable_status(status),
    }
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    s.chars().take(200).collect::<String>().trim().to_string()
}

/// The `exp` claim of a JWT (unverified: we only schedule refreshes by it).
pub(crate) fn jwt_expiry(jwt: &str) -> Option<SystemTime> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

/// The scopes actually requested: sorted, deduplicated, defaulted.
pub fn normalize_scopes(scopes: &[String]) -> Vec<String> {
    let mut out: Vec<String> = scopes
        .iter()
        .flat_map(|s| s.split([',', ' ']))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if out.is_empty() {
        out = DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect();
    }
    out.sort();
    out.dedup();
    out
}

/// Scopes for an STS token that will only call IAM Credentials.
pub fn impersonation_scopes() -> Vec<String> {
    vec![CLOUD_PLATFORM.to_string()]
}

// === The aws4_request subject token ===

/// Temporary AWS keys to sign with.
pub struct AwsKeys<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
}

/// Python's `urllib.parse.quote` default: everything but `A-Za-z0-9_.-~/`.
const QUOTE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~')
    .remove(b'/');

/// The subject token Google's external-account AWS flow sends to STS
/// (`urn:ietf:params:aws:token-type:aws4_request`): a SigV4-signed
/// `POST https://sts.REGION.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15`
/// carrying `x-goog-cloud-target-resource: <STS audience>`, serialised as
/// URL-encoded JSON `{"headers":[{"key","value"}…],"method":"POST","url":…}`.
///
/// Shape as google-auth-library-python `google/auth/aws.py`
/// (`Credentials._get_subject_token`, `RequestSigner.get_request_options`):
/// JSON keys sorted, headers sorted by name (`Authorization`, `host`,
/// `x-amz-date`, `x-amz-security-token`, `x-goog-cloud-target-resource`),
/// no body field for an empty payload. The URL always names the real regional
/// endpoint: Google replays it.
pub fn aws_subject_token(
    keys: &AwsKeys<'_>,
    region: &str,
    target_resource: &str,
    at: SystemTime,
) -> Result<String, CredentialError> {
    use aws_sigv4::{
        http_request::{SignableBody, SignableRequest, SigningSettings, sign},
        sign::v4,
    };
    let host = format!("sts.{region}.amazonaws.com");
    let url = format!("https://{host}?Action=GetCallerIdentity&Version=2011-06-15");
    let identity = aws_credential_types::Credentials::new(
        keys.access_key_id,
        keys.secret_access_key,
        keys.session_token.map(String::from),
        None,
        "metabridge",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| sign_error(e.to_string()))?
        .into();
    let headers = [
        ("host", host.as_str()),
        ("x-goog-cloud-target-resource", target_resource),
    ];
    let request = SignableRequest::new(
        "POST",
        url.as_str(),
        headers.iter().copied(),
        SignableBody::Bytes(b""),
    )
    .map_err(|e| sign_error(e.to_string()))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| sign_error(e.to_string()))?
        .into_parts();
    let mut authorization = None;
    let mut amz_date = None;
    let mut security_token = None;
    for (name, value) in instructions.headers() {
        match name.to_ascii_lowercase().as_str() {
            "authorization" => authorization = Some(value.to_string()),
            "x-amz-date" => amz_date = Some(value.to_string()),
            "x-amz-security-token" => security_token = Some(value.to_string()),
            _ => {}
        }
    }
    let (Some(authorization), Some(amz_date)) = (authorization, amz_date) else {
        return Err(sign_error(
            "the signer produced no Authorization/x-amz-date".into(),
        ));
    };
    let mut headers = vec![
        serde_json::json!({"key": "Authorization", "value": authorization}),
        serde_json::json!({"key": "host", "value": host}),
        serde_json::json!({"key": "x-amz-date", "value": amz_date}),
    ];
    if let Some(token) = security_token {
        headers.push(serde_json::json!({"key": "x-amz-security-token", "value": token}));
    }
    headers
        .push(serde_json::json!({"key": "x-goog-cloud-target-resource", "value": target_resource}));
    // Keys inserted in sorted order (Python's sort_keys), whatever serde_json's map type.
    let json = serde_json::json!({"headers": headers, "method": "POST", "url": url}).to_string();
    Ok(utf8_percent_encode(&json, QUOTE).to_string())
}

fn sign_error(message: String) -> CredentialError {
    CredentialError::Upstream {
        service: "AWS SigV4",
        status: None,
        code: "signing_failed".into(),
        message,
        retryable: false,
    }
}

/// GKE's message when an ID token is asked of an SA with no Google SA.
pub fn missing_gsa_message(namespace: &str, name: &str) -> String {
    format!(
        "Your Kubernetes service account ({namespace}/{name}) is not annotated with a target Google service account, which is a requirement for retrieving Identity Tokens using Workload Identity. Please add the iam.gke.io/gcp-service-account=[GSA_NAME]@[PROJECT_ID] annotation to your Kubernetes service account."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcp(provider: &str) -> GcpConfig {
        GcpConfig {
            gcp_workload_identity_provider: Some(provider.into()),
            gcp_project_id: Some("my-project".into()),
            gcp_project_number: None,
            gcp_cluster_issuer: None,
            gcp_token_audience: None,
            gcp_provider_type: GcpProviderType::Oidc,
            gcp_sts_url: "https://sts.googleapis.com".into(),
            gcp_iamcredentials_url: "https://iamcredentials.googleapis.com/".into(),
        }
    }

    const PROVIDER: &str =
        "projects/123456/locations/global/workloadIdentityPools/my-pool/providers/eks-dev";

    #[test]
    fn provider_name_form() {
        let s = GoogleSettings::from_config(&gcp(PROVIDER))
            .unwrap()
            .unwrap();
        assert_eq!(s.sts_audience, format!("//iam.googleapis.com/{PROVIDER}"));
        assert_eq!(s.token_audience, s.sts_audience);
        assert_eq!(s.project_number.as_deref(), Some("123456"));
        assert_eq!(s.sts_token_url, "https://sts.googleapis.com/v1/token");
        assert_eq!(
            s.iamcredentials_url,
            "https://iamcredentials.googleapis.com"
        );
        // The //iam.googleapis.com/ prefix is accepted too.
        let s2 = GoogleSettings::from_config(&gcp(&format!("//iam.googleapis.com/{PROVIDER}")))
            .unwrap()
            .unwrap();
        assert_eq!(s2.sts_audience, s.sts_audience);
        // An explicit token audience wins.
        let mut c = gcp(PROVIDER);
        c.gcp_token_audience = Some("https://example".into());
        let s3 = GoogleSettings::from_config(&c).unwrap().unwrap();
        assert_eq!(s3.token_audience, "https://example");
        assert_eq!(s3.sts_audience, s.sts_audience);
    }

    #[test]
    fn gke_builtin_pool_form() {
        let mut c = gcp("my-project.svc.id.goog");
        let err = GoogleSettings::from_config(&c).unwrap_err();
        assert!(err.contains("--gcp-cluster-issuer"), "{err}");
        let issuer = "https://container.googleapis.com/v1/projects/my-project/locations/europe-west1/clusters/c1";
        c.gcp_cluster_issuer = Some(issuer.into());
        c.gcp_project_number = Some("42".into());
        let s = GoogleSettings::from_config(&c).unwrap().unwrap();
        assert_eq!(
            s.sts_audience,
            format!("identitynamespace:my-project.svc.id.goog:{issuer}")
        );
        assert_eq!(s.token_audience, "my-project.svc.id.goog");
        assert_eq!(s.project_number.as_deref(), Some("42"));
        assert!(matches!(s.pool, PoolKind::GkeBuiltin { .. }));
    }

    #[test]
    fn bad_configurations_are_one_line_errors() {
        assert!(
            GoogleSettings::from_config(&GcpConfig {
                gcp_workload_identity_provider: None,
                ..gcp(PROVIDER)
            })
            .unwrap()
            .is_none()
        );
        for bad in [
            "projects/abc/locations/global/workloadIdentityPools/my-pool/providers/eks-dev",
            "projects/1/locations/us/workloadIdentityPools/my-pool/providers/eks-dev",
            "projects/1/locations/global/workloadIdentityPools/my-pool",
            "projects/1/locations/global/workloadIdentityPools/My_Pool/providers/eks-dev",
            "X.svc.id.goog",
            "my-pool",
            "",
        ] {
            let err = GoogleSettings::from_config(&gcp(bad)).unwrap_err();
            assert!(
                !err.contains('\n') && err.starts_with("--gcp-"),
                "{bad}: {err}"
            );
        }
        let mut c = gcp(PROVIDER);
        c.gcp_project_number = Some("999".into());
        assert!(
            GoogleSettings::from_config(&c)
                .unwrap_err()
                .contains("contradicts")
        );
        let mut c = gcp(PROVIDER);
        c.gcp_sts_url = "sts.googleapis.com".into();
        assert!(
            GoogleSettings::from_config(&c)
                .unwrap_err()
                .starts_with("--gcp-sts-url")
        );
        let mut c = gcp("my-project.svc.id.goog");
        c.gcp_cluster_issuer = Some("https://issuer".into());
        c.gcp_provider_type = GcpProviderType::Aws;
        assert!(
            GoogleSettings::from_config(&c)
                .unwrap_err()
                .contains("--gcp-provider-type aws")
        );
    }

    #[test]
    fn sts_overload_errors_in_google_shape_are_parsed() {
        let body = br#"{"error":{"code":503,"message":"The service is currently unavailable.","status":"UNAVAILABLE"}}"#;
        match sts_error(503, body) {
            CredentialError::Upstream {
                service,
                code,
                message,
                retryable,
                ..
            } => {
                assert_eq!(service, STS);
                assert_eq!(code, "UNAVAILABLE");
                assert_eq!(message, "The service is currently unavailable.");
                assert!(retryable);
            }
            other => panic!("{other:?}"),
        }
        let rfc = br#"{"error":"invalid_grant","error_description":"expired"}"#;
        match sts_error(400, rfc) {
            CredentialError::Upstream {
                code, retryable, ..
            } => {
                assert_eq!(code, "invalid_grant");
                assert!(!retryable);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sts_and_iam_errors_are_classified() {
        let e = sts_error(
            400,
            br#"{"error":"invalid_grant","error_description":"The audience in ID Token does not match"}"#,
        );
        match &e {
            CredentialError::Upstream {
                service,
                status,
                code,
                message,
                retryable,
            } => {
                assert_eq!(*service, "Google STS");
                assert_eq!(*status, Some(400));
                assert_eq!(code, "invalid_grant");
                assert_eq!(message, "The audience in ID Token does not match");
                assert!(!retryable);
            }
            other => panic!("{other:?}"),
        }
        assert!(sts_error(503, b"<html>oops</html>").is_retryable());
        assert!(sts_error(429, br#"{"error":"rate_limited"}"#).is_retryable());
        let e = iam_error(
            403,
            br#"{"error":{"code":403,"message":"Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).","status":"PERMISSION_DENIED"}}"#,
        );
        match &e {
            CredentialError::Upstream {
                service,
                code,
                message,
                retryable,
                ..
            } => {
                assert_eq!(*service, "IAM Credentials");
                assert_eq!(code, "PERMISSION_DENIED");
                assert!(message.starts_with("Permission 'iam.serviceAccounts.getAccessToken'"));
                assert!(!retryable);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            iam_error(
                500,
                br#"{"error":{"code":500,"message":"x","status":"INTERNAL"}}"#
            )
            .is_retryable()
        );
    }

    #[test]
    fn sts_expires_in_number_or_string() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let t = parse_sts_success(br#"{"access_token":"a","expires_in":3599}"#, now).unwrap();
        assert_eq!(t.expires_at, now + Duration::from_secs(3599));
        let t = parse_sts_success(br#"{"access_token":"a","expires_in":"120"}"#, now).unwrap();
        assert_eq!(t.expires_at, now + Duration::from_secs(120));
    }

    #[test]
    fn scopes_normalised() {
        assert_eq!(normalize_scopes(&[]).len(), 2);
        assert_eq!(
            normalize_scopes(&["b,a".into(), "a".into(), " ".into()]),
            vec!["a".to_string(), "b".to_string()]
        );
    }

    #[test]
    fn jwt_expiry_reads_exp() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":1767229200}"#);
        let jwt = format!("e30.{payload}.sig");
        assert_eq!(
            jwt_expiry(&jwt),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_229_200))
        );
        assert_eq!(jwt_expiry("nonsense"), None);
    }

    /// Parses the subject token back and re-derives the SigV4 signature
    /// independently (canonical request as google-auth's aws.py builds it).
    #[test]
    fn aws4_request_subject_token_round_trips() {
        use hmac::{Hmac, KeyInit, Mac};
        use sha2::{Digest, Sha256};

        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_229_200); // 2026-01-01T01:00:00Z
        let audience = format!("//iam.googleapis.com/{PROVIDER}");
        let keys = AwsKeys {
            access_key_id: "ASIAEXAMPLE",
            secret_access_key: "secret/key+x",
            session_token: Some("session+token/=="),
        };
        let token = aws_subject_token(&keys, "eu-west-1", &audience, at).unwrap();
        assert!(!token.contains('{') && !token.contains('"'), "URL-encoded");
        let json = percent_encoding::percent_decode_str(&token)
            .decode_utf8()
            .unwrap();
        // Keys sorted like Python's json.dumps(sort_keys=True), compact separators.
        assert!(json.starts_with(r#"{"headers":[{"key":"Authorization","value":"AWS4-HMAC-SHA256 Credential=ASIAEXAMPLE/20260101/eu-west-1/sts/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token;x-goog-cloud-target-resource, Signature="#), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(
            v["url"],
            "https://sts.eu-west-1.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
        );
        assert!(v.get("body").is_none());
        let headers: Vec<(String, String)> = v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["key"].as_str().unwrap().to_string(),
                    h["value"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "Authorization",
                "host",
                "x-amz-date",
                "x-amz-security-token",
                "x-goog-cloud-target-resource"
            ]
        );
        let get = |k: &str| headers.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("host"), "sts.eu-west-1.amazonaws.com");
        assert_eq!(get("x-amz-date"), "20260101T010000Z");
        assert_eq!(get("x-amz-security-token"), "session+token/==");
        assert_eq!(get("x-goog-cloud-target-resource"), audience);

        // Independent SigV4 over the canonical request.
        let canonical_headers = format!(
            "host:sts.eu-west-1.amazonaws.com\nx-amz-date:20260101T010000Z\nx-amz-security-token:session+token/==\nx-goog-cloud-target-resource:{audience}\n"
        );
        let canonical = format!(
            "POST\n/\nAction=GetCallerIdentity&Version=2011-06-15\n{canonical_headers}\nhost;x-amz-date;x-amz-security-token;x-goog-cloud-target-resource\n{}",
            hex(&Sha256::digest(b""))
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n20260101T010000Z\n20260101/eu-west-1/sts/aws4_request\n{}",
            hex(&Sha256::digest(canonical.as_bytes()))
        );
        let mac = |key: &[u8], msg: &str| {
            let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
            m.update(msg.as_bytes());
            m.finalize().into_bytes().to_vec()
        };
        let k = mac(b"AWS4secret/key+x", "20260101");
        let k = mac(&k, "eu-west-1");
        let k = mac(&k, "sts");
        let k = mac(&k, "aws4_request");
        let signature = hex(&mac(&k, &string_to_sign));
        assert!(
            get("Authorization").ends_with(&format!("Signature={signature}")),
            "{} vs {signature}",
            get("Authorization")
        );
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn missing_gsa_message_is_gkes() {
        let m = missing_gsa_message("ns", "sa");
        assert!(m.starts_with("Your Kubernetes service account (ns/sa) is not annotated"));
        assert!(m.contains("iam.gke.io/gcp-service-account=[GSA_NAME]@[PROJECT_ID]"));
    }
}
