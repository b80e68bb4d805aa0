//! Prometheus metrics, registered once and shared by every component.
//!
//! Labels are bounded by construction: APIs, routes, clouds, kinds and outcomes
//! are `&'static str` from fixed sets; pod names and IPs never become labels.

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub ready: IntGauge,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub credentials_issued: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub cache_refreshes: IntCounterVec,
    pub cache_entries: IntGaugeVec,
    pub cache_soonest_expiry: Gauge,
    pub pods_indexed: IntGauge,
    pub pod_ip_conflicts: IntGauge,
    pub unknown_ip_lookups: IntCounterVec,
    pub watch_restarts: IntCounterVec,
    pub iptables_rules_installed: IntGauge,
    pub iptables_repairs: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique and valid");
            c
        }
        let build_info = reg(
            &registry,
            IntGaugeVec::new(
                Opts::new("metabridge_build_info", "Build information; always 1."),
                &["version"],
            )
            .unwrap(),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let ready = reg(
            &registry,
            IntGauge::new(
                "metabridge_ready",
                "1 once the pod index has synced and interception rules are in place.",
            )
            .unwrap(),
        );
        let requests = reg(
            &registry,
            IntCounterVec::new(
                Opts::new("metabridge_requests_total", "Metadata requests answered."),
                &["api", "route", "status"],
            )
            .unwrap(),
        );
        let request_duration = reg(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "metabridge_request_duration_seconds",
                    "Time to answer a metadata request.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["api", "route"],
            )
            .unwrap(),
        );
        let credentials_issued = reg(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "metabridge_credentials_issued_total",
                    "Credentials minted upstream, by cloud, kind and outcome.",
                ),
                &["cloud", "kind", "outcome"],
            )
            .unwrap(),
        );
        let upstream_duration = reg(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "metabridge_upstream_request_duration_seconds",
                    "Latency of calls to the Kubernetes API, Google and AWS.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["endpoint", "outcome"],
            )
            .unwrap(),
        );
        let cache_hits = reg(
            &registry,
            IntCounterVec::new(
                Opts::new("metabridge_cache_hits_total", "Credential cache hits."),
                &["kind"],
            )
            .unwrap(),
        );
        let cache_misses = reg(
            &registry,
            IntCounterVec::new(
                Opts::new("metabridge_cache_misses_total", "Credential cache misses."),
                &["kind"],
            )
            .unwrap(),
        );
        let cache_refreshes = reg(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "metabridge_cache_refreshes_total",
                    "Background refreshes of cached credentials.",
                ),
                &["kind", "outcome"],
            )
            .unwrap(),
        );
        let cache_entries = reg(
            &registry,
            IntGaugeVec::new(
                Opts::new("metabridge_cache_entries", "Credentials held in the cache."),
                &["kind"],
            )
            .unwrap(),
        );
        let cache_soonest_expiry = reg(
            &registry,
            Gauge::new(
                "metabridge_cache_soonest_expiry_seconds",
                "Seconds until the soonest-expiring cached credential expires.",
            )
            .unwrap(),
        );
        let pods_indexed = reg(
            &registry,
            IntGauge::new(
                "metabridge_pods_indexed",
                "Pods on this node indexed by IP.",
            )
            .unwrap(),
        );
        let pod_ip_conflicts = reg(
            &registry,
            IntGauge::new(
                "metabridge_pod_ip_conflicts",
                "IPs claimed by more than one live pod (refused until resolved).",
            )
            .unwrap(),
        );
        let unknown_ip_lookups = reg(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "metabridge_unknown_ip_lookups_total",
                    "Requests from an IP the index did not know, by how they ended.",
                ),
                &["outcome"],
            )
            .unwrap(),
        );
        let watch_restarts = reg(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "metabridge_watch_restarts_total",
                    "Kubernetes watch (re)starts and errors.",
                ),
                &["resource"],
            )
            .unwrap(),
        );
        let iptables_rules_installed = reg(
            &registry,
            IntGauge::new(
                "metabridge_iptables_rules_installed",
                "Interception rules currently verified in place.",
            )
            .unwrap(),
        );
        let iptables_repairs = reg(
            &registry,
            IntCounter::new(
                "metabridge_iptables_repairs_total",
                "Times the interception rules were found drifted and repaired.",
            )
            .unwrap(),
        );
        let metrics = Self {
            registry,
            ready,
            requests,
            request_duration,
            credentials_issued,
            upstream_duration,
            cache_hits,
            cache_misses,
            cache_refreshes,
            cache_entries,
            cache_soonest_expiry,
            pods_indexed,
            pod_ip_conflicts,
            unknown_ip_lookups,
            watch_restarts,
            iptables_rules_installed,
            iptables_repairs,
        };
        metrics.initialise_series();
        metrics
    }

    /// Creates every series of the bounded label sets at zero, so `rate()`
    /// and alerts see a counter from the start rather than only after its
    /// first increment (a missing series is indistinguishable from "no data").
    fn initialise_series(&self) {
        // Nothing cached yet: no expiry to be late for (NaN compares false).
        self.cache_soonest_expiry.set(f64::NAN);
        for (cloud, kind) in [
            ("google", "access_token"),
            ("google", "id_token"),
            ("aws", "aws_session"),
        ] {
            for outcome in ["ok", "error"] {
                self.credentials_issued
                    .with_label_values(&[cloud, kind, outcome]);
            }
        }
        for kind in ["google_access_token", "google_id_token", "aws_session"] {
            self.cache_hits.with_label_values(&[kind]);
            self.cache_misses.with_label_values(&[kind]);
            self.cache_entries.with_label_values(&[kind]);
            for outcome in ["ok", "error"] {
                self.cache_refreshes.with_label_values(&[kind, outcome]);
            }
        }
        for outcome in ["watch", "api", "not_found", "conflict", "error"] {
            self.unknown_ip_lookups.with_label_values(&[outcome]);
        }
        for resource in ["pods", "serviceaccounts", "nodes"] {
            self.watch_restarts.with_label_values(&[resource]);
        }
    }

    /// Prometheus text exposition of every registered metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }

    /// Records one upstream call's latency; returns a guard that observes on drop
    /// unless `finish` sets the outcome first.
    pub fn upstream_timer(&self, endpoint: &'static str) -> UpstreamTimer {
        UpstreamTimer {
            histogram: self.upstream_duration.clone(),
            endpoint,
            start: tokio::time::Instant::now(),
            done: false,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub struct UpstreamTimer {
    histogram: HistogramVec,
    endpoint: &'static str,
    start: tokio::time::Instant,
    done: bool,
}

impl UpstreamTimer {
    pub fn finish(mut self, ok: bool) {
        self.observe(if ok { "ok" } else { "error" });
    }

    fn observe(&mut self, outcome: &str) {
        self.done = true;
        self.histogram
            .with_label_values(&[self.endpoint, outcome])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for UpstreamTimer {
    fn drop(&mut self) {
        if !self.done {
            // Dropped mid-flight: the caller gave up (timeout or cancellation).
            self.observe("cancelled");
        }
    }
}
