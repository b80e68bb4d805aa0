//! The source-IP index of this node's live pods.
//!
//! Readers (every request) take a read lock for a hash lookup; writers (watch
//! events) hold the write lock only to update a few map entries.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use parking_lot::RwLock;
use tokio::sync::Notify;

use super::{PodInfo, PodKey};

#[derive(Debug, Clone, PartialEq)]
pub enum IpLookup {
    Unique(Arc<PodInfo>),
    /// Several live pods claim this IP; we refuse rather than guess.
    Conflict(Vec<PodKey>),
    Unknown,
}

#[derive(Default)]
struct State {
    pods: HashMap<PodKey, Arc<PodInfo>>,
    by_ip: HashMap<IpAddr, BTreeSet<PodKey>>,
}

#[derive(Default)]
pub struct PodIndex {
    state: RwLock<State>,
    changed: Notify,
}

impl PodIndex {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn lookup(&self, ip: IpAddr) -> IpLookup {
        let state = self.state.read();
        match state.by_ip.get(&ip) {
            None => IpLookup::Unknown,
            Some(keys) if keys.len() == 1 => {
                let key = keys.iter().next().expect("len is 1");
                IpLookup::Unique(state.pods[key].clone())
            }
            Some(keys) => IpLookup::Conflict(keys.iter().cloned().collect()),
        }
    }

    pub fn get(&self, key: &PodKey) -> Option<Arc<PodInfo>> {
        self.state.read().pods.get(key).cloned()
    }

    /// All indexed pods (for prefetching and pruning).
    pub fn pods(&self) -> Vec<Arc<PodInfo>> {
        self.state.read().pods.values().cloned().collect()
    }

    /// Applies a pod's current state: indexes it, re-indexes it, or removes it
    /// when it is no longer servable (`info` is `None`).
    /// Returns the IPs that became conflicted by this change.
    pub fn apply(&self, key: PodKey, info: Option<PodInfo>) -> Vec<IpAddr> {
        let conflicts = {
            let mut state = self.state.write();
            remove_locked(&mut state, &key);
            match info {
                Some(info) => insert_locked(&mut state, key, Arc::new(info)),
                None => Vec::new(),
            }
        };
        self.changed.notify_waiters();
        conflicts
    }

    /// Replaces the whole index (after a watch (re)list).
    pub fn reset(&self, pods: Vec<PodInfo>) -> Vec<IpAddr> {
        let mut conflicts = Vec::new();
        {
            let mut state = self.state.write();
            *state = State::default();
            for info in pods {
                let key = info.key();
                conflicts.extend(insert_locked(&mut state, key, Arc::new(info)));
            }
        }
        self.changed.notify_waiters();
        conflicts
    }

    pub fn len(&self) -> usize {
        self.state.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn conflicted_ips(&self) -> usize {
        self.state
            .read()
            .by_ip
            .values()
            .filter(|keys| keys.len() > 1)
            .count()
    }

    /// Waits until `ip` is known (unique or conflicted) or `deadline` passes.
    pub async fn wait_for(&self, ip: IpAddr, deadline: tokio::time::Instant) -> IpLookup {
        loop {
            // Register interest before checking, so a change between the
            // check and the await is not missed.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.lookup(ip) {
                IpLookup::Unknown => {}
                found => return found,
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return IpLookup::Unknown;
            }
        }
    }
}

fn remove_locked(state: &mut State, key: &PodKey) {
    if let Some(old) = state.pods.remove(key) {
        for ip in &old.ips {
            if let Some(keys) = state.by_ip.get_mut(ip) {
                keys.remove(key);
                if keys.is_empty() {
                    state.by_ip.remove(ip);
                }
            }
        }
    }
}

fn insert_locked(state: &mut State, key: PodKey, info: Arc<PodInfo>) -> Vec<IpAddr> {
    let mut conflicts = Vec::new();
    for ip in &info.ips {
        let keys = state.by_ip.entry(*ip).or_default();
        keys.insert(key.clone());
        if keys.len() > 1 {
            conflicts.push(*ip);
        }
    }
    state.pods.insert(key, info);
    conflicts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ips: &[&str]) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            service_account: "default".into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn indexes_every_ip_v4_and_v6() {
        let index = PodIndex::new();
        let p = pod("a", "p", &["10.0.0.1", "fd00::1"]);
        index.apply(p.key(), Some(p.clone()));
        for ip in ["10.0.0.1", "fd00::1"] {
            assert_eq!(
                index.lookup(ip.parse().unwrap()),
                IpLookup::Unique(Arc::new(p.clone()))
            );
        }
        assert_eq!(index.lookup("10.0.0.2".parse().unwrap()), IpLookup::Unknown);
    }

    #[test]
    fn two_live_pods_on_one_ip_conflict_until_one_goes() {
        let index = PodIndex::new();
        let a = pod("a", "old", &["10.0.0.1"]);
        let b = pod("a", "new", &["10.0.0.1"]);
        index.apply(a.key(), Some(a.clone()));
        let conflicts = index.apply(b.key(), Some(b.clone()));
        assert_eq!(conflicts, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(
            matches!(index.lookup("10.0.0.1".parse().unwrap()), IpLookup::Conflict(k) if k.len() == 2)
        );
        assert_eq!(index.conflicted_ips(), 1);
        // The old pod finishes: the IP belongs to the new one.
        index.apply(a.key(), None);
        assert_eq!(
            index.lookup("10.0.0.1".parse().unwrap()),
            IpLookup::Unique(Arc::new(b))
        );
        assert_eq!(index.conflicted_ips(), 0);
    }

    #[test]
    fn reapply_moves_ip() {
        let index = PodIndex::new();
        let mut p = pod("a", "p", &["10.0.0.1"]);
        index.apply(p.key(), Some(p.clone()));
        p.ips = vec!["10.0.0.9".parse().unwrap()];
        index.apply(p.key(), Some(p.clone()));
        assert_eq!(index.lookup("10.0.0.1".parse().unwrap()), IpLookup::Unknown);
        assert!(matches!(
            index.lookup("10.0.0.9".parse().unwrap()),
            IpLookup::Unique(_)
        ));
    }

    #[test]
    fn reset_replaces_everything() {
        let index = PodIndex::new();
        let a = pod("a", "gone", &["10.0.0.1"]);
        index.apply(a.key(), Some(a));
        index.reset(vec![pod("a", "kept", &["10.0.0.2"])]);
        assert_eq!(index.lookup("10.0.0.1".parse().unwrap()), IpLookup::Unknown);
        assert_eq!(index.len(), 1);
    }

    #[tokio::test]
    async fn wait_for_wakes_on_apply() {
        let index = Arc::new(PodIndex::new());
        let waiter = {
            let index = index.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
                index.wait_for("10.0.0.7".parse().unwrap(), deadline).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let p = pod("a", "late", &["10.0.0.7"]);
        index.apply(p.key(), Some(p));
        assert!(matches!(waiter.await.unwrap(), IpLookup::Unique(_)));
    }

    #[tokio::test]
    async fn wait_for_gives_up_at_deadline() {
        let index = PodIndex::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(30);
        assert_eq!(
            index.wait_for("10.0.0.7".parse().unwrap(), deadline).await,
            IpLookup::Unknown
        );
    }
}
