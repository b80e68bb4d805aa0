//! The credential cache every API serves from.
//!
//! - **Keys** are identities: the pod's ServiceAccount (namespace/name), the
//!   annotations that pick its target (Google SA, AWS role, token source) and
//!   what is asked (scopes, audience/format, role). With `--cache-key pod`
//!   the pod's uid is part of the key too.
//! - **Single flight**: a miss starts one spawned mint per key; concurrent
//!   callers await the same shared result. The mint runs to completion even
//!   if every caller gives up, so its result is cached.
//! - **Refresh ahead**: at 50–70 % of a credential's lifetime (jittered), and
//!   no later than twice the minimum lifetime before expiry, a refresh starts
//!   in the background (from the hit path and from [`CredentialCache::tick`]).
//! - **Stale serving**: a failed refresh keeps the old credential in service
//!   while it has at least the minimum lifetime left, and is retried with
//!   exponential backoff and jitter.
//! - **Never short**: nothing is handed out with less than
//!   `--min-credential-lifetime` left (AWS: at least 15 min, botocore's
//!   advisory refresh window, aws.md §0).
//! - **Prefetch** when a pod appears, **prune** entries whose identity no
//!   live pod uses any more.
//!
//! The hit path takes the map's read lock and one entry's mutex, each only
//! for a lookup and an `Arc` clone; writers hold them just as briefly.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use parking_lot::{Mutex, RwLock};

use super::{
    AwsCredentialSource, AwsSession, CredentialError, GoogleAccessToken, GoogleCredentialSource,
    GoogleIdToken, aws::parse_role_arn, format_utc_seconds, google, jitter,
};
use crate::{
    config::{AwsTokenSource, CacheKeying, GcpProviderType},
    metrics::Metrics,
    pods::{
        AWS_ROLE_ARN_ANNOTATION, AWS_TOKEN_SOURCE_ANNOTATION, Caller,
        GCP_SERVICE_ACCOUNT_ANNOTATION, PodIndex, ServiceAccounts,
    },
};

/// botocore refreshes on every access below 15 minutes (aws.md §0, §4).
pub const AWS_MIN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// How often [`CredentialCache::spawn_background`] ticks.
const TICK: Duration = Duration::from_secs(5);
/// Every this many ticks, prune and prefetch from the pod index.
const PRUNE_EVERY: u32 = 6;
/// First retry delay after a failed mint, doubled per failure up to the cap.
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);
/// A refresh is never scheduled sooner than this after a mint.
const MIN_REFRESH_DELAY: Duration = Duration::from_secs(10);
/// Unused entries without a valid credential are dropped after this.
const IDLE_GRACE: Duration = Duration::from_secs(60);

/// Wall-clock time, injectable so tests control expiry.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// What the cache holds, for metric labels and lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKind {
    GoogleAccessToken,
    GoogleIdToken,
    AwsSession,
}

impl TargetKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::GoogleAccessToken => "google_access_token",
            Self::GoogleIdToken => "google_id_token",
            Self::AwsSession => "aws_session",
        }
    }

    fn cloud(self) -> &'static str {
        match self {
            Self::AwsSession => "aws",
            _ => "google",
        }
    }

    fn issued_kind(self) -> &'static str {
        match self {
            Self::GoogleAccessToken => "access_token",
            Self::GoogleIdToken => "id_token",
            Self::AwsSession => "aws_session",
        }
    }

    const ALL: [Self; 3] = [
        Self::GoogleAccessToken,
        Self::GoogleIdToken,
        Self::AwsSession,
    ];
}

/// The minting machinery behind the cache (the real one is
/// [`super::Upstream`]; tests use fakes). Arguments are already validated.
pub trait Mint: Send + Sync + 'static {
    /// An access token: impersonating `gsa` if given, else the federated token.
    fn google_access(
        &self,
        caller: &Caller,
        gsa: Option<&str>,
        scopes: &[String],
    ) -> impl Future<Output = Result<GoogleAccessToken, CredentialError>> + Send;

    /// An ID token of `gsa` for `audience`.
    fn google_id(
        &self,
        caller: &Caller,
        gsa: &str,
        audience: &str,
        full: bool,
    ) -> impl Future<Output = Result<GoogleIdToken, CredentialError>> + Send;

    /// A session of `role_arn`, shown the token `source` picks.
    fn aws_session(
        &self,
        caller: &Caller,
        role_arn: &str,
        source: AwsTokenSource,
    ) -> impl Future<Output = Result<AwsSession, CredentialError>> + Send;
}

/// Which APIs are enabled and how identities resolve.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `Some` when the GCE API is enabled.
    pub google: Option<GcpProviderType>,
    /// `Some(default token source)` when the IMDS API is enabled.
    pub aws: Option<AwsTokenSource>,
    pub keying: CacheKeying,
    pub min_lifetime: Duration,
    /// On-demand (not kept warm) entries one principal may hold.
    pub max_on_demand: usize,
}

impl Policy {
    fn min_lifetime(&self, kind: TargetKind) -> Duration {
        match kind {
            TargetKind::AwsSession => self.min_lifetime.max(AWS_MIN_LIFETIME),
            _ => self.min_lifetime,
        }
    }
}

/// Who: the ServiceAccount and the annotations that pick its targets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Principal {
    namespace: String,
    service_account: String,
    /// Only with `--cache-key pod`.
    pod_uid: Option<String>,
    gsa: Option<String>,
    role: Option<String>,
    token_source: Option<String>,
}

impl Principal {
    fn of(caller: &Caller, keying: CacheKeying) -> Self {
        let sa = &caller.service_account;
        Self {
            namespace: caller.pod.namespace.clone(),
            service_account: caller.pod.service_account.clone(),
            pod_uid: (keying == CacheKeying::Pod).then(|| caller.pod.uid.clone()),
            gsa: sa
                .annotation(GCP_SERVICE_ACCOUNT_ANNOTATION)
                .map(String::from),
            role: sa.annotation(AWS_ROLE_ARN_ANNOTATION).map(String::from),
            token_source: sa.annotation(AWS_TOKEN_SOURCE_ANNOTATION).map(String::from),
        }
    }

    /// The part known without the ServiceAccount's annotations.
    fn base(&self) -> (String, String, Option<String>) {
        (
            self.namespace.clone(),
            self.service_account.clone(),
            self.pod_uid.clone(),
        )
    }
}

/// What is asked of that identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Request {
    GoogleAccess { scopes: Vec<String> },
    GoogleId { audience: String, full: bool },
    Aws { role_arn: String, source: bool },
}

impl Request {
    fn kind(&self) -> TargetKind {
        match self {
            Self::GoogleAccess { .. } => TargetKind::GoogleAccessToken,
            Self::GoogleId { .. } => TargetKind::GoogleIdToken,
            Self::Aws { .. } => TargetKind::AwsSession,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    principal: Principal,
    request: Request,
}

#[derive(Debug, Clone)]
enum Value {
    Access(Arc<GoogleAccessToken>),
    Id(Arc<GoogleIdToken>),
    Aws(Arc<AwsSession>),
}

impl Value {
    fn expires_at(&self) -> SystemTime {
        match self {
            Self::Access(v) => v.expires_at,
            Self::Id(v) => v.expires_at,
            Self::Aws(v) => v.expiration,
        }
    }
}

type Flight = Shared<BoxFuture<'static, Result<Value, CredentialError>>>;

struct Entry {
    key: Key,
    /// Kept fresh while its identity lives (what prefetch mints: the default
    /// access token, AWS sessions). Other entries are refreshed only while
    /// used and dropped once expired.
    keep_warm: bool,
    /// A live pod of this identity: the one tokens are bound to on refresh.
    caller: Mutex<Caller>,
    state: Mutex<State>,
}

struct State {
    value: Option<Value>,
    refresh_at: SystemTime,
    /// Last failure, served while no usable value exists and `retry_at` is ahead.
    error: Option<CredentialError>,
    retry_at: SystemTime,
    failures: u32,
    flight: Option<Flight>,
    /// When the current value was minted, and when anyone last asked.
    minted_at: SystemTime,
    last_used: SystemTime,
}

struct Inner<M> {
    minter: M,
    policy: Policy,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    entries: RwLock<HashMap<Key, Arc<Entry>>>,
}

/// The credential cache, generic over its minter. The app uses
/// [`Credentials`](super::Credentials).
pub struct CredentialCache<M> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for CredentialCache<M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// The cache over the real upstreams.
pub type Credentials = CredentialCache<super::Upstream>;

impl Credentials {
    /// Builds the cache and its upstream clients from the configuration.
    /// Errors are one line naming the flag.
    pub fn new(
        config: &crate::config::RunConfig,
        client: ::kube::Client,
        metrics: Metrics,
    ) -> Result<Self, String> {
        let upstream = super::Upstream::new(config, client, metrics.clone())?;
        let policy = Policy {
            google: upstream.google_settings().map(|s| s.provider_type),
            aws: upstream
                .aws_settings()
                .region
                .as_ref()
                .map(|_| upstream.aws_settings().token_source),
            keying: config.cache.cache_key,
            min_lifetime: config.cache.min_credential_lifetime,
            max_on_demand: config.cache.max_credentials_per_identity,
        };
        if policy.min_lifetime >= Duration::from_secs(30 * 60) {
            return Err(format!(
                "--min-credential-lifetime {}: must be under 30m (credentials live about 1h)",
                humantime::format_duration(policy.min_lifetime)
            ));
        }
        Ok(Self::with_minter(
            upstream,
            policy,
            Arc::new(SystemClock),
            metrics,
        ))
    }
}

impl<M: Mint> CredentialCache<M> {
    pub fn with_minter(minter: M, policy: Policy, clock: Arc<dyn Clock>, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                minter,
                policy,
                clock,
                metrics,
                entries: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// Whether the GCE API has credentials to serve.
    pub fn google_enabled(&self) -> bool {
        self.inner.policy.google.is_some()
    }

    /// Whether the IMDS API has credentials to serve.
    pub fn aws_enabled(&self) -> bool {
        self.inner.policy.aws.is_some()
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.inner.entries.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Mints under way (tests wait for background work with it).
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.inner
            .entries
            .read()
            .values()
            .filter(|e| e.state.lock().flight.is_some())
            .count()
    }

    /// Starts minting in the background what `caller` will ask for first (the
    /// default-scope Google access token if the GCE API is enabled; the
    /// role's AWS session if the IMDS API is enabled and the ServiceAccount
    /// names a role), so the pod's first request is a hit. Needs a runtime.
    pub fn prefetch(&self, caller: Caller) {
        if self.google_enabled()
            && let Ok(key) = self.google_access_key(&caller, &[])
        {
            self.ensure(key, &caller);
        }
        if self.aws_enabled()
            && let Some(role) = caller
                .service_account
                .annotation(AWS_ROLE_ARN_ANNOTATION)
                .map(String::from)
            && let Ok(key) = self.aws_key(&caller, &role)
        {
            self.ensure(key, &caller);
        }
    }

    /// Drops entries whose identity no caller in `live` has, and rebinds the
    /// remaining ones to a live pod for their next refresh. Callers whose
    /// ServiceAccount is unknown (`None`) keep every entry of that
    /// ServiceAccount (its annotations cannot be checked yet).
    pub fn retain_live(&self, live: &[Caller], unknown_sa: &[(String, String, String)]) {
        let keying = self.inner.policy.keying;
        let mut by_principal: HashMap<Principal, &Caller> = HashMap::new();
        for caller in live {
            by_principal
                .entry(Principal::of(caller, keying))
                .or_insert(caller);
        }
        let unknown: HashSet<(String, String, Option<String>)> = unknown_sa
            .iter()
            .map(|(ns, sa, uid)| {
                (
                    ns.clone(),
                    sa.clone(),
                    (keying == CacheKeying::Pod).then(|| uid.clone()),
                )
            })
            .collect();
        let live_uids: HashSet<&str> = live.iter().map(|c| c.pod.uid.as_str()).collect();
        let mut entries = self.inner.entries.write();
        let before = entries.len();
        entries.retain(|key, entry| {
            if let Some(caller) = by_principal.get(&key.principal) {
                let mut bound = entry.caller.lock();
                if !live_uids.contains(bound.pod.uid.as_str()) {
                    *bound = (*caller).clone();
                }
                true
            } else {
                unknown.contains(&key.principal.base())
            }
        });
        let dropped = before - entries.len();
        drop(entries);
        if dropped > 0 {
            tracing::debug!(dropped, "pruned credentials no live pod uses");
        }
        self.update_gauges();
    }

    /// One round of background work: refresh what is due, retry retryable
    /// failures whose backoff has passed, update the gauges.
    pub fn tick(&self) {
        let now = self.inner.clock.now();
        let entries: Vec<Arc<Entry>> = self.inner.entries.read().values().cloned().collect();
        let mut idle = Vec::new();
        for entry in entries {
            let mut st = entry.state.lock();
            if st.flight.is_some() {
                continue;
            }
            if is_idle(&entry, &st, now) {
                idle.push(entry.key.clone());
                continue;
            }
            if now < st.retry_at {
                continue;
            }
            let due = match &st.value {
                Some(v) if v.expires_at() > now => {
                    now >= st.refresh_at && (entry.keep_warm || st.last_used > st.minted_at)
                }
                // No (live) value: retry only what may succeed by retrying.
                _ => st.error.as_ref().is_some_and(CredentialError::is_retryable),
            };
            if due {
                let caller = entry.caller.lock().clone();
                let refresh = st.value.is_some();
                st.flight = Some(self.start_flight(entry.clone(), caller, refresh));
            }
        }
        if !idle.is_empty() {
            let mut entries = self.inner.entries.write();
            for key in idle {
                // Re-checked: a request may have picked it up meanwhile.
                let still_idle = entries.get(&key).is_some_and(|e| {
                    let st = e.state.lock();
                    st.flight.is_none() && is_idle(e, &st, now)
                });
                if still_idle {
                    entries.remove(&key);
                }
            }
        }
        self.update_gauges();
    }

    /// Runs [`tick`](Self::tick) every few seconds and, every half minute,
    /// prunes against the pod index and prefetches for its pods, until
    /// `shutdown` resolves.
    pub fn spawn_background(
        &self,
        index: Arc<PodIndex>,
        service_accounts: ServiceAccounts,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n: u32 = 0;
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = interval.tick() => {}
                }
                n = n.wrapping_add(1);
                if n.is_multiple_of(PRUNE_EVERY) {
                    let mut live = Vec::new();
                    let mut unknown = Vec::new();
                    for pod in index.pods() {
                        match service_accounts.get(&pod.namespace, &pod.service_account) {
                            Some(sa) => live.push(Caller {
                                pod: pod.clone(),
                                service_account: Arc::new(sa),
                            }),
                            None => unknown.push((
                                pod.namespace.clone(),
                                pod.service_account.clone(),
                                pod.uid.clone(),
                            )),
                        }
                    }
                    this.retain_live(&live, &unknown);
                    for caller in live {
                        this.prefetch(caller);
                    }
                }
                this.tick();
            }
        })
    }

    // === keys: validation of what the ServiceAccount asks for ===

    fn google_access_key(
        &self,
        caller: &Caller,
        scopes: &[String],
    ) -> Result<Key, CredentialError> {
        let provider_type = self.google_policy()?;
        let principal = Principal::of(caller, self.inner.policy.keying);
        if let Some(gsa) = &principal.gsa {
            validate_gsa(gsa)?;
        }
        if provider_type == GcpProviderType::Aws && principal.role.is_none() {
            return Err(CredentialError::NotConfigured {
                message: format!(
                    "Your Kubernetes service account ({}/{}) is not annotated with an AWS role, which the AWS workload identity provider requires. Please add the {AWS_ROLE_ARN_ANNOTATION}=arn:aws:iam::[ACCOUNT]:role/[NAME] annotation to your Kubernetes service account.",
                    principal.namespace, principal.service_account
                ),
            });
        }
        if let Some(role) = &principal.role
            && provider_type == GcpProviderType::Aws
        {
            validate_role(role)?;
        }
        Ok(Key {
            principal,
            request: Request::GoogleAccess {
                scopes: google::normalize_scopes(scopes),
            },
        })
    }

    fn google_id_key(
        &self,
        caller: &Caller,
        audience: &str,
        full: bool,
    ) -> Result<Key, CredentialError> {
        // Same checks as an access token (the STS leg is shared) …
        let mut key = self.google_access_key(caller, &[])?;
        // … plus a Google SA to generate the ID token.
        let Some(gsa) = &key.principal.gsa else {
            return Err(CredentialError::NotConfigured {
                message: google::missing_gsa_message(
                    &key.principal.namespace,
                    &key.principal.service_account,
                ),
            });
        };
        let _ = gsa;
        key.request = Request::GoogleId {
            audience: audience.to_string(),
            full,
        };
        Ok(key)
    }

    fn aws_key(&self, caller: &Caller, role_arn: &str) -> Result<Key, CredentialError> {
        let Some(default_source) = self.inner.policy.aws else {
            return Err(CredentialError::NotConfigured {
                message: "the IMDS API is not enabled (set --aws-region)".into(),
            });
        };
        validate_role(role_arn)?;
        let principal = Principal::of(caller, self.inner.policy.keying);
        let source = match principal.token_source.as_deref() {
            None => default_source,
            Some(s) if s.eq_ignore_ascii_case("kubernetes") => AwsTokenSource::Kubernetes,
            Some(s) if s.eq_ignore_ascii_case("google") => AwsTokenSource::Google,
            Some(other) => {
                return Err(CredentialError::InvalidAnnotation {
                    message: format!(
                        "{AWS_TOKEN_SOURCE_ANNOTATION}={other:?} on {}/{}: must be \"kubernetes\" or \"google\"",
                        principal.namespace, principal.service_account
                    ),
                });
            }
        };
        if source == AwsTokenSource::Google {
            if self.inner.policy.google.is_none() {
                return Err(CredentialError::NotConfigured {
                    message: "the google AWS token source needs the Google side configured (--gcp-workload-identity-provider)".into(),
                });
            }
            match &principal.gsa {
                None => {
                    return Err(CredentialError::NotConfigured {
                        message: format!(
                            "Your Kubernetes service account ({}/{}) is not annotated with a target Google service account, which the google AWS token source requires. Please add the {GCP_SERVICE_ACCOUNT_ANNOTATION}=[GSA_NAME]@[PROJECT_ID].iam.gserviceaccount.com annotation to your Kubernetes service account.",
                            principal.namespace, principal.service_account
                        ),
                    });
                }
                Some(gsa) => validate_gsa(gsa)?,
            }
        }
        Ok(Key {
            principal,
            request: Request::Aws {
                role_arn: role_arn.to_string(),
                source: source == AwsTokenSource::Google,
            },
        })
    }

    fn google_policy(&self) -> Result<GcpProviderType, CredentialError> {
        self.inner
            .policy
            .google
            .ok_or_else(|| CredentialError::NotConfigured {
                message:
                    "the GCE metadata API is not enabled (set --gcp-workload-identity-provider)"
                        .into(),
            })
    }

    // === the cache proper ===

    fn entry(&self, key: Key, caller: &Caller) -> Result<Arc<Entry>, CredentialError> {
        if let Some(e) = self.inner.entries.read().get(&key) {
            return Ok(e.clone());
        }
        let keep_warm = match &key.request {
            Request::Aws { .. } => true,
            Request::GoogleAccess { scopes } => *scopes == google::normalize_scopes(&[]),
            Request::GoogleId { .. } => false,
        };
        let mut entries = self.inner.entries.write();
        if !keep_warm && !entries.contains_key(&key) {
            // What a pod can vary at will (audiences, scope sets) is bounded
            // per identity; what prefetch keeps warm is one per identity.
            let limit = self.inner.policy.max_on_demand;
            let held = entries
                .values()
                .filter(|e| !e.keep_warm && e.key.principal == key.principal)
                .count();
            if held >= limit {
                return Err(CredentialError::TooManyCredentials {
                    namespace: key.principal.namespace.clone(),
                    service_account: key.principal.service_account.clone(),
                    limit,
                });
            }
        }
        Ok(entries
            .entry(key.clone())
            .or_insert_with(|| {
                let now = self.inner.clock.now();
                Arc::new(Entry {
                    key,
                    keep_warm,
                    caller: Mutex::new(caller.clone()),
                    state: Mutex::new(State {
                        value: None,
                        refresh_at: SystemTime::UNIX_EPOCH,
                        error: None,
                        retry_at: SystemTime::UNIX_EPOCH,
                        failures: 0,
                        flight: None,
                        minted_at: SystemTime::UNIX_EPOCH,
                        last_used: now,
                    }),
                })
            })
            .clone())
    }

    /// Makes sure an entry exists and is being (or has been) minted.
    fn ensure(&self, key: Key, caller: &Caller) {
        let Ok(entry) = self.entry(key, caller) else {
            return; // at the identity's limit: nothing to prefetch
        };
        let mut st = entry.state.lock();
        if st.value.is_none() && st.error.is_none() && st.flight.is_none() {
            st.flight = Some(self.start_flight(entry.clone(), caller.clone(), false));
        }
    }

    async fn get(&self, key: Key, caller: &Caller) -> Result<Value, CredentialError> {
        let kind = key.request.kind();
        let min = self.inner.policy.min_lifetime(kind);
        let entry = self.entry(key, caller)?;
        let flight = {
            let now = self.inner.clock.now();
            let mut st = entry.state.lock();
            st.last_used = now;
            if let Some(v) = st.value.clone().filter(|v| usable(v, now, min)) {
                self.inner
                    .metrics
                    .cache_hits
                    .with_label_values(&[kind.label()])
                    .inc();
                // Refresh ahead from the hit path too, without waiting.
                if st.flight.is_none() && now >= st.refresh_at && now >= st.retry_at {
                    let bound = entry.caller.lock().clone();
                    st.flight = Some(self.start_flight(entry.clone(), bound, true));
                }
                return Ok(v);
            }
            if st.flight.is_none()
                && let Some(error) = &st.error
                && now < st.retry_at
            {
                // Failed recently: answer at once rather than hammer upstream.
                return Err(error.clone());
            }
            self.inner
                .metrics
                .cache_misses
                .with_label_values(&[kind.label()])
                .inc();
            match &st.flight {
                Some(f) => f.clone(),
                None => {
                    let f = self.start_flight(entry.clone(), caller.clone(), st.value.is_some());
                    st.flight = Some(f.clone());
                    f
                }
            }
        };
        let result = flight.await;
        let now = self.inner.clock.now();
        match result {
            Ok(v) if usable(&v, now, min) => Ok(v),
            Ok(v) => Err(too_short(kind, &v, now, min)),
            Err(error) => Err(error),
        }
    }

    /// Spawns the one mint for `entry`; the returned future is shared by
    /// every waiter. Called with the entry's state locked (spawning never
    /// runs the task inline).
    fn start_flight(&self, entry: Arc<Entry>, caller: Caller, refresh: bool) -> Flight {
        let this = self.clone();
        let task = tokio::spawn(async move {
            let kind = entry.key.request.kind();
            let result = this.mint(&entry.key, &caller).await;
            let now = this.inner.clock.now();
            let min = this.inner.policy.min_lifetime(kind);
            let mut st = entry.state.lock();
            st.flight = None;
            let outcome = match &result {
                Ok(v) => {
                    st.value = Some(v.clone());
                    st.error = None;
                    st.failures = 0;
                    st.retry_at = SystemTime::UNIX_EPOCH;
                    st.minted_at = now;
                    st.refresh_at = refresh_at(now, v.expires_at(), min);
                    drop(st);
                    log_issued(&entry.key, &caller, v);
                    this.update_gauges();
                    "ok"
                }
                Err(error) => {
                    st.failures = st.failures.saturating_add(1);
                    st.error = Some(error.clone());
                    st.retry_at = now + retry_delay(st.failures);
                    let still_valid = st.value.as_ref().is_some_and(|v| usable(v, now, min));
                    drop(st);
                    tracing::warn!(
                        pod = %format!("{}/{}", caller.pod.namespace, caller.pod.name),
                        service_account = %format!("{}/{}", entry.key.principal.namespace, entry.key.principal.service_account),
                        kind = kind.label(),
                        %error,
                        serving_previous = still_valid,
                        "minting a credential failed"
                    );
                    "error"
                }
            };
            let m = &this.inner.metrics;
            m.credentials_issued
                .with_label_values(&[kind.cloud(), kind.issued_kind(), outcome])
                .inc();
            if refresh {
                m.cache_refreshes
                    .with_label_values(&[kind.label(), outcome])
                    .inc();
            }
            result
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(CredentialError::Upstream {
                    service: "metabridge",
                    status: None,
                    code: "internal".into(),
                    message: format!("credential minting task failed: {e}"),
                    retryable: true,
                })
            })
        }
        .boxed()
        .shared()
    }

    async fn mint(&self, key: &Key, caller: &Caller) -> Result<Value, CredentialError> {
        let minter = &self.inner.minter;
        let gsa = key.principal.gsa.as_deref();
        match &key.request {
            Request::GoogleAccess { scopes } => minter
                .google_access(caller, gsa, scopes)
                .await
                .map(|v| Value::Access(Arc::new(v))),
            Request::GoogleId { audience, full } => minter
                .google_id(caller, gsa.unwrap_or_default(), audience, *full)
                .await
                .map(|v| Value::Id(Arc::new(v))),
            Request::Aws { role_arn, source } => {
                let source = if *source {
                    AwsTokenSource::Google
                } else {
                    AwsTokenSource::Kubernetes
                };
                minter
                    .aws_session(caller, role_arn, source)
                    .await
                    .map(|v| Value::Aws(Arc::new(v)))
            }
        }
    }

    fn update_gauges(&self) {
        let entries: Vec<Arc<Entry>> = self.inner.entries.read().values().cloned().collect();
        let now = self.inner.clock.now();
        let mut counts: HashMap<TargetKind, i64> = HashMap::new();
        let mut soonest: Option<SystemTime> = None;
        for e in &entries {
            *counts.entry(e.key.request.kind()).or_default() += 1;
            // Only credentials metabridge keeps fresh: an idle one-off ID
            // token is allowed to run out and must not look like a failure.
            if !e.keep_warm {
                continue;
            }
            if let Some(v) = &e.state.lock().value {
                let exp = v.expires_at();
                soonest = Some(soonest.map_or(exp, |s| s.min(exp)));
            }
        }
        let m = &self.inner.metrics;
        for kind in TargetKind::ALL {
            m.cache_entries
                .with_label_values(&[kind.label()])
                .set(counts.get(&kind).copied().unwrap_or(0));
        }
        let secs = soonest
            .map(|s| match s.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            })
            // NaN ("no data"): nothing kept fresh, so nothing can be late.
            .unwrap_or(f64::NAN);
        m.cache_soonest_expiry.set(secs);
    }
}

/// Nothing valid to serve, nothing worth retrying in the background, and no
/// one asked for a while: the entry can go.
fn is_idle(entry: &Entry, st: &State, now: SystemTime) -> bool {
    let live = st.value.as_ref().is_some_and(|v| v.expires_at() > now);
    let retrying = entry.keep_warm && st.error.as_ref().is_some_and(CredentialError::is_retryable);
    !live && !retrying && now >= st.retry_at && now >= st.last_used + IDLE_GRACE
}

fn usable(v: &Value, now: SystemTime, min: Duration) -> bool {
    v.expires_at() >= now + min
}

fn too_short(kind: TargetKind, v: &Value, now: SystemTime, min: Duration) -> CredentialError {
    let left = v.expires_at().duration_since(now).unwrap_or_default();
    CredentialError::Upstream {
        service: match kind {
            TargetKind::AwsSession => "AWS STS",
            _ => "Google",
        },
        status: None,
        code: "lifetime_too_short".into(),
        message: format!(
            "the new credential lives {}s, less than the {}s metabridge must leave clients",
            left.as_secs(),
            min.as_secs()
        ),
        retryable: false,
    }
}

/// When to refresh a credential minted at `now`: at 50–70 % of its lifetime,
/// and no later than twice the minimum lifetime before expiry.
fn refresh_at(now: SystemTime, expires_at: SystemTime, min: Duration) -> SystemTime {
    let lifetime = expires_at.duration_since(now).unwrap_or_default();
    let fraction: f64 = rand::random_range(0.5..=0.7);
    let by_fraction = now + lifetime.mul_f64(fraction);
    let by_window = expires_at
        .checked_sub(min * 2)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    by_fraction.min(by_window).max(now + MIN_REFRESH_DELAY)
}

/// Backoff after `failures` consecutive failures: 1 s doubling to 60 s, jittered.
fn retry_delay(failures: u32) -> Duration {
    let exp = RETRY_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    jitter(exp.min(RETRY_CAP), 0.5)
}

fn validate_gsa(gsa: &str) -> Result<(), CredentialError> {
    let ok = gsa
        .split_once('@')
        .is_some_and(|(name, domain)| !name.is_empty() && domain.contains('.'))
        && !gsa.contains(|c: char| c.is_whitespace() || c == '/' || c == ':');
    if ok {
        Ok(())
    } else {
        Err(CredentialError::InvalidAnnotation {
            message: format!(
                "{GCP_SERVICE_ACCOUNT_ANNOTATION}={gsa:?}: not a Google service account email (NAME@PROJECT_ID.iam.gserviceaccount.com)"
            ),
        })
    }
}

fn validate_role(role: &str) -> Result<(), CredentialError> {
    parse_role_arn(role)
        .map(|_| ())
        .ok_or_else(|| CredentialError::InvalidAnnotation {
            message: format!(
                "{AWS_ROLE_ARN_ANNOTATION}={role:?}: not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"
            ),
        })
}

/// Every issued credential is logged once: who, as what, until when. Never
/// the secret.
fn log_issued(key: &Key, caller: &Caller, v: &Value) {
    let p = &key.principal;
    let target = match (&key.request, v) {
        (_, Value::Aws(s)) => s.assumed_role_arn.clone(),
        (_, _) => match &p.gsa {
            Some(gsa) => gsa.clone(),
            None => format!(
                "federated principal system:serviceaccount:{}:{}",
                p.namespace, p.service_account
            ),
        },
    };
    let detail = match &key.request {
        Request::GoogleAccess { scopes } => scopes.join(" "),
        Request::GoogleId { audience, full } => {
            format!(
                "audience={audience} format={}",
                if *full { "full" } else { "standard" }
            )
        }
        Request::Aws { source, .. } => {
            format!(
                "token_source={}",
                if *source { "google" } else { "kubernetes" }
            )
        }
    };
    tracing::info!(
        pod = %format!("{}/{}", caller.pod.namespace, caller.pod.name),
        service_account = %format!("{}/{}", p.namespace, p.service_account),
        kind = key.request.kind().label(),
        target = %target,
        detail = %detail,
        expires_at = %format_utc_seconds(v.expires_at()),
        "issued credential"
    );
}

// === impl the API traits ===

impl<M: Mint> GoogleCredentialSource for CredentialCache<M> {
    async fn access_token(
        &self,
        caller: &Caller,
        scopes: &[String],
    ) -> Result<Arc<GoogleAccessToken>, CredentialError> {
        let key = self.google_access_key(caller, scopes)?;
        match self.get(key, caller).await? {
            Value::Access(v) => Ok(v),
            _ => unreachable!("access-token keys hold access tokens"),
        }
    }

    async fn id_token(
        &self,
        caller: &Caller,
        audience: &str,
        full: bool,
    ) -> Result<Arc<GoogleIdToken>, CredentialError> {
        let key = self.google_id_key(caller, audience, full)?;
        match self.get(key, caller).await? {
            Value::Id(v) => Ok(v),
            _ => unreachable!("id-token keys hold id tokens"),
        }
    }
}

impl<M: Mint> AwsCredentialSource for CredentialCache<M> {
    async fn session(
        &self,
        caller: &Caller,
        role_arn: &str,
    ) -> Result<Arc<AwsSession>, CredentialError> {
        let key = self.aws_key(caller, role_arn)?;
        match self.get(key, caller).await? {
            Value::Aws(v) => Ok(v),
            _ => unreachable!("aws keys hold sessions"),
        }
    }
}

#[cfg(test)]
mod tests;
