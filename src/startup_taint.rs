//! The node-startup guard: node provisioning taints a new node with
//! `--startup-taint` (e.g. `metabridge.io/agent-not-ready:NoSchedule`) so no
//! workload pod lands there before interception is in place; metabridge
//! removes the taint once it is ready.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

/// Removes every taint with key `key` from `node_name`, retrying until it is
/// gone or `shutdown` resolves. The patch carries the resourceVersion it was
/// computed from, so a concurrent change to the node's taints is never lost.
pub async fn remove(client: Client, node_name: &str, key: &str) {
    let api: Api<Node> = Api::all(client);
    let mut delay = Duration::from_millis(200);
    loop {
        match try_remove(&api, node_name, key).await {
            Ok(removed) => {
                if removed {
                    tracing::info!(node = node_name, taint = key, "startup taint removed");
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, node = node_name, taint = key, "cannot remove startup taint; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn try_remove(api: &Api<Node>, node_name: &str, key: &str) -> Result<bool, kube::Error> {
    let node = api.get(node_name).await?;
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let kept: Vec<_> = taints.iter().filter(|t| t.key != key).cloned().collect();
    if kept.len() == taints.len() {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": node.metadata.resource_version },
        "spec": { "taints": kept },
    });
    api.patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(true)
}
