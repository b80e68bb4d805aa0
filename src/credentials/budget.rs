//! A bound on how long a request waits for a credential being minted.
//!
//! SDKs give the metadata server about one second (botocore, JS) and many do
//! not retry, so a request answers "retry shortly" (a 5xx every SDK that
//! retries understands) rather than hang past their timeout. The mint itself
//! keeps going in the cache, so the retry is a hit.

use std::{sync::Arc, time::Duration};

use super::{
    AwsCredentialSource, AwsSession, CredentialError, GoogleAccessToken, GoogleCredentialSource,
    GoogleIdToken,
};
use crate::pods::Caller;

pub struct Budgeted<S> {
    inner: S,
    wait: Duration,
}

impl<S> Budgeted<S> {
    pub fn new(inner: S, wait: Duration) -> Self {
        Self { inner, wait }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn timed_out(&self) -> CredentialError {
        CredentialError::Upstream {
            service: "metabridge",
            status: None,
            code: "MintInProgress".into(),
            message: format!(
                "the credential is still being minted after {}ms; retry shortly",
                self.wait.as_millis()
            ),
            retryable: true,
        }
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, CredentialError>>,
    ) -> Result<T, CredentialError> {
        tokio::time::timeout(self.wait, fut)
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
    }
}

impl<S: GoogleCredentialSource> GoogleCredentialSource for Budgeted<S> {
    async fn access_token(
        &self,
        caller: &Caller,
        scopes: &[String],
    ) -> Result<Arc<GoogleAccessToken>, CredentialError> {
        self.bounded(self.inner.access_token(caller, scopes)).await
    }

    async fn id_token(
        &self,
        caller: &Caller,
        audience: &str,
        full: bool,
    ) -> Result<Arc<GoogleIdToken>, CredentialError> {
        self.bounded(self.inner.id_token(caller, audience, full))
            .await
    }
}

impl<S: AwsCredentialSource> AwsCredentialSource for Budgeted<S> {
    async fn session(
        &self,
        caller: &Caller,
        role_arn: &str,
    ) -> Result<Arc<AwsSession>, CredentialError> {
        self.bounded(self.inner.session(caller, role_arn)).await
    }
}
