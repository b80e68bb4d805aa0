//! One typed configuration, parsed from flags and environment variables once
//! and validated before anything starts.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "metabridge",
    version,
    about = "Per-node metadata server: Google credentials on EKS, AWS credentials on GKE, \
             each pod minted from its own Kubernetes service account.",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch this node's pods, install interception rules and
    /// answer metadata requests.
    Run(Box<RunConfig>),
    /// Manage metabridge's iptables rules outside the daemon.
    Iptables {
        #[command(subcommand)]
        action: IptablesCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum IptablesCommand {
    /// Remove every rule and chain metabridge owns (idempotent; for a preStop
    /// hook or an operator's cleanup).
    Remove(IptablesConfig),
}

#[derive(Debug, Clone, Args)]
pub struct IptablesConfig {
    /// Name of metabridge's own chain in the nat table.
    #[arg(long, env = "METABRIDGE_IPTABLES_CHAIN", default_value = "METABRIDGE")]
    pub iptables_chain: String,

    /// iptables binary to call (`iptables`, `iptables-nft` or `iptables-legacy`);
    /// must match the backend kube-proxy and the CNI use on this node.
    #[arg(long, env = "METABRIDGE_IPTABLES", default_value = "iptables")]
    pub iptables_binary: String,

    /// Seconds to wait for the xtables lock (`iptables -w`).
    #[arg(long, env = "METABRIDGE_IPTABLES_LOCK_WAIT", default_value_t = 5)]
    pub iptables_lock_wait: u32,

    /// conntrack binary (conntrack-tools) used, whenever the rules are
    /// (re)installed, to forget flows to 169.254.169.254:80 that bypassed
    /// them; an empty value skips that step.
    #[arg(long, env = "METABRIDGE_CONNTRACK", default_value = "conntrack")]
    pub conntrack_binary: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct RunConfig {
    /// Name of this node; only pods scheduled here are served.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Address of the metadata listener (the DNAT target).
    #[arg(long, env = "METABRIDGE_LISTEN", default_value = "0.0.0.0:8989")]
    pub listen: SocketAddr,

    /// Address of the admin listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "METABRIDGE_ADMIN_LISTEN", default_value = "0.0.0.0:8990")]
    pub admin_listen: SocketAddr,

    /// iptables `-i` pattern of pod interfaces whose traffic to
    /// 169.254.169.254:80 is intercepted (e.g. eni+, cali+, lxc+, veth+).
    /// Repeatable. None given: no rules are installed.
    #[arg(
        long = "intercept-interface",
        env = "METABRIDGE_INTERCEPT_INTERFACES",
        value_delimiter = ','
    )]
    pub intercept_interfaces: Vec<String>,

    /// DNAT destination ip:port. Default: $HOST_IP and the listen port.
    #[arg(long, env = "METABRIDGE_INTERCEPT_TO")]
    pub intercept_to: Option<SocketAddr>,

    /// This node's IP (downward API `status.hostIP`); the default DNAT target.
    #[arg(long, env = "HOST_IP")]
    pub host_ip: Option<IpAddr>,

    #[command(flatten)]
    pub iptables: IptablesConfig,

    /// How often the rules are verified and repaired.
    #[arg(long, env = "METABRIDGE_IPTABLES_RESYNC", default_value = "10s", value_parser = humantime::parse_duration)]
    pub iptables_resync: Duration,

    /// Bound on identifying a source IP the pod index does not know yet
    /// (wait for the watch, then ask the API server). Keep well under the
    /// SDKs' 1 s metadata timeout.
    #[arg(long, env = "METABRIDGE_POD_LOOKUP_TIMEOUT", default_value = "400ms", value_parser = humantime::parse_duration)]
    pub pod_lookup_timeout: Duration,

    /// Log format.
    #[arg(
        long,
        env = "METABRIDGE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Maximum concurrent connections on the metadata listener.
    #[arg(long, env = "METABRIDGE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Time a client has to send a request's headers; also closes keep-alive
    /// connections idle for longer.
    #[arg(long, env = "METABRIDGE_HEADER_READ_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Maximum lifetime of one client connection.
    #[arg(long, env = "METABRIDGE_CONNECTION_MAX_AGE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub connection_max_age: Duration,

    /// Leave the interception rules in place on exit instead of removing them:
    /// through a restart, pods then get "connection refused" (fail closed)
    /// rather than reaching the node's real metadata server. `metabridge
    /// iptables remove` still removes them.
    #[arg(long, env = "METABRIDGE_KEEP_RULES_ON_EXIT", default_value_t = false)]
    pub keep_rules_on_exit: bool,

    /// Serve GET /metabridge/v1/whoami: the caller's pod identity as metabridge
    /// sees it (debugging aid; off by default).
    #[arg(long, env = "METABRIDGE_DEBUG_WHOAMI", default_value_t = false)]
    pub debug_whoami: bool,

    /// Cluster name told to pods (GCE `instance/attributes/cluster-name`).
    #[arg(long, env = "METABRIDGE_CLUSTER_NAME")]
    pub cluster_name: Option<String>,

    /// Cluster location told to pods (GCE `instance/attributes/cluster-location`).
    #[arg(long, env = "METABRIDGE_CLUSTER_LOCATION")]
    pub cluster_location: Option<String>,

    /// Taint removed from this node once metabridge is ready (startup guard).
    #[arg(long, env = "METABRIDGE_STARTUP_TAINT")]
    pub startup_taint: Option<String>,

    /// Time allowed to drain connections on shutdown.
    #[arg(long, env = "METABRIDGE_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    #[command(flatten)]
    pub gcp: GcpConfig,

    #[command(flatten)]
    pub aws: AwsConfig,

    #[command(flatten)]
    pub cache: CacheConfig,
}

#[derive(Debug, Clone, Args)]
pub struct GcpConfig {
    /// Google workload identity provider
    /// (projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROV),
    /// or GKE's built-in pool PROJECT.svc.id.goog. Setting it enables the GCE API.
    #[arg(long, env = "METABRIDGE_GCP_WORKLOAD_IDENTITY_PROVIDER")]
    pub gcp_workload_identity_provider: Option<String>,

    /// Project id pods are told (`project/project-id`).
    #[arg(long, env = "METABRIDGE_GCP_PROJECT_ID")]
    pub gcp_project_id: Option<String>,

    /// Numeric project id; only needed with GKE's built-in pool (a provider
    /// name carries it).
    #[arg(long, env = "METABRIDGE_GCP_PROJECT_NUMBER")]
    pub gcp_project_number: Option<String>,

    /// The cluster's OIDC issuer as Google knows it; required with GKE's
    /// built-in pool (https://container.googleapis.com/v1/projects/P/locations/L/clusters/C).
    #[arg(long, env = "METABRIDGE_GCP_CLUSTER_ISSUER")]
    pub gcp_cluster_issuer: Option<String>,

    /// Audience of the pod's Kubernetes token; default: what the provider expects.
    #[arg(long, env = "METABRIDGE_GCP_TOKEN_AUDIENCE")]
    pub gcp_token_audience: Option<String>,

    /// Provider type: `oidc` (the cluster issuer) or `aws` (an AWS account;
    /// the pod's `eks.amazonaws.com/role-arn` role is assumed first).
    #[arg(
        long,
        env = "METABRIDGE_GCP_PROVIDER_TYPE",
        value_enum,
        default_value = "oidc"
    )]
    pub gcp_provider_type: GcpProviderType,

    /// Google STS endpoint.
    #[arg(
        long,
        env = "METABRIDGE_GCP_STS_URL",
        default_value = "https://sts.googleapis.com"
    )]
    pub gcp_sts_url: String,

    /// Google IAM Credentials endpoint.
    #[arg(
        long,
        env = "METABRIDGE_GCP_IAMCREDENTIALS_URL",
        default_value = "https://iamcredentials.googleapis.com"
    )]
    pub gcp_iamcredentials_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GcpProviderType {
    Oidc,
    Aws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AwsTokenSource {
    /// The pod's bound Kubernetes token (AWS trusts the cluster's OIDC issuer).
    Kubernetes,
    /// A Google ID token of the pod's Google service account (AWS trusts accounts.google.com).
    Google,
}

#[derive(Debug, Clone, Args)]
pub struct AwsConfig {
    /// AWS region told to pods and used for STS. Setting it enables the IMDS API.
    #[arg(long, env = "METABRIDGE_AWS_REGION")]
    pub aws_region: Option<String>,

    /// AWS STS endpoint; default: the regional endpoint.
    #[arg(long, env = "METABRIDGE_AWS_STS_URL")]
    pub aws_sts_url: Option<String>,

    /// Which token AWS is shown (per ServiceAccount overridable with the
    /// `metabridge.io/aws-token-source` annotation).
    #[arg(
        long,
        env = "METABRIDGE_AWS_TOKEN_SOURCE",
        value_enum,
        default_value = "kubernetes"
    )]
    pub aws_token_source: AwsTokenSource,

    /// Audience of the pod's Kubernetes token shown to AWS.
    #[arg(
        long,
        env = "METABRIDGE_AWS_TOKEN_AUDIENCE",
        default_value = "sts.amazonaws.com"
    )]
    pub aws_token_audience: String,

    /// Audience of the Google ID token shown to AWS in `google` mode.
    #[arg(
        long,
        env = "METABRIDGE_AWS_GOOGLE_AUDIENCE",
        default_value = "sts.amazonaws.com"
    )]
    pub aws_google_audience: String,

    /// Session duration requested from STS.
    #[arg(long, env = "METABRIDGE_AWS_SESSION_DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub aws_session_duration: Duration,

    /// Allow IMDSv1 (requests without a session token). Default: refused, as
    /// on a hardened EC2 instance.
    #[arg(long, env = "METABRIDGE_IMDS_ALLOW_V1", default_value_t = false)]
    pub imds_allow_v1: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheKeying {
    /// All pods of one service account share one credential.
    Identity,
    /// Each pod gets its own (for pools whose attribute mapping uses the pod name).
    Pod,
}

#[derive(Debug, Clone, Args)]
pub struct CacheConfig {
    /// How long a request waits for a credential being minted before it is
    /// answered "retry shortly" (the mint goes on; the retry is a hit). Keep
    /// under the SDKs' 1 s metadata timeout.
    #[arg(long, env = "METABRIDGE_MINT_WAIT", default_value = "800ms", value_parser = humantime::parse_duration)]
    pub mint_wait: Duration,

    /// How credentials are shared between pods.
    #[arg(
        long,
        env = "METABRIDGE_CACHE_KEY",
        value_enum,
        default_value = "identity"
    )]
    pub cache_key: CacheKeying,

    /// Never hand out a credential with less time than this left.
    #[arg(long, env = "METABRIDGE_MIN_CREDENTIAL_LIFETIME", default_value = "5m", value_parser = humantime::parse_duration)]
    pub min_credential_lifetime: Duration,

    /// Distinct on-demand credentials (ID-token audiences, non-default scope
    /// sets) one identity may hold at once; more are refused with 429 until
    /// some expire. Bounds what one pod can make metabridge mint upstream
    /// (and spend of the project's IAM quota) by varying its query strings.
    #[arg(
        long,
        env = "METABRIDGE_MAX_CREDENTIALS_PER_IDENTITY",
        default_value_t = 64
    )]
    pub max_credentials_per_identity: usize,
}

/// A configuration value that cannot work; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl RunConfig {
    /// Checks what clap's types cannot; the error is one line naming the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.trim().is_empty() {
            return Err(ConfigError("--node-name must not be empty".into()));
        }
        validate_chain(&self.iptables.iptables_chain)?;
        if self.cache.max_credentials_per_identity == 0 {
            return Err(ConfigError(
                "--max-credentials-per-identity must be at least 1".into(),
            ));
        }
        for pattern in &self.intercept_interfaces {
            validate_interface_pattern(pattern)?;
        }
        if !self.intercept_interfaces.is_empty() && self.intercept_target().is_none() {
            return Err(ConfigError(
                "--intercept-interface needs a DNAT target: set --intercept-to or HOST_IP".into(),
            ));
        }
        if let Some(to) = self.intercept_target()
            && (!to.is_ipv4() || to.ip().is_unspecified())
        {
            return Err(ConfigError(format!(
                "--intercept-to {to}: must be a concrete IPv4 address and port"
            )));
        }
        if self.max_connections == 0 {
            return Err(ConfigError("--max-connections must be at least 1".into()));
        }
        if self.pod_lookup_timeout >= Duration::from_secs(1) {
            return Err(ConfigError(format!(
                "--pod-lookup-timeout {}: must be under 1s (SDKs give the metadata server about 1s)",
                humantime::format_duration(self.pod_lookup_timeout)
            )));
        }
        if self.iptables_resync < Duration::from_millis(100) {
            return Err(ConfigError(
                "--iptables-resync must be at least 100ms".into(),
            ));
        }
        if self.gcp.gcp_workload_identity_provider.is_some() {
            crate::gce::GceSettings::from_config(self).map_err(ConfigError)?;
        }
        crate::credentials::GoogleSettings::from_config(&self.gcp).map_err(ConfigError)?;
        if self.aws.aws_region.is_some() {
            crate::imds::ImdsSettings::from_config(self).map_err(ConfigError)?;
            crate::credentials::AwsSettings::from_config(&self.aws).map_err(ConfigError)?;
        }
        if self.cache.mint_wait >= Duration::from_secs(1) {
            return Err(ConfigError(format!(
                "--mint-wait {}: must be under 1s (SDKs give the metadata server about 1s)",
                humantime::format_duration(self.cache.mint_wait)
            )));
        }
        Ok(())
    }

    /// Where intercepted connections are sent: --intercept-to, else HOST_IP
    /// with the listen port.
    pub fn intercept_target(&self) -> Option<SocketAddr> {
        self.intercept_to.or_else(|| {
            self.host_ip
                .map(|ip| SocketAddr::new(ip, self.listen.port()))
        })
    }
}

fn validate_chain(chain: &str) -> Result<(), ConfigError> {
    let ok = !chain.is_empty()
        && chain.len() <= 28
        && chain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let builtin = ["PREROUTING", "POSTROUTING", "INPUT", "OUTPUT", "FORWARD"];
    if !ok || builtin.contains(&chain) {
        return Err(ConfigError(format!(
            "--iptables-chain {chain:?}: must be 1-28 characters of [A-Za-z0-9_-] and not a built-in chain"
        )));
    }
    Ok(())
}

/// An iptables `-i` pattern: an interface name (≤15 characters) optionally
/// ending in `+` as a wildcard.
fn validate_interface_pattern(pattern: &str) -> Result<(), ConfigError> {
    let name = pattern.strip_suffix('+').unwrap_or(pattern);
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(ConfigError(format!(
            "--intercept-interface {pattern:?}: not an interface name or pattern like eni+"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunConfig, String> {
        let mut argv = vec!["metabridge", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(cfg) => {
                cfg.validate().map_err(|e| e.to_string())?;
                Ok(*cfg)
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_and_intercept_target_from_host_ip() {
        let cfg = parse(&[
            "--node-name",
            "n1",
            "--intercept-interface",
            "eni+",
            "--host-ip",
            "10.0.0.5",
        ])
        .unwrap();
        assert_eq!(
            cfg.intercept_target(),
            Some("10.0.0.5:8989".parse().unwrap())
        );
        assert_eq!(cfg.iptables.iptables_chain, "METABRIDGE");
        assert_eq!(cfg.pod_lookup_timeout, Duration::from_millis(400));
    }

    #[test]
    fn interfaces_comma_separated_and_repeated() {
        let cfg = parse(&[
            "--node-name",
            "n1",
            "--intercept-to",
            "10.0.0.1:1",
            "--intercept-interface",
            "eni+,cali+",
            "--intercept-interface",
            "lxc+",
        ])
        .unwrap();
        assert_eq!(cfg.intercept_interfaces, vec!["eni+", "cali+", "lxc+"]);
    }

    #[test]
    fn bad_values_are_named() {
        let err =
            parse(&["--node-name", "n1", "--intercept-interface", "eth0; rm -rf"]).unwrap_err();
        assert!(err.contains("eth0; rm -rf"), "{err}");
        let err = parse(&["--node-name", "n1", "--intercept-interface", "eni+"]).unwrap_err();
        assert!(err.contains("HOST_IP"), "{err}");
        let err = parse(&["--node-name", "n1", "--iptables-chain", "PREROUTING"]).unwrap_err();
        assert!(err.contains("PREROUTING"), "{err}");
        let err = parse(&["--node-name", "n1", "--pod-lookup-timeout", "2s"]).unwrap_err();
        assert!(err.contains("pod-lookup-timeout"), "{err}");
        let err = parse(&["--node-name", "n1", "--listen", "nonsense"]).unwrap_err();
        assert!(err.contains("nonsense"), "{err}");
    }
}
