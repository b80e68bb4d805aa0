//! Kubernetes TokenRequest: a short-lived token of the pod's own service
//! account, for one audience, bound to the pod (exchange.md §1).

use std::time::{Duration, SystemTime};

use ::kube::{Api, Client, api::PostParams};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};

use super::CredentialError;
use crate::{metrics::Metrics, pods::Caller};

/// Requested token lifetime; the API server may shorten it, so the returned
/// `status.expirationTimestamp` is what counts.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// A service-account token as the API server issued it.
#[derive(Clone)]
pub struct KubeToken {
    pub token: String,
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for KubeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: never print the token itself.
        f.debug_struct("KubeToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Mints pod-bound tokens through the API server.
#[derive(Clone)]
pub struct KubeTokens {
    client: Client,
    metrics: Metrics,
}

impl KubeTokens {
    pub fn new(client: Client, metrics: Metrics) -> Self {
        Self { client, metrics }
    }

    /// A token of `caller`'s service account for `audience`, bound to the pod
    /// (so a deleted pod's token dies with it).
    pub async fn token(
        &self,
        caller: &Caller,
        audience: &str,
    ) -> Result<KubeToken, CredentialError> {
        let pod = &caller.pod;
        let request = token_request(&pod.name, &pod.uid, audience);
        let api = Api::<ServiceAccount>::namespaced(self.client.clone(), &pod.namespace);
        let timer = self.metrics.upstream_timer("kube_token_request");
        let result = api
            .create_token_request(&pod.service_account, &PostParams::default(), &request)
            .await;
        timer.finish(result.is_ok());
        let service_account = format!("{}/{}", pod.namespace, pod.service_account);
        let response = result.map_err(|error| kube_error(&service_account, error))?;
        let status = response.status.unwrap_or_default();
        let token =
            status
                .token
                .filter(|t| !t.is_empty())
                .ok_or_else(|| CredentialError::KubeToken {
                    service_account: service_account.clone(),
                    status: 500,
                    message: "the TokenRequest response carries no token".into(),
                })?;
        let expires_at = status
            .expiration_timestamp
            .map(|t| timestamp_to_system_time(t.0))
            .unwrap_or_else(|| {
                SystemTime::now() + Duration::from_secs(TOKEN_EXPIRATION_SECONDS as u64)
            });
        Ok(KubeToken { token, expires_at })
    }
}

/// The TokenRequest body: one audience, 3600 s, bound to the pod by name and uid.
pub fn token_request(pod_name: &str, pod_uid: &str, audience: &str) -> TokenRequest {
    TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name.to_string()),
                uid: Some(pod_uid.to_string()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn timestamp_to_system_time(ts: k8s_openapi::jiff::Timestamp) -> SystemTime {
    SystemTime::from(ts)
}

/// Maps a kube error to [`CredentialError::KubeToken`], keeping the API
/// server's Status message (it names what is wrong: RBAC, uid mismatch, …).
fn kube_error(service_account: &str, error: ::kube::Error) -> CredentialError {
    let (status, message) = match error {
        ::kube::Error::Api(status) => {
            let code = if status.code == 0 { 500 } else { status.code };
            let message = if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            };
            (code, message)
        }
        // Transport problems: retryable like a 503.
        other => (503, other.to_string()),
    };
    CredentialError::KubeToken {
        service_account: service_account.to_string(),
        status,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_request_binds_to_the_pod() {
        let body = serde_json::to_value(token_request("web-1", "uid-1", "aud-x")).unwrap();
        assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(body["kind"], "TokenRequest");
        assert_eq!(body["spec"]["audiences"], serde_json::json!(["aud-x"]));
        assert_eq!(body["spec"]["expirationSeconds"], 3600);
        assert_eq!(
            body["spec"]["boundObjectRef"],
            serde_json::json!({"kind":"Pod","apiVersion":"v1","name":"web-1","uid":"uid-1"})
        );
    }

    #[test]
    fn api_status_message_is_kept() {
        let status: ::kube::core::Status = serde_json::from_value(serde_json::json!({
            "kind":"Status","apiVersion":"v1","status":"Failure",
            "message":"serviceaccounts \"x\" is forbidden","reason":"Forbidden","code":403
        }))
        .unwrap();
        let err = kube_error("ns/x", ::kube::Error::Api(Box::new(status)));
        match &err {
            CredentialError::KubeToken {
                status, message, ..
            } => {
                assert_eq!(*status, 403);
                assert_eq!(message, "serviceaccounts \"x\" is forbidden");
            }
            other => panic!("{other:?}"),
        }
        assert!(!err.is_retryable());
    }
}
