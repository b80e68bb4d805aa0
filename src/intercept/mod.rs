//! Interception: metabridge's own nat chain, jumped to from the top of
//! PREROUTING, DNATing tcp to 169.254.169.254:80 that arrives on pod
//! interfaces to the metadata listener.
//!
//! Rules live in PREROUTING only, so traffic that originates on the node
//! (kubelet, hostNetwork pods, metabridge's own upstream calls) goes through
//! OUTPUT and is never redirected. Every change takes the xtables lock
//! (`-w`); the chain body is replaced atomically with `iptables-restore
//! --noflush`, so a repair never leaves pods briefly unintercepted.

use std::{net::SocketAddr, time::Duration};

use tokio::process::Command;

use crate::{config::IptablesConfig, metrics::Metrics};

pub const METADATA_IP: &str = "169.254.169.254";
/// Marks every rule metabridge owns.
const COMMENT: &str = "metabridge";

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Whether `ensure` found the rules as they should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    AlreadyInPlace,
    Repaired,
}

#[derive(Debug, Clone)]
pub struct Interceptor {
    binary: String,
    restore_binary: String,
    conntrack_binary: String,
    lock_wait: String,
    chain: String,
    interfaces: Vec<String>,
    target: Option<SocketAddr>,
}

impl Interceptor {
    /// `target` is `None` for removal only.
    pub fn new(
        config: &IptablesConfig,
        interfaces: Vec<String>,
        target: Option<SocketAddr>,
    ) -> Self {
        Self {
            restore_binary: format!("{}-restore", config.iptables_binary),
            binary: config.iptables_binary.clone(),
            conntrack_binary: config.conntrack_binary.clone(),
            lock_wait: config.iptables_lock_wait.to_string(),
            chain: config.iptables_chain.clone(),
            interfaces,
            target,
        }
    }

    pub fn chain(&self) -> &str {
        &self.chain
    }

    pub fn rule_count(&self) -> usize {
        self.interfaces.len() + 1
    }

    fn jump_spec(&self) -> Vec<String> {
        words(&format!(
            "-d {METADATA_IP}/32 -p tcp -m tcp --dport 80 -m comment --comment {COMMENT} -j {}",
            self.chain
        ))
    }

    fn dnat_specs(&self) -> Vec<Vec<String>> {
        let Some(target) = self.target else {
            return Vec::new();
        };
        self.interfaces
            .iter()
            .map(|iface| {
                words(&format!(
                    "-d {METADATA_IP}/32 -i {iface} -p tcp -m tcp --dport 80 -m comment --comment {COMMENT} -j DNAT --to-destination {target}"
                ))
            })
            .collect()
    }

    /// The chain's rules exactly as `iptables -S` prints them.
    fn expected_chain(&self) -> Vec<String> {
        let mut lines = vec![format!("-N {}", self.chain)];
        for spec in self.dnat_specs() {
            lines.push(format!("-A {} {}", self.chain, spec.join(" ")));
        }
        lines
    }

    /// Verifies the rules and repairs whatever drifted. Idempotent; safe to
    /// call after a crash left rules (or half of them) behind.
    pub async fn ensure(&self) -> Result<Outcome, InterceptError> {
        let chain_ok = self.chain_matches().await?;
        let jump_ok = self.jump_is_first_and_only().await?;
        if chain_ok && jump_ok {
            return Ok(Outcome::AlreadyInPlace);
        }
        if !chain_ok {
            self.replace_chain().await?;
        }
        if !jump_ok {
            self.delete_jumps().await?;
            let mut args = vec!["-I".to_string(), "PREROUTING".into(), "1".into()];
            args.extend(self.jump_spec());
            self.iptables(&args).await?;
        }
        Ok(Outcome::Repaired)
    }

    /// Removes the jump and the chain. Idempotent.
    pub async fn remove(&self) -> Result<(), InterceptError> {
        self.delete_jumps().await?;
        if self.list("nat", &self.chain).await?.is_some() {
            self.iptables(&["-F".into(), self.chain.clone()]).await?;
            self.iptables(&["-X".into(), self.chain.clone()]).await?;
        }
        Ok(())
    }

    /// Forgets the conntrack entries of flows to 169.254.169.254:80 that
    /// were not DNATed to us — opened while the rules were missing (before
    /// the first install, between a previous instance's shutdown and this
    /// start, after an outside flush). Without this, a keep-alive connection
    /// to the real metadata server would go on reaching it: NAT is decided
    /// only for a flow's first packet. With the entry gone, the flow's next
    /// packet is picked up as new, meets the DNAT, and is reset by our
    /// listener, so the client reconnects to us. Flows already DNATed to us
    /// (their reply source is our address) are left alone.
    ///
    /// Returns how many entries were deleted.
    pub async fn forget_unintercepted_flows(&self) -> Result<u64, InterceptError> {
        if self.conntrack_binary.is_empty() {
            return Ok(0);
        }
        let args = [
            "-D",
            "-p",
            "tcp",
            "--orig-dst",
            METADATA_IP,
            "--orig-port-dst",
            "80",
            "--reply-src",
            METADATA_IP,
        ];
        match run(&self.conntrack_binary, &args, None).await {
            // One line per deleted entry on stdout; the count on stderr,
            // with exit status 1 when it is 0.
            Ok(deleted) => Ok(deleted.lines().filter(|l| !l.trim().is_empty()).count() as u64),
            Err(InterceptError::Failed { stderr, .. })
                if stderr.contains("0 flow entries have been deleted") =>
            {
                Ok(0)
            }
            Err(error) => Err(error),
        }
    }

    async fn chain_matches(&self) -> Result<bool, InterceptError> {
        Ok(self.list("nat", &self.chain).await?.as_deref()
            == Some(self.expected_chain().as_slice()))
    }

    async fn jump_is_first_and_only(&self) -> Result<bool, InterceptError> {
        let rules = self.list("nat", "PREROUTING").await?.unwrap_or_default();
        let expected = format!("-A PREROUTING {}", self.jump_spec().join(" "));
        let appends: Vec<&String> = rules.iter().filter(|l| l.starts_with("-A ")).collect();
        let ours = appends.iter().filter(|l| self.jumps_to_chain(l)).count();
        Ok(ours == 1 && appends.first().map(|l| l.as_str()) == Some(expected.as_str()))
    }

    fn jumps_to_chain(&self, line: &str) -> bool {
        let w = words(line);
        w.windows(2).any(|p| p[0] == "-j" && p[1] == self.chain)
    }

    async fn delete_jumps(&self) -> Result<(), InterceptError> {
        let rules = self.list("nat", "PREROUTING").await?.unwrap_or_default();
        for line in rules
            .iter()
            .filter(|l| l.starts_with("-A ") && self.jumps_to_chain(l))
        {
            let mut args = words(line);
            args[0] = "-D".into();
            self.iptables(&args).await?;
        }
        Ok(())
    }

    async fn replace_chain(&self) -> Result<(), InterceptError> {
        // With --noflush, declaring the chain creates it or empties it, and
        // the whole table update commits atomically.
        let mut input = format!("*nat\n:{} - [0:0]\n", self.chain);
        for spec in self.dnat_specs() {
            input.push_str(&format!("-A {} {}\n", self.chain, spec.join(" ")));
        }
        input.push_str("COMMIT\n");
        let args = ["-w", &self.lock_wait, "--noflush"];
        run(&self.restore_binary, &args, Some(input))
            .await
            .map(drop)
    }

    /// `iptables -S CHAIN` lines, or `None` when the chain does not exist.
    async fn list(&self, table: &str, chain: &str) -> Result<Option<Vec<String>>, InterceptError> {
        let args = ["-w", &self.lock_wait, "-t", table, "-S", chain];
        match run(&self.binary, &args, None).await {
            Ok(out) => Ok(Some(
                out.lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect(),
            )),
            Err(InterceptError::Failed { stderr, .. })
                if stderr.contains("No chain")
                    || stderr.contains("does not exist")
                    || stderr.contains("incompatible") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn iptables(&self, args: &[String]) -> Result<String, InterceptError> {
        let mut full: Vec<&str> = vec!["-w", &self.lock_wait, "-t", "nat"];
        full.extend(args.iter().map(String::as_str));
        run(&self.binary, &full, None).await
    }
}

async fn run(binary: &str, args: &[&str], stdin: Option<String>) -> Result<String, InterceptError> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| InterceptError::Spawn {
        binary: binary.to_string(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A failed write surfaces as the command's own failure below.
        let _ = pipe.write_all(input.as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| InterceptError::Spawn {
            binary: binary.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(InterceptError::Failed {
            command: format!("{binary} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Splits an `iptables -S` line into words, honouring double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// Keeps the rules in place until `shutdown` resolves, repairing drift
/// (another agent flushing our chain, a reordered PREROUTING) every `period`.
pub async fn keep_in_place(
    interceptor: Interceptor,
    period: Duration,
    metrics: Metrics,
    installed: tokio::sync::watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut first = true;
    loop {
        match interceptor.ensure().await {
            Ok(Outcome::AlreadyInPlace) => {
                metrics
                    .iptables_rules_installed
                    .set(interceptor.rule_count() as i64);
                let _ = installed.send(true);
            }
            Ok(Outcome::Repaired) => {
                match interceptor.forget_unintercepted_flows().await {
                    Ok(0) => {}
                    Ok(flows) => tracing::info!(
                        flows,
                        "reset connections to 169.254.169.254:80 opened while the rules were missing"
                    ),
                    Err(error) => tracing::warn!(
                        %error,
                        "cannot forget conntrack entries of flows that bypassed the rules; \
                         connections opened before them keep their destination until they close"
                    ),
                }
                if first {
                    tracing::info!(chain = interceptor.chain(), "interception rules installed");
                } else {
                    metrics.iptables_repairs.inc();
                    tracing::warn!(
                        chain = interceptor.chain(),
                        "interception rules had drifted; repaired"
                    );
                }
                metrics
                    .iptables_rules_installed
                    .set(interceptor.rule_count() as i64);
                let _ = installed.send(true);
            }
            Err(error) => {
                metrics.iptables_rules_installed.set(0);
                let _ = installed.send(false);
                tracing::error!(%error, "cannot install interception rules; retrying");
            }
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = &mut shutdown => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interceptor() -> Interceptor {
        Interceptor::new(
            &IptablesConfig {
                iptables_chain: "MBX".into(),
                iptables_binary: "iptables".into(),
                iptables_lock_wait: 5,
                conntrack_binary: "conntrack".into(),
            },
            vec!["eni+".into(), "cali+".into()],
            Some("10.0.0.1:8989".parse().unwrap()),
        )
    }

    #[test]
    fn expected_rules_match_iptables_save_format() {
        // The canonical form iptables 1.8 prints with -S; verification
        // compares against it literally.
        assert_eq!(
            interceptor().expected_chain(),
            vec![
                "-N MBX".to_string(),
                "-A MBX -d 169.254.169.254/32 -i eni+ -p tcp -m tcp --dport 80 -m comment --comment metabridge -j DNAT --to-destination 10.0.0.1:8989".into(),
                "-A MBX -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment metabridge -j DNAT --to-destination 10.0.0.1:8989".into(),
            ]
        );
    }

    #[test]
    fn recognises_only_jumps_to_our_chain() {
        let i = interceptor();
        assert!(i.jumps_to_chain("-A PREROUTING -m comment --comment \"x y\" -j MBX"));
        assert!(!i.jumps_to_chain("-A PREROUTING -j MBX2"));
        assert!(!i.jumps_to_chain("-A PREROUTING -m comment --comment MBX -j ACCEPT"));
    }

    #[test]
    fn words_honours_quotes() {
        assert_eq!(
            words(r#"-A X --comment "a b" -j Y"#),
            vec!["-A", "X", "--comment", "a b", "-j", "Y"]
        );
    }
}
