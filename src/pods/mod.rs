//! Who is calling: the node-scoped pod index keyed by source IP, the
//! ServiceAccount cache, and the resolver that turns a TCP peer address into a
//! [`Caller`] or a clear refusal.

mod index;
mod resolver;
mod watch;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

pub use index::{IpLookup, PodIndex};
pub use resolver::{LookupError, Resolver};
pub use watch::{NodeFacts, ServiceAccounts, WatchHandles, spawn_watchers};

/// What metabridge knows of a pod on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
}

impl PodInfo {
    /// Builds the index entry for a pod, or `None` when the pod must not be
    /// served by IP: hostNetwork pods (their IP is the node's), finished pods
    /// and pods being deleted (their IP may already belong to someone else).
    pub fn from_pod(pod: &k8s_openapi::api::core::v1::Pod) -> Option<Self> {
        let meta = &pod.metadata;
        if meta.deletion_timestamp.is_some() {
            return None;
        }
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            if let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok()) {
                ips.push(ip);
            }
        }
        if ips.is_empty() {
            return None;
        }
        Some(Self {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            uid: meta.uid.clone()?,
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            ips,
        })
    }

    pub fn key(&self) -> PodKey {
        PodKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A ServiceAccount as far as identity goes: its annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub annotations: BTreeMap<String, String>,
}

/// Annotation naming the Google service account a pod impersonates.
pub const GCP_SERVICE_ACCOUNT_ANNOTATION: &str = "iam.gke.io/gcp-service-account";
/// Annotation naming the AWS role a pod assumes (the IRSA convention).
pub const AWS_ROLE_ARN_ANNOTATION: &str = "eks.amazonaws.com/role-arn";
/// Per-ServiceAccount override of which token AWS is shown.
pub const AWS_TOKEN_SOURCE_ANNOTATION: &str = "metabridge.io/aws-token-source";

impl ServiceAccountInfo {
    pub fn from_service_account(sa: &k8s_openapi::api::core::v1::ServiceAccount) -> Option<Self> {
        Some(Self {
            namespace: sa.metadata.namespace.clone()?,
            name: sa.metadata.name.clone()?,
            uid: sa.metadata.uid.clone().unwrap_or_default(),
            annotations: sa.metadata.annotations.clone().unwrap_or_default(),
        })
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// `system:serviceaccount:NS:NAME`, the `sub` of its tokens.
    pub fn subject(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// The identified caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub pod: Arc<PodInfo>,
    pub service_account: Arc<ServiceAccountInfo>,
}

/// Identifies the pod behind a source IP. Implemented by [`Resolver`]; APIs
/// take it as a parameter so they can be tested without an API server.
pub trait Identify: Send + Sync + 'static {
    fn identify(
        &self,
        ip: IpAddr,
    ) -> impl std::future::Future<Output = Result<Caller, LookupError>> + Send;
}

impl Identify for Resolver {
    fn identify(
        &self,
        ip: IpAddr,
    ) -> impl std::future::Future<Output = Result<Caller, LookupError>> + Send {
        self.resolve(ip)
    }
}
