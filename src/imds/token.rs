//! IMDSv2 session tokens: stateless, bound to the pod that asked, expiring.
//!
//! A token is `base64url(version | expiry | uid_hash | mac)` (57 bytes, 76
//! characters) where
//!
//! - `version` is one byte (`1`), so the format can change without a token of
//!   the old format ever verifying under the new one;
//! - `expiry` is a big-endian `u64` of milliseconds on this process's
//!   monotonic clock (wall-clock steps cannot stretch or cut a token short);
//! - `uid_hash` is the first 16 bytes of SHA-256 of the pod's uid;
//! - `mac` is HMAC-SHA256 under a random per-process key over the three fields
//!   above **and the caller's IP**, which is not carried in the token.
//!
//! Why this shape:
//!
//! - *Stateless*: nothing to store, expire or bound per pod, so a pod that
//!   PUTs in a loop costs nothing but CPU; and no lock on the hot path.
//! - *Bound to the IP*: the MAC covers the source address, so a token copied
//!   to another pod fails on every path without any lookup.
//! - *Bound to the pod*: the uid hash lets the paths whose answer depends on
//!   the caller (they identify it anyway) refuse a token minted for an earlier
//!   pod that had the same IP. The other paths (region, instance id, …) answer
//!   the same to every pod on the node, so a stale token there reveals nothing
//!   a fresh PUT would not; they skip the lookup.
//! - *Random per-process key*: tokens die with the process. SDKs handle that
//!   as on a real instance: a 401 makes them fetch a new token.
//! - *Forgery-proof*: without the key no one can produce a MAC; the check is
//!   constant-time (`Mac::verify_slice`).

use std::{net::IpAddr, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 1;
const UID_HASH_LEN: usize = 16;
const MAC_LEN: usize = 32;
const RAW_LEN: usize = 1 + 8 + UID_HASH_LEN + MAC_LEN;
/// Longest token string worth decoding; anything longer is not ours.
const MAX_ENCODED_LEN: usize = 128;

/// The hash of a pod uid a token carries.
pub(crate) type UidHash = [u8; UID_HASH_LEN];

pub(crate) fn uid_hash(uid: &str) -> UidHash {
    let digest = Sha256::digest(uid.as_bytes());
    let mut out = [0u8; UID_HASH_LEN];
    out.copy_from_slice(&digest[..UID_HASH_LEN]);
    out
}

/// Why a presented token is refused (all answer 401; kept apart for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenError {
    /// Not base64url, wrong length or unknown version.
    Malformed,
    /// The MAC does not match: forged, or issued to another IP or process.
    Foreign,
    /// Past its expiry.
    Expired,
}

impl TokenError {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Foreign => "foreign",
            Self::Expired => "expired",
        }
    }
}

/// Issues and verifies tokens under one random key, on a monotonic clock.
#[derive(Clone)]
pub(crate) struct TokenKey {
    key: Arc<[u8; 32]>,
    clock: Clock,
}

impl TokenKey {
    /// A fresh random key (from the OS-seeded CSPRNG).
    pub(crate) fn random() -> Self {
        Self {
            key: Arc::new(rand::random()),
            clock: Clock::new(),
        }
    }

    /// A token for `uid` calling from `ip`, valid for `ttl`.
    pub(crate) fn issue(&self, ip: IpAddr, uid: &str, ttl: Duration) -> String {
        let expiry = self.clock.now_ms().saturating_add(ttl.as_millis() as u64);
        let uid_hash = uid_hash(uid);
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1..9].copy_from_slice(&expiry.to_be_bytes());
        raw[9..9 + UID_HASH_LEN].copy_from_slice(&uid_hash);
        let mac = self
            .mac(&raw[..9 + UID_HASH_LEN], ip)
            .finalize()
            .into_bytes();
        raw[9 + UID_HASH_LEN..].copy_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks `token` for a request from `ip`; yields the uid hash it is
    /// bound to.
    pub(crate) fn verify(&self, token: &[u8], ip: IpAddr) -> Result<UidHash, TokenError> {
        if token.len() > MAX_ENCODED_LEN {
            return Err(TokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        if raw.len() != RAW_LEN || raw[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let signed = &raw[..9 + UID_HASH_LEN];
        self.mac(signed, ip)
            .verify_slice(&raw[9 + UID_HASH_LEN..])
            .map_err(|_| TokenError::Foreign)?;
        let expiry = u64::from_be_bytes(raw[1..9].try_into().expect("8 bytes"));
        if self.clock.now_ms() >= expiry {
            return Err(TokenError::Expired);
        }
        let mut out = [0u8; UID_HASH_LEN];
        out.copy_from_slice(&raw[9..9 + UID_HASH_LEN]);
        Ok(out)
    }

    fn mac(&self, signed: &[u8], ip: IpAddr) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(self.key.as_slice()).expect("HMAC takes any key length");
        mac.update(signed);
        // IPv4 and IPv6 addresses differ in length, so tag the family.
        match ip {
            IpAddr::V4(v4) => {
                mac.update(&[4]);
                mac.update(&v4.octets());
            }
            IpAddr::V6(v6) => {
                mac.update(&[6]);
                mac.update(&v6.octets());
            }
        }
        mac
    }

    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

/// Milliseconds since this process made its key, on tokio's monotonic clock,
/// plus an offset tests can advance (always zero in production).
#[derive(Clone)]
struct Clock {
    base: tokio::time::Instant,
    #[cfg(test)]
    offset_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Clock {
    fn new() -> Self {
        Self {
            base: tokio::time::Instant::now(),
            #[cfg(test)]
            offset_ms: Arc::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        let elapsed = self.base.elapsed().as_millis() as u64;
        #[cfg(test)]
        let elapsed = elapsed + self.offset_ms.load(std::sync::atomic::Ordering::Relaxed);
        elapsed
    }

    #[cfg(test)]
    fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));
    const OTHER_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 8));

    #[test]
    fn round_trip_binds_ip_uid_and_expiry() {
        let key = TokenKey::random();
        let token = key.issue(IP, "uid-a", Duration::from_secs(60));
        assert_eq!(token.len(), 76);
        assert_eq!(key.verify(token.as_bytes(), IP), Ok(uid_hash("uid-a")));
        assert_ne!(uid_hash("uid-a"), uid_hash("uid-b"));
        assert_eq!(
            key.verify(token.as_bytes(), OTHER_IP),
            Err(TokenError::Foreign)
        );
        key.advance(Duration::from_millis(59_999));
        assert!(key.verify(token.as_bytes(), IP).is_ok());
        key.advance(Duration::from_millis(1));
        assert_eq!(key.verify(token.as_bytes(), IP), Err(TokenError::Expired));
    }

    #[test]
    fn refuses_other_keys_and_tampering_and_garbage() {
        let key = TokenKey::random();
        let other = TokenKey::random();
        let token = other.issue(IP, "uid-a", Duration::from_secs(60));
        assert_eq!(key.verify(token.as_bytes(), IP), Err(TokenError::Foreign));

        // Stretch the expiry of a genuine token: the MAC no longer matches.
        let token = key.issue(IP, "uid-a", Duration::from_secs(1));
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[1] = 0x7f;
        let tampered = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(
            key.verify(tampered.as_bytes(), IP),
            Err(TokenError::Foreign)
        );
        // Swap in another pod's uid hash.
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[9..25].copy_from_slice(&uid_hash("uid-b"));
        let tampered = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(
            key.verify(tampered.as_bytes(), IP),
            Err(TokenError::Foreign)
        );

        for garbage in ["", "not a token", "AAAA", &"A".repeat(500)] {
            assert_eq!(
                key.verify(garbage.as_bytes(), IP),
                Err(TokenError::Malformed),
                "{garbage:?}"
            );
        }
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[0] = 2;
        assert_eq!(
            key.verify(URL_SAFE_NO_PAD.encode(&raw).as_bytes(), IP),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn ipv6_and_ipv4_are_distinct() {
        let key = TokenKey::random();
        let v6: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        let token = key.issue(IP, "uid-a", Duration::from_secs(60));
        assert_eq!(key.verify(token.as_bytes(), v6), Err(TokenError::Foreign));
    }
}
