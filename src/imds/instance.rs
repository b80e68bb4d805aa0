//! What the IMDS API tells a pod about "its instance" and its role: pure
//! functions of the configuration, the Node object and the role ARN, so every
//! path gives answers consistent with every other.
//!
//! - `placement/region` and the identity document's `region`: `--aws-region`.
//! - `placement/availability-zone` and `availabilityZone`: the Node's zone
//!   label when it is an AZ *of that region* (`us-east-1` + one letter), else
//!   `<region>a`. On GKE the label is a Google zone (`us-central1-a`), which
//!   no AWS SDK could use; a fixed AZ of the configured region keeps botocore's
//!   "AZ minus its last letter" region derivation right. Local Zones
//!   (`us-west-2-lax-1a`) are not accepted for the same reason.
//! - `instance-id`: `i-` + 17 hex digits of SHA-256 of the node *name*. The
//!   name is known at start; the providerID arrives with the Node watch, and
//!   an instance id that changed once the watch synced would be worse than one
//!   derived from the name.
//! - `instance-type`: the Node's `node.kubernetes.io/instance-type` label as
//!   is (a Google machine type on GKE: honest, and no SDK reads it).
//! - `local-ipv4` / `privateIp`: the Node's InternalIP.
//! - `architecture`: the Node's `kubernetes.io/arch` label in EC2 spelling,
//!   else this process's own architecture (it runs on that node).
//! - `pendingTime`: when this process started (no launch time is known).
//! - `accountId`: the account of the caller's role (the account whose
//!   credentials this "instance" hands out), `null` without a role.
//! - `imageId`, `kernelId`, `ramdiskId`, product codes: `null`; inventing an
//!   AMI id would mislead.
//! - `iam/info`: `InstanceProfileArn` is the role ARN with `role/` replaced by
//!   `instance-profile/` (same partition, account, path and name: the
//!   convention of a profile made for a role); `InstanceProfileId` is
//!   `AIPA` followed by 17 characters of `[A-Z2-7]` from SHA-256 of the role
//!   ARN, so it is stable for a role and distinct between roles.

use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::pods::NodeFacts;

/// `YYYY-MM-DDTHH:MM:SSZ`, the only time format IMDS uses (botocore's
/// static-stability check parses exactly this).
pub(crate) fn imds_time(t: SystemTime) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from(t)
        .format(FORMAT)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// An IAM role ARN, `arn:PARTITION:iam::ACCOUNT:role[/PATH]/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoleArn<'a> {
    pub arn: &'a str,
    pub partition: &'a str,
    pub account: &'a str,
    /// `/PATH/` (just `/` without a path).
    pub path: &'a str,
    pub name: &'a str,
}

impl<'a> RoleArn<'a> {
    pub(crate) fn parse(arn: &'a str) -> Option<Self> {
        let mut parts = arn.splitn(6, ':');
        let (prefix, partition, service, region, account, resource) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        let ok = prefix == "arn"
            && partition.starts_with("aws")
            && service == "iam"
            && region.is_empty()
            && account.len() == 12
            && account.bytes().all(|b| b.is_ascii_digit());
        if !ok {
            return None;
        }
        let rest = resource.strip_prefix("role/")?;
        let (path, name) = match rest.rfind('/') {
            Some(i) => (&resource[4..=4 + i + 1], &rest[i + 1..]),
            None => ("/", rest),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
        name_ok.then_some(Self {
            arn,
            partition,
            account,
            path,
            name,
        })
    }

    pub(crate) fn instance_profile_arn(&self) -> String {
        format!(
            "arn:{}:iam::{}:instance-profile{}{}",
            self.partition, self.account, self.path, self.name
        )
    }

    pub(crate) fn instance_profile_id(&self) -> String {
        const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let digest = Sha256::digest(self.arn.as_bytes());
        let mut id = String::with_capacity(21);
        id.push_str("AIPA");
        id.extend(
            digest
                .iter()
                .take(17)
                .map(|b| ALPHABET[(b & 31) as usize] as char),
        );
        id
    }
}

/// `i-` and 17 hex digits, stable for a node name.
pub(crate) fn instance_id(node_name: &str) -> String {
    let digest = Sha256::digest(format!("metabridge instance-id\0{node_name}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("i-{}", &hex[..17])
}

/// The AZ pods are told: the Node's zone if it is an AZ of `region`, else
/// `<region>a`.
pub(crate) fn availability_zone(region: &str, node_zone: Option<&str>) -> String {
    match node_zone {
        Some(zone)
            if zone.len() == region.len() + 1
                && zone.starts_with(region)
                && zone.as_bytes()[region.len()].is_ascii_lowercase() =>
        {
            zone.to_string()
        }
        _ => format!("{region}a"),
    }
}

/// EC2's spelling of an architecture (`x86_64`, `arm64`, `i386`).
fn ec2_architecture(arch: &str) -> String {
    match arch {
        "amd64" | "x86_64" => "x86_64".into(),
        "arm64" | "aarch64" => "arm64".into(),
        "386" | "x86" => "i386".into(),
        other => other.into(),
    }
}

/// Per-request snapshot of what the Node says, taken under one short read lock.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub region: String,
    pub availability_zone: String,
    pub instance_id: String,
    pub instance_type: Option<String>,
    pub local_ipv4: Option<String>,
    pub architecture: String,
}

impl Instance {
    pub(crate) fn new(region: &str, instance_id: &str, node: &NodeFacts) -> Self {
        let arch = node
            .labels
            .get("kubernetes.io/arch")
            .map(String::as_str)
            .unwrap_or(std::env::consts::ARCH);
        Self {
            region: region.to_string(),
            availability_zone: availability_zone(region, node.zone()),
            instance_id: instance_id.to_string(),
            instance_type: node.instance_type().map(str::to_string),
            local_ipv4: node.internal_ip.clone(),
            architecture: ec2_architecture(arch),
        }
    }
}

/// `/latest/dynamic/instance-identity/document`, fields in EC2's order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IdentityDocument<'a> {
    pub account_id: Option<&'a str>,
    pub architecture: &'a str,
    pub availability_zone: &'a str,
    pub billing_products: Option<()>,
    pub devpay_product_codes: Option<()>,
    pub marketplace_product_codes: Option<()>,
    pub image_id: Option<&'a str>,
    pub instance_id: &'a str,
    pub instance_type: Option<&'a str>,
    pub kernel_id: Option<&'a str>,
    pub pending_time: &'a str,
    pub private_ip: Option<&'a str>,
    pub ramdisk_id: Option<&'a str>,
    pub region: &'a str,
    pub version: &'a str,
}

impl<'a> IdentityDocument<'a> {
    pub(crate) fn new(
        instance: &'a Instance,
        account_id: Option<&'a str>,
        pending_time: &'a str,
    ) -> Self {
        Self {
            account_id,
            architecture: &instance.architecture,
            availability_zone: &instance.availability_zone,
            billing_products: None,
            devpay_product_codes: None,
            marketplace_product_codes: None,
            image_id: None,
            instance_id: &instance.instance_id,
            instance_type: instance.instance_type.as_deref(),
            kernel_id: None,
            pending_time,
            private_ip: instance.local_ipv4.as_deref(),
            ramdisk_id: None,
            region: &instance.region,
            version: "2017-09-30",
        }
    }
}

/// `iam/info`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct IamInfo {
    pub code: &'static str,
    pub last_updated: String,
    pub instance_profile_arn: String,
    pub instance_profile_id: String,
}

/// The error body IMDS sends in place of credentials (`Code` ≠ `Success`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CredentialsErrorBody<'a> {
    pub code: &'a str,
    pub message: &'a str,
    pub last_updated: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_role_arns() {
        let arn = RoleArn::parse("arn:aws:iam::123456789012:role/app-reader").unwrap();
        assert_eq!(
            (arn.partition, arn.account, arn.path, arn.name),
            ("aws", "123456789012", "/", "app-reader")
        );
        assert_eq!(
            arn.instance_profile_arn(),
            "arn:aws:iam::123456789012:instance-profile/app-reader"
        );
        let id = arn.instance_profile_id();
        assert_eq!(id.len(), 21);
        assert!(id.starts_with("AIPA"));
        assert!(
            id[4..]
                .bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        );
        assert_eq!(id, arn.instance_profile_id());

        let arn = RoleArn::parse("arn:aws-cn:iam::123456789012:role/team/a/Name+=,.@_-").unwrap();
        assert_eq!((arn.path, arn.name), ("/team/a/", "Name+=,.@_-"));
        assert_eq!(
            arn.instance_profile_arn(),
            "arn:aws-cn:iam::123456789012:instance-profile/team/a/Name+=,.@_-"
        );
        assert_ne!(
            arn.instance_profile_id(),
            RoleArn::parse("arn:aws:iam::123456789012:role/app-reader")
                .unwrap()
                .instance_profile_id()
        );

        for bad in [
            "",
            "app-reader",
            "arn:aws:iam::123456789012:user/bob",
            "arn:aws:iam::12345:role/x",
            "arn:aws:sts::123456789012:role/x",
            "arn:aws:iam:us-east-1:123456789012:role/x",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/path/",
            "arn:aws:iam::123456789012:role/bad name",
            "arn:gcp:iam::123456789012:role/x",
        ] {
            assert!(RoleArn::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn instance_ids_are_ec2_shaped_and_stable() {
        let id = instance_id("gke-pool-1-abcd");
        assert_eq!(id.len(), 19);
        assert!(id.starts_with("i-"));
        assert!(
            id[2..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(id, instance_id("gke-pool-1-abcd"));
        assert_ne!(id, instance_id("gke-pool-1-abce"));
    }

    #[test]
    fn availability_zone_only_from_the_configured_region() {
        assert_eq!(
            availability_zone("us-east-1", Some("us-east-1c")),
            "us-east-1c"
        );
        assert_eq!(
            availability_zone("us-east-1", Some("us-central1-a")),
            "us-east-1a"
        );
        assert_eq!(
            availability_zone("us-east-1", Some("us-east-2b")),
            "us-east-1a"
        );
        assert_eq!(
            availability_zone("us-west-2", Some("us-west-2-lax-1a")),
            "us-west-2a"
        );
        assert_eq!(
            availability_zone("us-east-1", Some("us-east-1C")),
            "us-east-1a"
        );
        assert_eq!(availability_zone("us-east-1", None), "us-east-1a");
    }

    #[test]
    fn imds_time_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(imds_time(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn architecture_spelling() {
        assert_eq!(ec2_architecture("amd64"), "x86_64");
        assert_eq!(ec2_architecture("aarch64"), "arm64");
        assert_eq!(ec2_architecture("s390x"), "s390x");
    }
}
