//! Credentials: minting (Kubernetes TokenRequest → Google STS / IAM
//! Credentials, or AWS STS) and the cache every API serves from.
//!
//! The APIs depend on the traits below, not on the minting machinery, so each
//! API is tested against a fake source and the cache against fake minters.

mod aws;
mod budget;
mod cache;
mod google;
mod kube;
mod upstream;

#[cfg(test)]
mod http_tests;

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;

use crate::pods::Caller;

pub use aws::{AwsSettings, render_imds_body, session_name};
pub use budget::Budgeted;
pub use cache::{
    AWS_MIN_LIFETIME, Clock, CredentialCache, Credentials, Mint, Policy, SystemClock, TargetKind,
};
pub use google::{DEFAULT_SCOPES, GoogleSettings, PoolKind};
pub use kube::{KubeToken, KubeTokens};
pub use upstream::Upstream;

/// A Google OAuth2 access token as the GCE metadata server hands it out.
#[derive(Debug, Clone)]
pub struct GoogleAccessToken {
    pub access_token: String,
    pub expires_at: SystemTime,
    /// `{"access_token":"…","expires_in":` — rendered once per credential.
    body_prefix: Bytes,
}

impl GoogleAccessToken {
    pub fn new(access_token: String, expires_at: SystemTime) -> Self {
        let prefix = format!(
            "{{\"access_token\":{},\"expires_in\":",
            serde_json::to_string(&access_token).expect("a string serialises")
        );
        Self {
            access_token,
            expires_at,
            body_prefix: Bytes::from(prefix),
        }
    }

    /// Seconds left, counted down truthfully.
    pub fn expires_in(&self, now: SystemTime) -> u64 {
        self.expires_at
            .duration_since(now)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// The token endpoint's JSON body at `now`.
    pub fn body(&self, now: SystemTime) -> Bytes {
        let expires_in = self.expires_in(now).to_string();
        let suffix = ",\"token_type\":\"Bearer\"}";
        let mut out = Vec::with_capacity(self.body_prefix.len() + expires_in.len() + suffix.len());
        out.extend_from_slice(&self.body_prefix);
        out.extend_from_slice(expires_in.as_bytes());
        out.extend_from_slice(suffix.as_bytes());
        Bytes::from(out)
    }
}

/// A Google-signed ID token (JWT) for one audience.
#[derive(Debug, Clone)]
pub struct GoogleIdToken {
    pub token: Bytes,
    pub expires_at: SystemTime,
}

/// Temporary AWS credentials of an assumed role, with the IMDS bodies
/// rendered once.
#[derive(Debug, Clone)]
pub struct AwsSession {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    pub last_updated: SystemTime,
    /// `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION`
    pub assumed_role_arn: String,
    pub account_id: String,
    /// `…/iam/security-credentials/ROLE` body (the 7 fields).
    pub imds_body: Bytes,
    /// `…/iam/security-credentials-extended/ROLE` body (plus `AccountId`).
    pub imds_extended_body: Bytes,
}

/// Why a credential could not be handed out; each API maps this once to its
/// own wire error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// The pod's ServiceAccount lacks what the request needs.
    #[error("{message}")]
    NotConfigured { message: String },
    /// An annotation is present but unusable.
    #[error("{message}")]
    InvalidAnnotation { message: String },
    /// The Kubernetes API refused or failed the TokenRequest.
    #[error("Kubernetes TokenRequest for {service_account} failed ({status}): {message}")]
    KubeToken {
        service_account: String,
        status: u16,
        message: String,
    },
    /// A cloud endpoint refused or failed.
    #[error("{service} answered {}: {code}: {message}", .status.map(|s| s.to_string()).unwrap_or_else(|| "nothing".into()))]
    Upstream {
        service: &'static str,
        /// HTTP status from upstream, if any answer came.
        status: Option<u16>,
        /// The upstream's error code (`invalid_grant`, `AccessDenied`, …).
        code: String,
        message: String,
        /// Whether retrying later may succeed (throttling, 5xx, network).
        retryable: bool,
    },
    /// The identity already holds as many on-demand credentials as allowed.
    #[error(
        "{namespace}/{service_account} already holds {limit} distinct credentials (ID-token audiences or scope sets); ask for fewer distinct ones, or retry once some have expired"
    )]
    TooManyCredentials {
        namespace: String,
        service_account: String,
        limit: usize,
    },
}

impl CredentialError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Upstream { retryable, .. } => *retryable,
            Self::KubeToken { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// Google credentials for a caller (implemented by the credential cache).
pub trait GoogleCredentialSource: Send + Sync + 'static {
    /// An access token with `scopes` (empty: the default cloud-platform scopes).
    fn access_token(
        &self,
        caller: &Caller,
        scopes: &[String],
    ) -> impl Future<Output = Result<Arc<GoogleAccessToken>, CredentialError>> + Send;

    /// An ID token for `audience`; `full` includes the email claims.
    fn id_token(
        &self,
        caller: &Caller,
        audience: &str,
        full: bool,
    ) -> impl Future<Output = Result<Arc<GoogleIdToken>, CredentialError>> + Send;
}

/// AWS credentials for a caller (implemented by the credential cache).
pub trait AwsCredentialSource: Send + Sync + 'static {
    /// The session of `role_arn` for this caller.
    fn session(
        &self,
        caller: &Caller,
        role_arn: &str,
    ) -> impl Future<Output = Result<Arc<AwsSession>, CredentialError>> + Send;
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC, whole seconds), the form botocore, Go and
/// google-auth parse.
pub fn format_utc_seconds(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Parses an RFC 3339 timestamp (`2026-01-01T01:00:00Z`, fractions allowed).
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    s.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(SystemTime::from)
}

/// How upstream calls are retried: only retryable errors, a bounded number
/// of attempts, exponential backoff with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            base: Duration::from_millis(200),
            max: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `attempt` (1-based): `base·2^(attempt-1)`
    /// capped at `max`, jittered to 50–100 %.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        jitter(exp.min(self.max), 0.5)
    }

    /// Runs `op` until it succeeds, fails permanently, or attempts run out.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, CredentialError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CredentialError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(error) if error.is_retryable() && attempt < self.attempts.max(1) => {
                    tracing::debug!(%error, attempt, "retrying upstream call");
                    tokio::time::sleep(self.delay(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// `d` scaled by a random factor in `[low, 1]`.
pub(crate) fn jitter(d: Duration, low: f64) -> Duration {
    let f: f64 = rand::random_range(low..=1.0);
    d.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_seconds_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_229_200_999);
        assert_eq!(format_utc_seconds(t), "2026-01-01T01:00:00Z");
        assert_eq!(
            parse_rfc3339("2026-01-01T01:00:00Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_229_200))
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[tokio::test]
    async fn retry_policy_retries_only_retryable() {
        let policy = RetryPolicy {
            attempts: 3,
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let calls = std::sync::atomic::AtomicU32::new(0);
        let result: Result<(), _> = policy
            .run(|| {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async {
                    Err(CredentialError::Upstream {
                        service: "x",
                        status: Some(503),
                        code: "unavailable".into(),
                        message: "m".into(),
                        retryable: true,
                    })
                }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);

        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        let result: Result<(), _> = policy
            .run(|| {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async {
                    Err(CredentialError::NotConfigured {
                        message: "no".into(),
                    })
                }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn access_token_body_counts_down() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = GoogleAccessToken::new("ya29.a\"b".into(), now + Duration::from_secs(3599));
        let body: serde_json::Value = serde_json::from_slice(&token.body(now)).unwrap();
        assert_eq!(body["access_token"], "ya29.a\"b");
        assert_eq!(body["expires_in"], 3599);
        assert_eq!(body["token_type"], "Bearer");
        let later: serde_json::Value =
            serde_json::from_slice(&token.body(now + Duration::from_secs(600))).unwrap();
        assert_eq!(later["expires_in"], 2999);
    }
}
