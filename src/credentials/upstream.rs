//! The real minter: Kubernetes TokenRequest → Google STS (+ IAM Credentials)
//! or AWS STS, each call retried per [`RetryPolicy`] when retryable.

use std::time::SystemTime;

use futures::{FutureExt, future::BoxFuture};

use super::{
    AwsSession, CredentialError, GoogleAccessToken, GoogleIdToken, RetryPolicy,
    aws::{self, AwsSettings, StsClient},
    cache::Mint,
    google::{self, GoogleClient, GoogleSettings, StsToken},
    kube::KubeTokens,
};
use crate::{
    config::{AwsTokenSource, GcpProviderType, RunConfig},
    metrics::Metrics,
    pods::{AWS_ROLE_ARN_ANNOTATION, Caller},
};

pub struct Upstream {
    kube: KubeTokens,
    google: Option<GoogleClient>,
    aws: AwsSettings,
    sts: StsClient,
    retry: RetryPolicy,
}

impl Upstream {
    pub fn new(
        config: &RunConfig,
        client: ::kube::Client,
        metrics: Metrics,
    ) -> Result<Self, String> {
        let google = GoogleSettings::from_config(&config.gcp)?
            .map(|s| GoogleClient::new(s, metrics.clone()))
            .transpose()?;
        let aws = AwsSettings::from_config(&config.aws)?;
        let sts = StsClient::new(&aws, metrics.clone());
        Ok(Self {
            kube: KubeTokens::new(client, metrics),
            google,
            aws,
            sts,
            retry: RetryPolicy::default(),
        })
    }

    pub fn google_settings(&self) -> Option<&GoogleSettings> {
        self.google.as_ref().map(GoogleClient::settings)
    }

    pub fn aws_settings(&self) -> &AwsSettings {
        &self.aws
    }

    fn google(&self) -> Result<&GoogleClient, CredentialError> {
        self.google
            .as_ref()
            .ok_or_else(|| CredentialError::NotConfigured {
                message:
                    "the GCE metadata API is not enabled (set --gcp-workload-identity-provider)"
                        .into(),
            })
    }

    async fn kube_token(&self, caller: &Caller, audience: &str) -> Result<String, CredentialError> {
        self.retry
            .run(|| self.kube.token(caller, audience))
            .await
            .map(|t| t.token)
    }

    /// The STS-exchanged federated token of the pod's identity.
    async fn federated(
        &self,
        caller: &Caller,
        scopes: &[String],
    ) -> Result<StsToken, CredentialError> {
        let google = self.google()?;
        let settings = google.settings();
        let (subject, subject_type) = match settings.provider_type {
            GcpProviderType::Oidc => (
                self.kube_token(caller, &settings.token_audience).await?,
                google::TOKEN_TYPE_JWT,
            ),
            GcpProviderType::Aws => {
                let role = caller
                    .service_account
                    .annotation(AWS_ROLE_ARN_ANNOTATION)
                    .ok_or_else(|| CredentialError::NotConfigured {
                        message: format!(
                            "the AWS workload identity provider needs the {AWS_ROLE_ARN_ANNOTATION} annotation on {}/{}",
                            caller.pod.namespace, caller.pod.service_account
                        ),
                    })?;
                let session = self
                    .assume(caller, role, AwsTokenSource::Kubernetes)
                    .await?;
                let keys = google::AwsKeys {
                    access_key_id: &session.access_key_id,
                    secret_access_key: &session.secret_access_key,
                    session_token: Some(&session.session_token),
                };
                (
                    google::aws_subject_token(
                        &keys,
                        self.aws.sts_region(),
                        &settings.sts_audience,
                        SystemTime::now(),
                    )?,
                    google::TOKEN_TYPE_AWS4,
                )
            }
        };
        self.retry
            .run(|| google.sts_exchange(&subject, subject_type, scopes))
            .await
    }

    /// AssumeRoleWithWebIdentity with retries; an expired web identity token
    /// gets one more try with a freshly minted one.
    ///
    /// NB: boxed, because the flows recurse by type (Google's AWS provider
    /// assumes a role; the google AWS token source asks Google).
    fn assume<'a>(
        &'a self,
        caller: &'a Caller,
        role_arn: &'a str,
        source: AwsTokenSource,
    ) -> BoxFuture<'a, Result<AwsSession, CredentialError>> {
        self.assume_inner(caller, role_arn, source).boxed()
    }

    async fn assume_inner(
        &self,
        caller: &Caller,
        role_arn: &str,
        source: AwsTokenSource,
    ) -> Result<AwsSession, CredentialError> {
        let name = aws::session_name(&caller.pod.namespace, &caller.pod.name);
        let mut fresh_token_retry = true;
        loop {
            let token = match source {
                AwsTokenSource::Kubernetes => {
                    self.kube_token(caller, &self.aws.token_audience).await?
                }
                AwsTokenSource::Google => {
                    let gsa = caller
                        .service_account
                        .annotation(crate::pods::GCP_SERVICE_ACCOUNT_ANNOTATION)
                        .ok_or_else(|| CredentialError::NotConfigured {
                            message: google::missing_gsa_message(
                                &caller.pod.namespace,
                                &caller.pod.service_account,
                            ),
                        })?
                        .to_string();
                    let id = self
                        .google_id(caller, &gsa, &self.aws.google_audience, true)
                        .await?;
                    String::from_utf8_lossy(&id.token).into_owned()
                }
            };
            let result = self
                .retry
                .run(|| {
                    self.sts
                        .assume_role(role_arn, &name, &token, self.aws.session_duration)
                })
                .await;
            match result {
                Err(e) if fresh_token_retry && aws::is_expired_token(&e) => {
                    fresh_token_retry = false;
                }
                other => return other,
            }
        }
    }
}

impl Mint for Upstream {
    async fn google_access(
        &self,
        caller: &Caller,
        gsa: Option<&str>,
        scopes: &[String],
    ) -> Result<GoogleAccessToken, CredentialError> {
        match gsa {
            None => {
                let t = self.federated(caller, scopes).await?;
                Ok(GoogleAccessToken::new(t.access_token, t.expires_at))
            }
            Some(gsa) => {
                let google = self.google()?;
                let t = self
                    .federated(caller, &google::impersonation_scopes())
                    .await?;
                self.retry
                    .run(|| google.generate_access_token(&t.access_token, gsa, scopes))
                    .await
            }
        }
    }

    async fn google_id(
        &self,
        caller: &Caller,
        gsa: &str,
        audience: &str,
        full: bool,
    ) -> Result<GoogleIdToken, CredentialError> {
        let google = self.google()?;
        let t = self
            .federated(caller, &google::impersonation_scopes())
            .await?;
        self.retry
            .run(|| google.generate_id_token(&t.access_token, gsa, audience, full))
            .await
    }

    async fn aws_session(
        &self,
        caller: &Caller,
        role_arn: &str,
        source: AwsTokenSource,
    ) -> Result<AwsSession, CredentialError> {
        self.assume(caller, role_arn, source).await
    }
}
