//! Turns a TCP peer address into the calling pod, or a refusal that says why.

use std::{net::IpAddr, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::{Api, Client, api::ListParams};
use tokio::time::Instant;

use super::{Caller, IpLookup, PodIndex, PodInfo, PodKey, ServiceAccountInfo, ServiceAccounts};
use crate::metrics::Metrics;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("no pod on node {node} has IP {ip}")]
    NotFound { ip: IpAddr, node: String },
    #[error(
        "{ip} belongs to a hostNetwork pod ({pod}); hostNetwork pods share the node's identity and are not served"
    )]
    HostNetwork { ip: IpAddr, pod: PodKey },
    #[error("IP {ip} is claimed by several live pods ({}); refusing to guess", .pods.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    Conflict { ip: IpAddr, pods: Vec<PodKey> },
    #[error("service account {namespace}/{name} of the calling pod was not found")]
    ServiceAccountNotFound { namespace: String, name: String },
    #[error("could not identify {ip} within {timeout:?}: {reason}")]
    Unavailable {
        ip: IpAddr,
        timeout: Duration,
        reason: String,
    },
}

impl LookupError {
    /// Whether the caller may succeed by retrying shortly (the pod is not
    /// known *yet*, or the API server is unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::NotFound { .. } | Self::Unavailable { .. })
    }
}

#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

/// How long an API answer of "no such pod" is trusted before asking again;
/// protects the API server from a caller it will never know (a hostNetwork
/// process, a pod of another node) hammering the metadata address.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Bound on remembered negative answers.
const NEGATIVE_MAX: usize = 4096;
/// Concurrent direct pod lookups at the API server.
const API_LOOKUP_CONCURRENCY: usize = 8;

struct Inner {
    index: Arc<PodIndex>,
    negative: parking_lot::Mutex<std::collections::HashMap<IpAddr, (Instant, LookupError)>>,
    api_lookups: tokio::sync::Semaphore,
    service_accounts: ServiceAccounts,
    client: Client,
    node_name: String,
    timeout: Duration,
    metrics: Metrics,
}

impl Resolver {
    pub fn new(
        index: Arc<PodIndex>,
        service_accounts: ServiceAccounts,
        client: Client,
        node_name: String,
        timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                index,
                negative: Default::default(),
                api_lookups: tokio::sync::Semaphore::new(API_LOOKUP_CONCURRENCY),
                service_accounts,
                client,
                node_name,
                timeout,
                metrics,
            }),
        }
    }

    pub fn index(&self) -> &Arc<PodIndex> {
        &self.inner.index
    }

    pub fn service_accounts(&self) -> &ServiceAccounts {
        &self.inner.service_accounts
    }

    /// Identifies the pod behind `ip`. The hot path is one read-locked hash
    /// lookup; an unknown IP waits briefly for the watch, then asks the API
    /// server, all within the configured bound.
    pub async fn resolve(&self, ip: IpAddr) -> Result<Caller, LookupError> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.timeout;
        let pod = match inner.index.lookup(ip) {
            IpLookup::Unique(pod) => pod,
            IpLookup::Conflict(pods) => return Err(LookupError::Conflict { ip, pods }),
            IpLookup::Unknown => self.resolve_unknown(ip, deadline).await?,
        };
        let service_account = self.service_account_of(&pod, deadline).await?;
        Ok(Caller {
            pod,
            service_account,
        })
    }

    async fn resolve_unknown(
        &self,
        ip: IpAddr,
        deadline: Instant,
    ) -> Result<Arc<PodInfo>, LookupError> {
        let inner = &self.inner;
        let outcome = |o: &str| {
            inner
                .metrics
                .unknown_ip_lookups
                .with_label_values(&[o])
                .inc()
        };
        // Most unknown IPs are pods seconds old: give the watch half the budget.
        let watch_deadline = Instant::now() + inner.timeout / 2;
        match inner.index.wait_for(ip, watch_deadline.min(deadline)).await {
            IpLookup::Unique(pod) => {
                outcome("watch");
                return Ok(pod);
            }
            IpLookup::Conflict(pods) => {
                outcome("conflict");
                return Err(LookupError::Conflict { ip, pods });
            }
            IpLookup::Unknown => {}
        }
        if let Some(error) = self.recent_negative(ip) {
            outcome("not_found");
            return Err(error);
        }
        let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, inner.api_lookups.acquire()).await
        else {
            outcome("error");
            return Err(LookupError::Unavailable {
                ip,
                timeout: inner.timeout,
                reason: "too many concurrent lookups of unknown callers".into(),
            });
        };
        let api: Api<Pod> = Api::all(inner.client.clone());
        let params = ListParams::default().fields(&format!(
            "spec.nodeName={},status.podIP={ip}",
            inner.node_name
        ));
        let listed = tokio::time::timeout_at(deadline, api.list(&params)).await;
        let pods = match listed {
            Ok(Ok(list)) => list.items,
            Ok(Err(error)) => {
                outcome("error");
                return Err(LookupError::Unavailable {
                    ip,
                    timeout: inner.timeout,
                    reason: format!("pod lookup at the API server failed: {error}"),
                });
            }
            Err(_) => {
                outcome("error");
                return Err(LookupError::Unavailable {
                    ip,
                    timeout: inner.timeout,
                    reason:
                        "the pod watch had not seen it and the API server did not answer in time"
                            .into(),
                });
            }
        };
        let live: Vec<PodInfo> = pods.iter().filter_map(PodInfo::from_pod).collect();
        match live.as_slice() {
            [one] => {
                outcome("api");
                Ok(Arc::new(one.clone()))
            }
            [] => {
                outcome("not_found");
                let error = match pods
                    .iter()
                    .find(|p| p.spec.as_ref().and_then(|s| s.host_network) == Some(true))
                {
                    Some(host) => LookupError::HostNetwork {
                        ip,
                        pod: PodKey {
                            namespace: host.metadata.namespace.clone().unwrap_or_default(),
                            name: host.metadata.name.clone().unwrap_or_default(),
                        },
                    },
                    None => LookupError::NotFound {
                        ip,
                        node: inner.node_name.clone(),
                    },
                };
                self.remember_negative(ip, error.clone());
                Err(error)
            }
            many => {
                outcome("conflict");
                Err(LookupError::Conflict {
                    ip,
                    pods: many.iter().map(PodInfo::key).collect(),
                })
            }
        }
    }

    fn recent_negative(&self, ip: IpAddr) -> Option<LookupError> {
        let negative = self.inner.negative.lock();
        negative
            .get(&ip)
            .filter(|(at, _)| at.elapsed() < NEGATIVE_TTL)
            .map(|(_, error)| error.clone())
    }

    fn remember_negative(&self, ip: IpAddr, error: LookupError) {
        let mut negative = self.inner.negative.lock();
        if negative.len() >= NEGATIVE_MAX {
            negative.retain(|_, (at, _)| at.elapsed() < NEGATIVE_TTL);
            if negative.len() >= NEGATIVE_MAX {
                negative.clear();
            }
        }
        negative.insert(ip, (Instant::now(), error));
    }

    async fn service_account_of(
        &self,
        pod: &PodInfo,
        deadline: Instant,
    ) -> Result<Arc<ServiceAccountInfo>, LookupError> {
        let inner = &self.inner;
        if let Some(sa) = inner
            .service_accounts
            .get(&pod.namespace, &pod.service_account)
        {
            return Ok(Arc::new(sa));
        }
        // Created moments ago and not yet seen by the watch: ask directly.
        let api: Api<ServiceAccount> = Api::namespaced(inner.client.clone(), &pod.namespace);
        match tokio::time::timeout_at(deadline, api.get_opt(&pod.service_account)).await {
            Ok(Ok(Some(sa))) => ServiceAccountInfo::from_service_account(&sa)
                .map(Arc::new)
                .ok_or_else(|| LookupError::ServiceAccountNotFound {
                    namespace: pod.namespace.clone(),
                    name: pod.service_account.clone(),
                }),
            Ok(Ok(None)) => Err(LookupError::ServiceAccountNotFound {
                namespace: pod.namespace.clone(),
                name: pod.service_account.clone(),
            }),
            Ok(Err(error)) => Err(LookupError::Unavailable {
                ip: pod.ips[0],
                timeout: inner.timeout,
                reason: format!("service account lookup failed: {error}"),
            }),
            Err(_) => Err(LookupError::Unavailable {
                ip: pod.ips[0],
                timeout: inner.timeout,
                reason: "service account lookup timed out".into(),
            }),
        }
    }
}
