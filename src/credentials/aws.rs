//! AWS: `AssumeRoleWithWebIdentity` through aws-sdk-sts (unsigned, no
//! credentials of our own), error classification (exchange.md §3), session
//! names, and the IMDS credential bodies (aws.md §0, §4).

use std::time::{Duration, SystemTime};

use aws_sdk_sts::{
    config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig},
    error::ProvideErrorMetadata,
};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{AwsSession, CredentialError, format_utc_seconds};
use crate::{
    config::{AwsConfig, AwsTokenSource},
    metrics::Metrics,
};

const SERVICE: &str = "AWS STS";
/// Region used when only the Google AWS-provider flow needs STS.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The validated AWS side of the configuration.
#[derive(Debug, Clone)]
pub struct AwsSettings {
    /// `--aws-region`; `Some` enables the IMDS API.
    pub region: Option<String>,
    pub sts_url: Option<String>,
    pub token_source: AwsTokenSource,
    pub token_audience: String,
    pub google_audience: String,
    pub session_duration: Duration,
}

impl AwsSettings {
    pub fn from_config(cfg: &AwsConfig) -> Result<Self, String> {
        let region = match cfg.aws_region.as_deref().map(str::trim) {
            Some(r)
                if r.is_empty()
                    || !r
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
            {
                return Err(format!(
                    "--aws-region {r:?}: not a region name like us-east-1"
                ));
            }
            r => r.map(String::from),
        };
        let sts_url = match cfg.aws_sts_url.as_deref().map(str::trim) {
            Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                return Err(format!(
                    "--aws-sts-url {u:?}: must be an http:// or https:// URL"
                ));
            }
            Some(u) => Some(u.trim_end_matches('/').to_string()),
            None => None,
        };
        let secs = cfg.aws_session_duration.as_secs();
        if !(900..=43_200).contains(&secs) || cfg.aws_session_duration.subsec_nanos() != 0 {
            return Err(format!(
                "--aws-session-duration {}: must be whole seconds between 15m and 12h",
                humantime::format_duration(cfg.aws_session_duration)
            ));
        }
        for (flag, v) in [
            ("--aws-token-audience", &cfg.aws_token_audience),
            ("--aws-google-audience", &cfg.aws_google_audience),
        ] {
            if v.trim().is_empty() {
                return Err(format!("{flag} must not be empty"));
            }
        }
        Ok(Self {
            region,
            sts_url,
            token_source: cfg.aws_token_source,
            token_audience: cfg.aws_token_audience.trim().to_string(),
            google_audience: cfg.aws_google_audience.trim().to_string(),
            session_duration: cfg.aws_session_duration,
        })
    }

    pub fn sts_region(&self) -> &str {
        self.region.as_deref().unwrap_or(DEFAULT_REGION)
    }
}

/// A role ARN's parts: `arn:PARTITION:iam::ACCOUNT:role/PATH/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleArn {
    pub account_id: String,
    pub name: String,
}

pub fn parse_role_arn(arn: &str) -> Option<RoleArn> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let path_and_name = resource.strip_prefix("role/")?;
    let name = path_and_name.rsplit('/').next()?;
    let ok = partition.starts_with("aws")
        && account.len() == 12
        && account.chars().all(|c| c.is_ascii_digit())
        && !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
        && (20..=2048).contains(&arn.len());
    ok.then(|| RoleArn {
        account_id: account.to_string(),
        name: name.to_string(),
    })
}

/// `RoleSessionName` for a pod: `NAMESPACE.POD`, every character outside
/// STS's `[\w+=,.@-]` replaced by `-`, 2–64 characters. Longer names keep a
/// prefix and end in `-` plus 8 hex digits of a hash of the full name, so the
/// result is deterministic and distinct pods stay distinct.
pub fn session_name(namespace: &str, pod: &str) -> String {
    let full = format!("{namespace}.{pod}");
    let clean: String = full
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = if clean.len() > 64 {
        let digest = Sha256::digest(full.as_bytes());
        let suffix: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}-{suffix}", &clean[..55])
    } else {
        clean
    };
    while name.len() < 2 {
        name.push('-');
    }
    name
}

/// The IMDS credential body, fields in the order EC2 writes them:
/// `Code, LastUpdated, Type, AccessKeyId, SecretAccessKey, Token, Expiration`
/// and, for `security-credentials-extended`, `AccountId` after them.
pub fn render_imds_body(
    access_key_id: &str,
    secret_access_key: &str,
    token: &str,
    last_updated: SystemTime,
    expiration: SystemTime,
    account_id: Option<&str>,
) -> Bytes {
    let q = |s: &str| serde_json::to_string(s).expect("a string serialises");
    let mut body = format!(
        "{{\"Code\":\"Success\",\"LastUpdated\":\"{}\",\"Type\":\"AWS-HMAC\",\"AccessKeyId\":{},\"SecretAccessKey\":{},\"Token\":{},\"Expiration\":\"{}\"",
        format_utc_seconds(last_updated),
        q(access_key_id),
        q(secret_access_key),
        q(token),
        format_utc_seconds(expiration),
    );
    if let Some(account) = account_id {
        body.push_str(&format!(",\"AccountId\":{}", q(account)));
    }
    body.push('}');
    Bytes::from(body)
}

/// Builds the [`AwsSession`] with its bodies rendered once.
pub fn build_session(
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: SystemTime,
    last_updated: SystemTime,
    assumed_role_arn: String,
    account_id: String,
) -> AwsSession {
    let imds_body = render_imds_body(
        &access_key_id,
        &secret_access_key,
        &session_token,
        last_updated,
        expiration,
        None,
    );
    let imds_extended_body = render_imds_body(
        &access_key_id,
        &secret_access_key,
        &session_token,
        last_updated,
        expiration,
        Some(&account_id),
    );
    AwsSession {
        access_key_id,
        secret_access_key,
        session_token,
        expiration,
        last_updated,
        assumed_role_arn,
        account_id,
        imds_body,
        imds_extended_body,
    }
}

/// How an STS error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StsErrorClass {
    /// Worth retrying with backoff, a bounded number of times.
    Retryable,
    /// The web identity token expired: mint a fresh one and retry once.
    ExpiredToken,
    /// Will not succeed by retrying (trust policy, malformed role, …).
    Permanent,
}

/// exchange.md §3: `InvalidIdentityToken` (JWKS fetches fail transiently),
/// `IDPCommunicationError`, throttling and 5xx are retried; expired tokens
/// get one fresh-token retry; everything else is permanent.
pub fn classify_sts_error(code: Option<&str>, status: Option<u16>) -> StsErrorClass {
    match code {
        Some("ExpiredTokenException" | "ExpiredToken") => StsErrorClass::ExpiredToken,
        Some(
            "InvalidIdentityToken"
            | "IDPCommunicationError"
            | "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "InternalFailure"
            | "InternalError"
            | "ServiceUnavailable",
        ) => StsErrorClass::Retryable,
        _ => match status {
            // No answer at all (connect/timeout), throttled or a server error.
            None => StsErrorClass::Retryable,
            Some(s) if s == 429 || s >= 500 => StsErrorClass::Retryable,
            Some(_) => StsErrorClass::Permanent,
        },
    }
}

/// aws-sdk-sts, unsigned (AssumeRoleWithWebIdentity is modelled no-auth and
/// the client has no credentials provider), SDK retries off (we retry).
#[derive(Clone)]
pub struct StsClient {
    client: aws_sdk_sts::Client,
    metrics: Metrics,
}

impl StsClient {
    pub fn new(settings: &AwsSettings, metrics: Metrics) -> Self {
        let mut builder = aws_sdk_sts::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.sts_region().to_string()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .build(),
            );
        if let Some(url) = &settings.sts_url {
            builder = builder.endpoint_url(url);
        }
        Self {
            client: aws_sdk_sts::Client::from_conf(builder.build()),
            metrics,
        }
    }

    /// One AssumeRoleWithWebIdentity call; the error carries its class in
    /// `retryable` and, for expired tokens, the code `ExpiredTokenException`.
    pub async fn assume_role(
        &self,
        role_arn: &str,
        session_name: &str,
        web_identity_token: &str,
        duration: Duration,
    ) -> Result<AwsSession, CredentialError> {
        let role = parse_role_arn(role_arn).ok_or_else(|| CredentialError::InvalidAnnotation {
            message: format!(
                "{role_arn:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"
            ),
        })?;
        let timer = self
            .metrics
            .upstream_timer("aws_assume_role_with_web_identity");
        let result = self
            .client
            .assume_role_with_web_identity()
            .role_arn(role_arn)
            .role_session_name(session_name)
            .web_identity_token(web_identity_token)
            .duration_seconds(duration.as_secs().min(i32::MAX as u64) as i32)
            .send()
            .await;
        timer.finish(result.is_ok());
        let out = match result {
            Ok(out) => out,
            Err(error) => {
                let status = error.raw_response().map(|r| r.status().as_u16());
                let code = error.code().map(String::from);
                let message = error
                    .message()
                    .map(String::from)
                    .unwrap_or_else(|| aws_sdk_sts::error::DisplayErrorContext(&error).to_string());
                let class = classify_sts_error(code.as_deref(), status);
                return Err(CredentialError::Upstream {
                    service: SERVICE,
                    status,
                    code: code.unwrap_or_else(|| {
                        if status.is_none() {
                            "NetworkError"
                        } else {
                            "Unknown"
                        }
                        .into()
                    }),
                    message,
                    retryable: class == StsErrorClass::Retryable,
                });
            }
        };
        let creds = out.credentials().ok_or_else(|| CredentialError::Upstream {
            service: SERVICE,
            status: Some(200),
            code: "InvalidResponse".into(),
            message: "AssumeRoleWithWebIdentity returned no Credentials".into(),
            retryable: true,
        })?;
        let expiration =
            SystemTime::try_from(*creds.expiration()).map_err(|e| CredentialError::Upstream {
                service: SERVICE,
                status: Some(200),
                code: "InvalidResponse".into(),
                message: format!("unusable Expiration: {e}"),
                retryable: true,
            })?;
        let assumed_role_arn = out
            .assumed_role_user()
            .map(|u| u.arn().to_string())
            .unwrap_or_else(|| {
                format!(
                    "arn:aws:sts::{}:assumed-role/{}/{session_name}",
                    role.account_id, role.name
                )
            });
        Ok(build_session(
            creds.access_key_id().to_string(),
            creds.secret_access_key().to_string(),
            creds.session_token().to_string(),
            expiration,
            SystemTime::now(),
            assumed_role_arn,
            role.account_id,
        ))
    }
}

/// Whether a failed call was an expired web identity token.
pub fn is_expired_token(error: &CredentialError) -> bool {
    matches!(error, CredentialError::Upstream { service: SERVICE, code, .. }
        if classify_sts_error(Some(code), None) == StsErrorClass::ExpiredToken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_follow_sts_rules() {
        let ok = |s: &str| {
            (2..=64).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
        };
        assert_eq!(session_name("team-a", "web-7d9f"), "team-a.web-7d9f");
        assert_eq!(session_name("ns", "pöd/x"), "ns.p-d-x");
        let long_pod = "p".repeat(80);
        let a = session_name("ns", &long_pod);
        assert_eq!(a.len(), 64);
        assert!(ok(&a), "{a}");
        assert_eq!(a, session_name("ns", &long_pod), "deterministic");
        let b = session_name("ns", &format!("{}q", "p".repeat(79)));
        assert_ne!(a, b, "distinct pods, distinct names");
        assert_eq!(&a[..55], &b[..55]);
        assert!(ok(&session_name("a", "b")));
    }

    #[test]
    fn imds_body_exact() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600); // 2026-01-01T00:00:00Z
        let t1 = t0 + Duration::from_secs(3600);
        let body = render_imds_body("ASIA1", "se\"cret", "tok", t0, t1, None);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"Code":"Success","LastUpdated":"2026-01-01T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"ASIA1","SecretAccessKey":"se\"cret","Token":"tok","Expiration":"2026-01-01T01:00:00Z"}"#
        );
        let ext = render_imds_body("ASIA1", "s", "tok", t0, t1, Some("123456789012"));
        assert!(
            std::str::from_utf8(&ext)
                .unwrap()
                .ends_with(r#""Expiration":"2026-01-01T01:00:00Z","AccountId":"123456789012"}"#)
        );
    }

    #[test]
    fn role_arns() {
        assert_eq!(
            parse_role_arn("arn:aws:iam::123456789012:role/path/app-role"),
            Some(RoleArn {
                account_id: "123456789012".into(),
                name: "app-role".into()
            })
        );
        assert!(parse_role_arn("arn:aws-cn:iam::123456789012:role/r").is_some());
        for bad in [
            "arn:aws:iam::12345:role/r",
            "arn:aws:iam::123456789012:user/r",
            "arn:aws:sts::123456789012:role/r",
            "role/r",
            "arn:aws:iam::123456789012:role/",
        ] {
            assert_eq!(parse_role_arn(bad), None, "{bad}");
        }
    }

    #[test]
    fn sts_errors_classified_per_exchange_md() {
        use StsErrorClass::*;
        assert_eq!(
            classify_sts_error(Some("InvalidIdentityToken"), Some(400)),
            Retryable
        );
        assert_eq!(
            classify_sts_error(Some("IDPCommunicationError"), Some(400)),
            Retryable
        );
        assert_eq!(classify_sts_error(Some("Throttling"), Some(400)), Retryable);
        assert_eq!(
            classify_sts_error(Some("InternalFailure"), Some(500)),
            Retryable
        );
        assert_eq!(classify_sts_error(None, Some(503)), Retryable);
        assert_eq!(classify_sts_error(None, None), Retryable);
        assert_eq!(
            classify_sts_error(Some("ExpiredTokenException"), Some(400)),
            ExpiredToken
        );
        assert_eq!(
            classify_sts_error(Some("AccessDenied"), Some(403)),
            Permanent
        );
        assert_eq!(
            classify_sts_error(Some("IDPRejectedClaim"), Some(403)),
            Permanent
        );
        assert_eq!(
            classify_sts_error(Some("ValidationError"), Some(400)),
            Permanent
        );
        assert_eq!(
            classify_sts_error(Some("MalformedPolicyDocument"), Some(400)),
            Permanent
        );
    }

    #[test]
    fn settings_validation() {
        let base = AwsConfig {
            aws_region: Some("eu-west-1".into()),
            aws_sts_url: Some("http://127.0.0.1:9/".into()),
            aws_token_source: AwsTokenSource::Kubernetes,
            aws_token_audience: "sts.amazonaws.com".into(),
            aws_google_audience: "sts.amazonaws.com".into(),
            aws_session_duration: Duration::from_secs(3600),
            imds_allow_v1: false,
        };
        let s = AwsSettings::from_config(&base).unwrap();
        assert_eq!(s.sts_url.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(s.sts_region(), "eu-west-1");
        let mut c = base.clone();
        c.aws_session_duration = Duration::from_secs(60);
        assert!(
            AwsSettings::from_config(&c)
                .unwrap_err()
                .starts_with("--aws-session-duration")
        );
        let mut c = base.clone();
        c.aws_region = Some("EU West".into());
        assert!(
            AwsSettings::from_config(&c)
                .unwrap_err()
                .starts_with("--aws-region")
        );
        let mut c = base;
        c.aws_region = None;
        assert_eq!(
            AwsSettings::from_config(&c).unwrap().sts_region(),
            "us-east-1"
        );
    }
}
