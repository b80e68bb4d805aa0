//! Watches that keep the pod index, the ServiceAccount cache and this node's
//! Node object current. Each is one list+watch with backoff; a (re)list
//! replaces the cached state atomically.

use std::{collections::HashMap, sync::Arc};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher::{self, Event, watcher},
    },
};
use parking_lot::RwLock;
use tokio::sync::watch as signal;

use super::{PodIndex, PodInfo, ServiceAccountInfo};
use crate::metrics::Metrics;

/// The ServiceAccounts of the cluster, kept by a watch, read per request.
#[derive(Clone)]
pub struct ServiceAccounts {
    store: Store<ServiceAccount>,
}

impl ServiceAccounts {
    pub fn get(&self, namespace: &str, name: &str) -> Option<ServiceAccountInfo> {
        self.store
            .get(&ObjectRef::new(name).within(namespace))
            .and_then(|sa| ServiceAccountInfo::from_service_account(&sa))
    }
}

/// Node facts pods may be told (zone, provider id), from the Node object.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub labels: std::collections::BTreeMap<String, String>,
    pub provider_id: Option<String>,
    pub internal_ip: Option<String>,
}

impl NodeFacts {
    pub fn zone(&self) -> Option<&str> {
        self.labels
            .get("topology.kubernetes.io/zone")
            .or_else(|| self.labels.get("failure-domain.beta.kubernetes.io/zone"))
            .map(String::as_str)
    }

    pub fn region(&self) -> Option<&str> {
        self.labels
            .get("topology.kubernetes.io/region")
            .or_else(|| self.labels.get("failure-domain.beta.kubernetes.io/region"))
            .map(String::as_str)
    }

    pub fn instance_type(&self) -> Option<&str> {
        self.labels
            .get("node.kubernetes.io/instance-type")
            .map(String::as_str)
    }
}

pub struct WatchHandles {
    pub service_accounts: ServiceAccounts,
    pub node: Arc<RwLock<NodeFacts>>,
    /// True once pods and ServiceAccounts have each been listed once.
    pub synced: signal::Receiver<bool>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    index: Arc<PodIndex>,
    metrics: Metrics,
    on_pod: impl Fn(&PodInfo) + Send + Sync + 'static,
) -> WatchHandles {
    let (pods_synced_tx, mut pods_synced_rx) = signal::channel(false);
    let (sas_synced_tx, mut sas_synced_rx) = signal::channel(false);
    let (synced_tx, synced_rx) = signal::channel(false);

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(watch_pods(
        Api::all(client.clone()),
        format!("spec.nodeName={node_name}"),
        index,
        metrics.clone(),
        pods_synced_tx,
        on_pod,
    )));

    let (reader, writer) = reflector::store::<ServiceAccount>();
    let sa_metrics = metrics.clone();
    let sa_api = Api::<ServiceAccount>::all(client.clone());
    tasks.push(tokio::spawn(async move {
        let stream = watcher(sa_api, watcher::Config::default())
            .default_backoff()
            .modify(|sa| {
                // Only annotations matter; drop the rest to keep the cache small.
                sa.managed_fields_mut().clear();
                sa.secrets = None;
                sa.image_pull_secrets = None;
            })
            .reflect(writer);
        futures::pin_mut!(stream);
        loop {
            match stream.next().await {
                Some(Ok(Event::InitDone)) => {
                    let _ = sas_synced_tx.send(true);
                }
                Some(Ok(Event::Init)) => {
                    sa_metrics
                        .watch_restarts
                        .with_label_values(&["serviceaccounts"])
                        .inc();
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    sa_metrics
                        .watch_restarts
                        .with_label_values(&["serviceaccounts"])
                        .inc();
                    tracing::warn!(%error, "serviceaccount watch failed; retrying with backoff");
                }
                None => break,
            }
        }
    }));

    let node = Arc::new(RwLock::new(NodeFacts::default()));
    {
        let node = node.clone();
        let api = Api::<Node>::all(client.clone());
        let selector = format!("metadata.name={node_name}");
        let metrics = metrics.clone();
        tasks.push(tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default().fields(&selector))
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            loop {
                match stream.try_next().await {
                    Ok(Some(n)) => {
                        let facts = NodeFacts {
                            labels: n.metadata.labels.clone().unwrap_or_default(),
                            provider_id: n.spec.as_ref().and_then(|s| s.provider_id.clone()),
                            internal_ip: n
                                .status
                                .as_ref()
                                .and_then(|s| s.addresses.as_ref())
                                .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                                .map(|a| a.address.clone()),
                        };
                        *node.write() = facts;
                    }
                    Ok(None) => break,
                    Err(error) => {
                        metrics.watch_restarts.with_label_values(&["nodes"]).inc();
                        tracing::warn!(%error, "node watch failed; retrying with backoff");
                    }
                }
            }
        }));
    }

    tasks.push(tokio::spawn(async move {
        let both = async {
            let _ = pods_synced_rx.wait_for(|s| *s).await;
            let _ = sas_synced_rx.wait_for(|s| *s).await;
        };
        both.await;
        let _ = synced_tx.send(true);
    }));

    WatchHandles {
        service_accounts: ServiceAccounts { store: reader },
        node,
        synced: synced_rx,
        tasks,
    }
}

async fn watch_pods(
    api: Api<Pod>,
    field_selector: String,
    index: Arc<PodIndex>,
    metrics: Metrics,
    synced: signal::Sender<bool>,
    on_pod: impl Fn(&PodInfo) + Send + Sync + 'static,
) {
    let stream = watcher(api, watcher::Config::default().fields(&field_selector))
        .default_backoff()
        .modify(|pod| pod.managed_fields_mut().clear());
    futures::pin_mut!(stream);
    // Pods seen during a (re)list, swapped in whole at InitDone so a relist
    // never leaves a half-empty index.
    let mut relist: Option<HashMap<super::PodKey, PodInfo>> = None;
    loop {
        let event = match stream.next().await {
            Some(Ok(event)) => event,
            Some(Err(error)) => {
                metrics.watch_restarts.with_label_values(&["pods"]).inc();
                tracing::warn!(%error, "pod watch failed; retrying with backoff");
                continue;
            }
            None => break,
        };
        match event {
            Event::Init => {
                metrics.watch_restarts.with_label_values(&["pods"]).inc();
                relist = Some(HashMap::new());
            }
            Event::InitApply(pod) => {
                if let Some(info) = PodInfo::from_pod(&pod) {
                    on_pod(&info);
                    relist
                        .get_or_insert_with(HashMap::new)
                        .insert(info.key(), info);
                }
            }
            Event::InitDone => {
                let pods = relist.take().unwrap_or_default().into_values().collect();
                report_conflicts(&index.reset(pods));
                let _ = synced.send(true);
            }
            Event::Apply(pod) => {
                let key = pod_key(&pod);
                let info = PodInfo::from_pod(&pod);
                if let Some(info) = &info {
                    on_pod(info);
                }
                report_conflicts(&index.apply(key, info));
            }
            Event::Delete(pod) => {
                index.apply(pod_key(&pod), None);
            }
        }
        metrics.pods_indexed.set(index.len() as i64);
        metrics.pod_ip_conflicts.set(index.conflicted_ips() as i64);
    }
}

fn pod_key(pod: &Pod) -> super::PodKey {
    super::PodKey {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
    }
}

fn report_conflicts(ips: &[std::net::IpAddr]) {
    for ip in ips {
        tracing::warn!(%ip, "two live pods claim one IP; refusing to answer for it until one goes");
    }
}
