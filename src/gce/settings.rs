//! What the GCE API tells pods that does not depend on the caller, derived
//! once from the configuration.

use crate::config::RunConfig;

/// The scopes a GCE VM's default service account reports (`…/scopes`), and
/// what the credential source mints when a request names none.
pub const DEFAULT_SCOPES: [&str; 2] = [
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/userinfo.email",
];

/// Static facts of the GCE API, validated once at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GceSettings {
    /// `project/project-id`.
    pub project_id: String,
    /// `project/numeric-project-id`; also the `projects/NUM/zones/…` prefix.
    pub numeric_project_id: u64,
    /// The workload identity pool id, reported as the `email` of a
    /// ServiceAccount without the `iam.gke.io/gcp-service-account`
    /// annotation (direct resource access as the federated principal).
    ///
    /// On GKE the pool id *is* `PROJECT.svc.id.goog`, which is what GKE's own
    /// server reports; for a custom pool (`…/workloadIdentityPools/POOL/…`)
    /// the analogue is `POOL`. It is not an email (the federated principal
    /// has none); it only needs to be a stable, path-safe name that clients
    /// can echo back in `instance/service-accounts/NAME/…`.
    pub direct_access_email: String,
    /// `instance/attributes/cluster-name`, when configured.
    pub cluster_name: Option<String>,
    /// `instance/attributes/cluster-location`, when configured; also the
    /// zone's fallback when the Node has no zone label.
    pub cluster_location: Option<String>,
    /// This node: `instance/hostname`, and the fallback seed of `instance/id`.
    pub node_name: String,
}

impl GceSettings {
    /// Derives the settings from `--gcp-workload-identity-provider`, which
    /// takes one of two forms:
    ///
    /// - `projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROV`
    ///   (optionally prefixed `//iam.googleapis.com/`): the project number
    ///   comes from it; `--gcp-project-id` is required, since the name
    ///   carries only the number.
    /// - `PROJECT.svc.id.goog` (GKE's built-in pool): the project id comes
    ///   from it (unless `--gcp-project-id` overrides it);
    ///   `--gcp-project-number` is required.
    ///
    /// A `--gcp-project-number` that contradicts the provider name is refused.
    pub fn from_config(config: &RunConfig) -> Result<Self, String> {
        let gcp = &config.gcp;
        let provider = gcp
            .gcp_workload_identity_provider
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .ok_or("--gcp-workload-identity-provider is required for the GCE API")?;
        let given_project = gcp
            .gcp_project_id
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty());
        if let Some(project) = given_project {
            validate_project_id(project)?;
        }
        // The provider name is parsed once, by the credentials side, which
        // also mints with it; this only derives what pods are told.
        let google = crate::credentials::GoogleSettings::from_config(gcp)?
            .ok_or("--gcp-workload-identity-provider is required for the GCE API")?;
        let numeric_project_id = google
            .project_number
            .as_deref()
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                format!(
                    "--gcp-project-number is required with GKE's pool {provider}: the pool name carries only the project id"
                )
            })?;
        let (project_id, pool) = match &google.pool {
            crate::credentials::PoolKind::GkeBuiltin { pool, .. } => {
                let pool_project = pool.strip_suffix(".svc.id.goog").unwrap_or(pool);
                (
                    given_project.unwrap_or(pool_project).to_string(),
                    pool.clone(),
                )
            }
            crate::credentials::PoolKind::Provider { name } => {
                let project = given_project.ok_or_else(|| {
                    format!(
                        "--gcp-project-id is required with provider {provider}: the provider name carries only the project number"
                    )
                })?;
                // projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROV
                let pool = name.split('/').nth(5).unwrap_or_default().to_string();
                (project.to_string(), pool)
            }
        };

        let non_empty = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Ok(Self {
            project_id,
            numeric_project_id,
            direct_access_email: pool,
            cluster_name: non_empty(&config.cluster_name),
            cluster_location: non_empty(&config.cluster_location),
            node_name: config.node_name.trim().to_string(),
        })
    }
}

/// Project ids are 6–30 lowercase letters, digits and dashes; legacy ones may
/// carry a `domain:` prefix. Checked loosely: only what would break a path or
/// a header is refused.
fn validate_project_id(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b':')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--gcp-project-id {s:?}: not a Google Cloud project id"
        ))
    }
}

/// A stable numeric `instance/id` for this node.
///
/// Real GCE ids are opaque decimal integers that stay fixed for a VM's life
/// and change when the VM is replaced. The Node's `spec.providerID`
/// (`aws:///us-east-1a/i-0abc…` on EKS, `gce://PROJECT/ZONE/NAME` on GKE) has
/// exactly that lifetime, so it seeds the id; before the Node has been seen,
/// the node name does. The hash is FNV-1a (fixed by definition, unlike std's
/// `DefaultHasher`), masked to 63 bits so clients that parse it as a signed
/// 64-bit integer (Java, JSON in JavaScript loses precision either way) agree.
pub fn instance_id(seed: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    match hash & (u64::MAX >> 1) {
        0 => 1,
        id => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

    fn config(args: &[&str]) -> RunConfig {
        let mut argv = vec![
            "metabridge",
            "run",
            "--node-name",
            "ip-10-0-1-2.ec2.internal",
        ];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(cfg) => *cfg,
            _ => unreachable!(),
        }
    }

    const PROVIDER: &str =
        "projects/123456789012/locations/global/workloadIdentityPools/eks-pool/providers/eks-oidc";

    const ISSUER: &str =
        "https://container.googleapis.com/v1/projects/my-project/locations/us-east1/clusters/c";

    #[test]
    fn provider_name_gives_the_project_number_and_pool() {
        let s = GceSettings::from_config(&config(&[
            "--gcp-workload-identity-provider",
            PROVIDER,
            "--gcp-project-id",
            "my-project",
            "--cluster-name",
            "prod",
            "--cluster-location",
            "us-east-1",
        ]))
        .unwrap();
        assert_eq!(s.project_id, "my-project");
        assert_eq!(s.numeric_project_id, 123456789012);
        assert_eq!(s.direct_access_email, "eks-pool");
        assert_eq!(s.cluster_name.as_deref(), Some("prod"));
        assert_eq!(s.cluster_location.as_deref(), Some("us-east-1"));
        assert_eq!(s.node_name, "ip-10-0-1-2.ec2.internal");

        let full = format!("//iam.googleapis.com/{PROVIDER}");
        let s = GceSettings::from_config(&config(&[
            "--gcp-workload-identity-provider",
            &full,
            "--gcp-project-id",
            "my-project",
            "--gcp-project-number",
            "123456789012",
        ]))
        .unwrap();
        assert_eq!(s.numeric_project_id, 123456789012);
    }

    #[test]
    fn gke_pool_takes_the_project_from_its_name() {
        let s = GceSettings::from_config(&config(&[
            "--gcp-workload-identity-provider",
            "my-project.svc.id.goog",
            "--gcp-project-number",
            "42",
            "--gcp-cluster-issuer",
            ISSUER,
        ]))
        .unwrap();
        assert_eq!(s.project_id, "my-project");
        assert_eq!(s.numeric_project_id, 42);
        assert_eq!(s.direct_access_email, "my-project.svc.id.goog");
        assert_eq!(s.cluster_name, None);
    }

    #[test]
    fn refusals_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--gcp-workload-identity-provider"),
            (
                &["--gcp-workload-identity-provider", PROVIDER],
                "--gcp-project-id",
            ),
            (
                &[
                    "--gcp-workload-identity-provider",
                    "my-project.svc.id.goog",
                    "--gcp-cluster-issuer",
                    ISSUER,
                ],
                "--gcp-project-number",
            ),
            (
                &[
                    "--gcp-workload-identity-provider",
                    PROVIDER,
                    "--gcp-project-id",
                    "p",
                    "--gcp-project-number",
                    "7",
                ],
                "contradicts",
            ),
            (
                &[
                    "--gcp-workload-identity-provider",
                    "projects/abc/locations/global/workloadIdentityPools/p/providers/x",
                    "--gcp-project-id",
                    "p",
                ],
                "expected projects/NUM",
            ),
            (
                &[
                    "--gcp-workload-identity-provider",
                    "my-project.svc.id.goog",
                    "--gcp-project-number",
                    "12x",
                ],
                "--gcp-project-number",
            ),
            (
                &[
                    "--gcp-workload-identity-provider",
                    PROVIDER,
                    "--gcp-project-id",
                    "Bad/Project",
                ],
                "--gcp-project-id",
            ),
        ];
        for (args, needle) in cases {
            let err = GceSettings::from_config(&config(args)).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn instance_id_is_stable_and_fits_i64() {
        let a = instance_id("aws:///us-east-1a/i-0123456789abcdef0");
        assert_eq!(a, instance_id("aws:///us-east-1a/i-0123456789abcdef0"));
        assert_ne!(a, instance_id("aws:///us-east-1a/i-0123456789abcdef1"));
        assert!(a <= i64::MAX as u64 && a > 0);
        // Pinned: the id must not change between releases.
        assert_eq!(instance_id(""), 0xcbf2_9ce4_8422_2325 & (u64::MAX >> 1));
    }
}
