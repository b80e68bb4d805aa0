//! The cache against a fake minter and a fake clock.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::*;
use crate::{
    credentials::aws::build_session,
    pods::{PodInfo, ServiceAccountInfo},
};

const HOUR: Duration = Duration::from_secs(3600);
const MIN_LIFETIME: Duration = Duration::from_secs(300);

struct FakeClock(Mutex<SystemTime>);

impl FakeClock {
    fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
        )))
    }
    fn advance(&self, d: Duration) {
        *self.0.lock() += d;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
}

#[derive(Clone)]
struct FakeMint {
    clock: Arc<FakeClock>,
    calls: Arc<AtomicUsize>,
    lifetime: Arc<Mutex<Duration>>,
    fail: Arc<Mutex<Option<CredentialError>>>,
    delay: Duration,
    /// (namespace/pod) each mint was bound to.
    bound_to: Arc<Mutex<Vec<String>>>,
}

impl FakeMint {
    fn new(clock: Arc<FakeClock>) -> Self {
        Self {
            clock,
            calls: Arc::new(AtomicUsize::new(0)),
            lifetime: Arc::new(Mutex::new(HOUR)),
            fail: Arc::new(Mutex::new(None)),
            delay: Duration::from_millis(1),
            bound_to: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    async fn step(&self, caller: &Caller) -> Result<(usize, SystemTime), CredentialError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.bound_to
            .lock()
            .push(format!("{}/{}", caller.pod.namespace, caller.pod.name));
        tokio::time::sleep(self.delay).await;
        if let Some(e) = self.fail.lock().clone() {
            return Err(e);
        }
        Ok((n, self.clock.now() + *self.lifetime.lock()))
    }
}

impl Mint for FakeMint {
    async fn google_access(
        &self,
        caller: &Caller,
        gsa: Option<&str>,
        scopes: &[String],
    ) -> Result<GoogleAccessToken, CredentialError> {
        let (n, exp) = self.step(caller).await?;
        Ok(GoogleAccessToken::new(
            format!("tok-{n}-{}-{}", gsa.unwrap_or("direct"), scopes.join(",")),
            exp,
        ))
    }

    async fn google_id(
        &self,
        caller: &Caller,
        gsa: &str,
        audience: &str,
        _full: bool,
    ) -> Result<GoogleIdToken, CredentialError> {
        let (n, exp) = self.step(caller).await?;
        Ok(GoogleIdToken {
            token: format!("id-{n}-{gsa}-{audience}").into(),
            expires_at: exp,
        })
    }

    async fn aws_session(
        &self,
        caller: &Caller,
        role_arn: &str,
        _source: AwsTokenSource,
    ) -> Result<AwsSession, CredentialError> {
        let (n, exp) = self.step(caller).await?;
        Ok(build_session(
            format!("ASIA{n}"),
            "secret".into(),
            "token".into(),
            exp,
            self.clock.now(),
            format!("{role_arn}-session"),
            "123456789012".into(),
        ))
    }
}

fn caller(ns: &str, pod: &str, sa: &str, annotations: &[(&str, &str)]) -> Caller {
    Caller {
        pod: Arc::new(PodInfo {
            namespace: ns.into(),
            name: pod.into(),
            uid: format!("uid-{pod}"),
            service_account: sa.into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        }),
        service_account: Arc::new(ServiceAccountInfo {
            namespace: ns.into(),
            name: sa.into(),
            uid: format!("uid-sa-{sa}"),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }),
    }
}

const GSA: &str = "app@proj.iam.gserviceaccount.com";
const ROLE: &str = "arn:aws:iam::123456789012:role/app";

fn setup(keying: CacheKeying) -> (CredentialCache<FakeMint>, FakeMint, Arc<FakeClock>, Metrics) {
    let clock = FakeClock::new();
    let mint = FakeMint::new(clock.clone());
    let metrics = Metrics::new();
    let cache = CredentialCache::with_minter(
        mint.clone(),
        Policy {
            google: Some(GcpProviderType::Oidc),
            aws: Some(AwsTokenSource::Kubernetes),
            keying,
            min_lifetime: MIN_LIFETIME,
            max_on_demand: 64,
        },
        clock.clone(),
        metrics.clone(),
    );
    (cache, mint, clock, metrics)
}

/// Waits (real time, briefly) until no mint is under way.
async fn settle<M: Mint>(cache: &CredentialCache<M>) {
    for _ in 0..500 {
        if cache.in_flight() == 0 {
            // Let the spawned task finish its bookkeeping.
            tokio::task::yield_now().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("mint did not finish");
}

fn unavailable() -> CredentialError {
    CredentialError::Upstream {
        service: "Google STS",
        status: Some(503),
        code: "unavailable".into(),
        message: "try later".into(),
        retryable: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_misses_make_one_mint() {
    let (cache, mut mint, _clock, metrics) = setup(CacheKeying::Identity);
    mint.delay = Duration::from_millis(50);
    // Rebuild with the slow minter.
    let cache = CredentialCache::with_minter(
        mint.clone(),
        cache.inner.policy.clone(),
        cache.inner.clock.clone(),
        metrics.clone(),
    );
    let c = caller("ns", "p1", "sa", &[(GCP_SERVICE_ACCOUNT_ANNOTATION, GSA)]);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let cache = cache.clone();
            let c = c.clone();
            tokio::spawn(async move { cache.access_token(&c, &[]).await })
        })
        .collect();
    let mut tokens = HashSet::new();
    for t in tasks {
        tokens.insert(t.await.unwrap().unwrap().access_token.clone());
    }
    assert_eq!(mint.calls(), 1);
    assert_eq!(tokens.len(), 1);
    // And the next one is a hit.
    cache.access_token(&c, &[]).await.unwrap();
    assert_eq!(mint.calls(), 1);
    assert!(
        metrics
            .cache_hits
            .with_label_values(&["google_access_token"])
            .get()
            >= 1
    );
    assert_eq!(
        metrics
            .credentials_issued
            .with_label_values(&["google", "access_token", "ok"])
            .get(),
        1
    );
}

#[tokio::test]
async fn keys_separate_scopes_audiences_and_kinds() {
    let (cache, mint, _clock, _m) = setup(CacheKeying::Identity);
    let c = caller(
        "ns",
        "p1",
        "sa",
        &[
            (GCP_SERVICE_ACCOUNT_ANNOTATION, GSA),
            (AWS_ROLE_ARN_ANNOTATION, ROLE),
        ],
    );
    let a = cache.access_token(&c, &[]).await.unwrap();
    let b = cache
        .access_token(
            &c,
            &["https://www.googleapis.com/auth/cloud-platform".into()],
        )
        .await
        .unwrap();
    assert_ne!(a.access_token, b.access_token);
    // Scope order and duplicates do not make a new key.
    let a2 = cache
        .access_token(
            &c,
            &[
                "https://www.googleapis.com/auth/userinfo.email".into(),
                "https://www.googleapis.com/auth/cloud-platform,https://www.googleapis.com/auth/userinfo.email"
                    .into(),
            ],
        )
        .await
        .unwrap();
    assert_eq!(a.access_token, a2.access_token);
    let i1 = cache.id_token(&c, "aud-1", true).await.unwrap();
    let i2 = cache.id_token(&c, "aud-2", true).await.unwrap();
    let i3 = cache.id_token(&c, "aud-1", false).await.unwrap();
    assert_ne!(i1.token, i2.token);
    assert_ne!(i1.token, i3.token);
    let s = cache.session(&c, ROLE).await.unwrap();
    assert_eq!(s.assumed_role_arn, format!("{ROLE}-session"));
    assert_eq!(mint.calls(), 6);
    assert_eq!(cache.len(), 6);
}

#[tokio::test]
async fn refresh_ahead_replaces_before_expiry() {
    let (cache, mint, clock, metrics) = setup(CacheKeying::Identity);
    let c = caller("ns", "p1", "sa", &[]);
    let first = cache.access_token(&c, &[]).await.unwrap();
    // Before 50 % of the lifetime nothing is due.
    clock.advance(Duration::from_secs(1700));
    cache.tick();
    settle(&cache).await;
    assert_eq!(mint.calls(), 1);
    // After 70 % (and before the 2×min window) a refresh is due.
    clock.advance(Duration::from_secs(900)); // t = 2600 s, 1000 s left
    cache.tick();
    settle(&cache).await;
    assert_eq!(mint.calls(), 2);
    let second = cache.access_token(&c, &[]).await.unwrap();
    assert_ne!(first.access_token, second.access_token);
    assert!(second.expires_at > first.expires_at);
    assert_eq!(
        metrics
            .cache_refreshes
            .with_label_values(&["google_access_token", "ok"])
            .get(),
        1
    );
    // expires_in counts down truthfully from the new credential.
    assert_eq!(second.expires_in(clock.now()), 3600);
}

#[tokio::test]
async fn refresh_is_also_started_from_the_hit_path() {
    let (cache, mint, clock, _m) = setup(CacheKeying::Identity);
    let c = caller("ns", "p1", "sa", &[]);
    let first = cache.access_token(&c, &[]).await.unwrap();
    clock.advance(Duration::from_secs(2600));
    // The hit still answers at once with the current credential …
    let served = cache.access_token(&c, &[]).await.unwrap();
    assert_eq!(served.access_token, first.access_token);
    // … and a refresh runs behind it.
    settle(&cache).await;
    assert_eq!(mint.calls(), 2);
    let next = cache.access_token(&c, &[]).await.unwrap();
    assert_ne!(next.access_token, first.access_token);
}

#[tokio::test]
async fn failed_refresh_serves_the_old_value_until_its_min_lifetime_then_errors() {
    let (cache, mint, clock, metrics) = setup(CacheKeying::Identity);
    let c = caller("ns", "p1", "sa", &[]);
    let first = cache.access_token(&c, &[]).await.unwrap();
    *mint.fail.lock() = Some(unavailable());

    clock.advance(Duration::from_secs(2600));
    cache.tick();
    settle(&cache).await;
    assert_eq!(mint.calls(), 2, "refresh attempted");
    assert_eq!(
        metrics
            .cache_refreshes
            .with_label_values(&["google_access_token", "error"])
            .get(),
        1
    );
    // Still valid for 1000 s: served.
    let served = cache.access_token(&c, &[]).await.unwrap();
    assert_eq!(served.access_token, first.access_token);

    // Backoff: a tick right away does not retry, one after the backoff does.
    cache.tick();
    settle(&cache).await;
    assert_eq!(mint.calls(), 2);
    clock.advance(Duration::from_secs(2));
    cache.tick();
    settle(&cache).await;
    assert_eq!(mint.calls(), 3, "retried after backoff");

    // 299 s left (< min lifetime 300 s): never handed out; the error is.
    clock.advance(Duration::from_secs(3600 - 2600 - 2 - 299));
    let err = cache.access_token(&c, &[]).await.unwrap_err();
    assert!(
        matches!(
            err,
            CredentialError::Upstream {
                status: Some(503),
                ..
            }
        ),
        "{err:?}"
    );

    // Upstream recovers: the next request after the backoff mints anew.
    *mint.fail.lock() = None;
    clock.advance(Duration::from_secs(120));
    let fresh = cache.access_token(&c, &[]).await.unwrap();
    assert_ne!(fresh.access_token, first.access_token);
    assert!(fresh.expires_in(clock.now()) >= 300);
}

#[tokio::test]
async fn never_hands_out_less_than_min_lifetime() {
    let (cache, mint, clock, _m) = setup(CacheKeying::Identity);
    let c = caller("ns", "p1", "sa", &[]);
    let first = cache.access_token(&c, &[]).await.unwrap();
    // 299 s left and no refresh ran (no ticks): the request mints anew.
    clock.advance(HOUR - Duration::from_secs(299));
    let second = cache.access_token(&c, &[]).await.unwrap();
    assert_ne!(first.access_token, second.access_token);
    assert_eq!(mint.calls(), 2);

    // An upstream that only grants 200 s cannot satisfy a 300 s minimum.
    *mint.lifetime.lock() = Duration::from_secs(200);
    let err = cache.access_token(&c, &["s".into()]).await.unwrap_err();
    assert!(
        matches!(&err, CredentialError::Upstream { code, .. } if code == "lifetime_too_short"),
        "{err:?}"
    );
}

#[tokio::test]
async fn aws_sessions_keep_at_least_fifteen_minutes() {
    let (cache, mint, clock, _m) = setup(CacheKeying::Identity);
    let c = caller("ns", "p1", "sa", &[(AWS_ROLE_ARN_ANNOTATION, ROLE)]);
    let first = cache.session(&c, ROLE).await.unwrap();
    // 16 min left: still served (min for AWS is 15 min even with a 5 min flag).
    clock.advance(Duration::from_secs(44 * 60));
    assert_eq!(
        cache.session(&c, ROLE).await.unwrap().access_key_id,
        first.access_key_id
    );
    settle(&cache).await; // the hit path started a refresh (past 2×15 min window)
    assert_eq!(mint.calls(), 2);
    // With refreshes failing, 14 min left is not served.
    *mint.fail.lock() = Some(unavailable());
    let refreshed = cache.session(&c, ROLE).await.unwrap();
    clock.advance(HOUR - Duration::from_secs(14 * 60));
    assert!(cache.session(&c, ROLE).await.is_err());
    assert_ne!(refreshed.access_key_id, first.access_key_id);
}

#[tokio::test]
async fn permanent_failures_are_answered_from_the_error_cache_during_backoff() {
    let (cache, mint, clock, _m) = setup(CacheKeying::Identity);
    *mint.fail.lock() = Some(CredentialError::Upstream {
        service: "IAM Credentials",
        status: Some(403),
        code: "PERMISSION_DENIED".into(),
        message: "Permission denied".into(),
        retryable: false,
    });
    let c = caller("ns", "p1", "sa", &[(GCP_SERVICE_ACCOUNT_ANNOTATION, GSA)]);
    assert!(cache.access_token(&c, &[]).await.is_err());
    assert!(cache.access_token(&c, &[]).await.is_err());
    assert_eq!(mint.calls(), 1);
    // Background ticks do not retry permanent failures …
    clock.advance(Duration::from_secs(5));
    cache.tick();
    settle(&cache).await;
    assert_eq!(mint.calls(), 1);
    // … a request after the backoff does.
    assert!(cache.access_token(&c, &[]).await.is_err());
    assert_eq!(mint.calls(), 2);
}

#[tokio::test]
async fn prefetch_makes_the_first_request_a_hit() {
    let (cache, mint, _clock, metrics) = setup(CacheKeying::Identity);
    let c = caller("ns", "p1", "sa", &[(AWS_ROLE_ARN_ANNOTATION, ROLE)]);
    cache.prefetch(c.clone());
    cache.prefetch(c.clone()); // idempotent
    settle(&cache).await;
    assert_eq!(mint.calls(), 2, "google default token + aws session");
    cache.access_token(&c, &[]).await.unwrap();
    cache.session(&c, ROLE).await.unwrap();
    assert_eq!(mint.calls(), 2);
    assert_eq!(
        metrics
            .cache_misses
            .with_label_values(&["google_access_token"])
            .get(),
        0
    );
    // No role: only the Google token is prefetched.
    let d = caller("ns", "p2", "other", &[]);
    cache.prefetch(d);
    settle(&cache).await;
    assert_eq!(mint.calls(), 3);
}

#[tokio::test]
async fn identity_keying_shares_and_pod_keying_separates() {
    let (cache, mint, _clock, _m) = setup(CacheKeying::Identity);
    let a = caller("ns", "p1", "sa", &[]);
    let b = caller("ns", "p2", "sa", &[]);
    let ta = cache.access_token(&a, &[]).await.unwrap();
    let tb = cache.access_token(&b, &[]).await.unwrap();
    assert_eq!(ta.access_token, tb.access_token);
    assert_eq!(mint.calls(), 1);
    // Another ServiceAccount is another identity.
    cache
        .access_token(&caller("ns", "p3", "sa2", &[]), &[])
        .await
        .unwrap();
    assert_eq!(mint.calls(), 2);

    let (cache, mint, _clock, _m) = setup(CacheKeying::Pod);
    let ta = cache.access_token(&a, &[]).await.unwrap();
    let tb = cache.access_token(&b, &[]).await.unwrap();
    assert_ne!(ta.access_token, tb.access_token);
    assert_eq!(mint.calls(), 2);
    assert_eq!(*mint.bound_to.lock(), vec!["ns/p1", "ns/p2"]);
}

#[tokio::test]
async fn prune_drops_identities_no_live_pod_uses_and_rebinds_the_rest() {
    let (cache, mint, clock, _m) = setup(CacheKeying::Identity);
    let a1 = caller("ns", "a1", "sa-a", &[]);
    let a2 = caller("ns", "a2", "sa-a", &[]);
    let b = caller("ns", "b", "sa-b", &[]);
    let u = caller("ns", "u", "sa-u", &[]);
    cache.access_token(&a1, &[]).await.unwrap();
    cache.access_token(&b, &[]).await.unwrap();
    cache.access_token(&u, &[]).await.unwrap();
    assert_eq!(cache.len(), 3);
    // a1 is gone but a2 lives; b is gone; u's ServiceAccount is not known yet.
    cache.retain_live(
        std::slice::from_ref(&a2),
        &[("ns".into(), "sa-u".into(), "uid-u".into())],
    );
    assert_eq!(cache.len(), 2);
    // The refresh of sa-a binds its token to a2, the live pod.
    clock.advance(Duration::from_secs(2600));
    cache.tick();
    settle(&cache).await;
    assert!(mint.bound_to.lock().iter().any(|p| p == "ns/a2"));
    // A changed annotation is a different identity: the old entry goes.
    let a2_annotated = caller("ns", "a2", "sa-a", &[(GCP_SERVICE_ACCOUNT_ANNOTATION, GSA)]);
    cache.retain_live(&[a2_annotated], &[]);
    assert_eq!(cache.len(), 0);
}

#[tokio::test]
async fn annotations_are_checked_before_anything_is_minted() {
    let (cache, mint, _clock, _m) = setup(CacheKeying::Identity);
    let plain = caller("team", "p1", "runner", &[]);
    match cache.id_token(&plain, "aud", true).await.unwrap_err() {
        CredentialError::NotConfigured { message } => {
            assert!(message.starts_with(
                "Your Kubernetes service account (team/runner) is not annotated with a target Google service account"
            ));
            assert!(message.contains("iam.gke.io/gcp-service-account=[GSA_NAME]@[PROJECT_ID]"));
        }
        other => panic!("{other:?}"),
    }
    let bad_gsa = caller(
        "team",
        "p1",
        "runner",
        &[(GCP_SERVICE_ACCOUNT_ANNOTATION, "not an email")],
    );
    assert!(matches!(
        cache.access_token(&bad_gsa, &[]).await.unwrap_err(),
        CredentialError::InvalidAnnotation { .. }
    ));
    assert!(matches!(
        cache
            .session(&plain, "arn:aws:iam::1:role/x")
            .await
            .unwrap_err(),
        CredentialError::InvalidAnnotation { .. }
    ));
    let google_source = caller(
        "team",
        "p1",
        "runner",
        &[(AWS_TOKEN_SOURCE_ANNOTATION, "google")],
    );
    match cache.session(&google_source, ROLE).await.unwrap_err() {
        CredentialError::NotConfigured { message } => {
            assert!(
                message.contains(GCP_SERVICE_ACCOUNT_ANNOTATION),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    let bad_source = caller(
        "team",
        "p1",
        "runner",
        &[(AWS_TOKEN_SOURCE_ANNOTATION, "azure")],
    );
    assert!(matches!(
        cache.session(&bad_source, ROLE).await.unwrap_err(),
        CredentialError::InvalidAnnotation { .. }
    ));
    assert_eq!(mint.calls(), 0);
}

#[tokio::test]
async fn aws_provider_type_needs_a_role_and_disabled_apis_say_so() {
    let clock = FakeClock::new();
    let mint = FakeMint::new(clock.clone());
    let cache = CredentialCache::with_minter(
        mint.clone(),
        Policy {
            google: Some(GcpProviderType::Aws),
            aws: None,
            keying: CacheKeying::Identity,
            min_lifetime: MIN_LIFETIME,
            max_on_demand: 64,
        },
        clock,
        Metrics::new(),
    );
    let plain = caller("ns", "p", "sa", &[]);
    match cache.access_token(&plain, &[]).await.unwrap_err() {
        CredentialError::NotConfigured { message } => {
            assert!(message.contains(AWS_ROLE_ARN_ANNOTATION), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let with_role = caller("ns", "p", "sa", &[(AWS_ROLE_ARN_ANNOTATION, ROLE)]);
    cache.access_token(&with_role, &[]).await.unwrap();
    assert!(matches!(
        cache.session(&with_role, ROLE).await.unwrap_err(),
        CredentialError::NotConfigured { .. }
    ));
    // Prefetch skips what cannot be minted (no panic, no mint).
    cache.prefetch(plain);
    settle(&cache).await;
    assert_eq!(mint.calls(), 1);
}

#[tokio::test]
async fn unused_entries_are_not_kept_warm_and_go_once_expired() {
    let (cache, mint, clock, _m) = setup(CacheKeying::Identity);
    let c = caller("ns", "p1", "sa", &[(GCP_SERVICE_ACCOUNT_ANNOTATION, GSA)]);
    cache.access_token(&c, &[]).await.unwrap(); // default scopes: kept warm
    cache.id_token(&c, "aud-once", true).await.unwrap(); // asked once
    assert_eq!(mint.calls(), 2);
    clock.advance(Duration::from_secs(2600));
    cache.tick();
    settle(&cache).await;
    assert_eq!(
        mint.calls(),
        3,
        "only the default access token was refreshed"
    );
    // After the ID token expired (and a grace), its entry is dropped.
    clock.advance(Duration::from_secs(1100));
    cache.tick();
    settle(&cache).await;
    assert_eq!(cache.len(), 1);
    // A used ID token is refreshed like any other.
    cache.id_token(&c, "aud-busy", true).await.unwrap();
    clock.advance(Duration::from_secs(1000));
    cache.id_token(&c, "aud-busy", true).await.unwrap();
    let before = mint.calls();
    // Up to t = 6300 s: past every possible refresh time of both (≤ 6220 s).
    for _ in 0..5 {
        clock.advance(Duration::from_secs(400));
        cache.tick();
        settle(&cache).await;
    }
    assert_eq!(
        mint.calls(),
        before + 2,
        "the busy ID token and the default token"
    );
    assert_eq!(cache.len(), 2);
}

#[test]
fn refresh_schedule_bounds() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    for _ in 0..200 {
        let at = refresh_at(now, now + HOUR, MIN_LIFETIME);
        let after = at.duration_since(now).unwrap();
        assert!(after >= Duration::from_secs(1800) && after <= Duration::from_secs(2520));
        // AWS: 15 min minimum → refresh no later than 30 min before expiry.
        let at = refresh_at(now, now + HOUR, AWS_MIN_LIFETIME);
        assert!(at.duration_since(now).unwrap() <= Duration::from_secs(1800));
        // Short-lived: never a hot loop.
        let at = refresh_at(now, now + Duration::from_secs(400), MIN_LIFETIME);
        assert!(at >= now + MIN_REFRESH_DELAY);
    }
    for f in 1..20 {
        let d = retry_delay(f);
        assert!(d <= RETRY_CAP && d >= Duration::from_millis(500));
    }
}

#[tokio::test]
async fn one_identity_cannot_make_unbounded_distinct_credentials() {
    let clock = FakeClock::new();
    let mint = FakeMint::new(clock.clone());
    let cache = CredentialCache::with_minter(
        mint.clone(),
        Policy {
            google: Some(GcpProviderType::Oidc),
            aws: Some(AwsTokenSource::Kubernetes),
            keying: CacheKeying::Identity,
            min_lifetime: MIN_LIFETIME,
            max_on_demand: 3,
        },
        clock.clone(),
        Metrics::new(),
    );
    let c = caller("ns", "p1", "sa", &[(GCP_SERVICE_ACCOUNT_ANNOTATION, GSA)]);
    cache.access_token(&c, &[]).await.unwrap(); // kept warm: not counted
    cache.id_token(&c, "aud-1", true).await.unwrap();
    cache.id_token(&c, "aud-2", true).await.unwrap();
    cache
        .access_token(
            &c,
            &["https://www.googleapis.com/auth/devstorage.read_only".into()],
        )
        .await
        .unwrap();
    assert_eq!(mint.calls(), 4);

    let refused = cache.id_token(&c, "aud-4", true).await.unwrap_err();
    assert!(
        matches!(
            &refused,
            CredentialError::TooManyCredentials { namespace, service_account, limit: 3 }
                if namespace == "ns" && service_account == "sa"
        ),
        "{refused:?}"
    );
    assert_eq!(mint.calls(), 4, "a refusal mints nothing");
    // What it already holds is still served; other identities are not affected.
    cache.id_token(&c, "aud-1", true).await.unwrap();
    let other = caller(
        "ns",
        "p2",
        "other",
        &[(GCP_SERVICE_ACCOUNT_ANNOTATION, GSA)],
    );
    cache.id_token(&other, "aud-4", true).await.unwrap();
    assert_eq!(mint.calls(), 5);

    // Once unused ones have expired and been dropped, room is made again.
    clock.advance(HOUR + Duration::from_secs(120));
    cache.tick();
    settle(&cache).await;
    cache.id_token(&c, "aud-4", true).await.unwrap();
}
