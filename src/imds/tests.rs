//! The IMDS API against a fake [`Identify`] and a fake
//! [`AwsCredentialSource`]: what each SDK sees on the wire.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use parking_lot::{Mutex, RwLock};

use super::*;
use crate::pods::{PodInfo, PodKey, ServiceAccountInfo};
use crate::server::testing::{Reply, request_parts};

const POD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 4, 0, 17));
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 4, 0, 18));
const NO_ROLE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 4, 0, 19));
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/team/app-reader";
const OTHER_ROLE_ARN: &str = "arn:aws:iam::210987654321:role/other";

// === fakes ===

#[derive(Default)]
struct FakeIdentify {
    callers: Mutex<HashMap<IpAddr, Result<Caller, LookupError>>>,
}

impl FakeIdentify {
    fn set(&self, ip: IpAddr, caller: Result<Caller, LookupError>) {
        self.callers.lock().insert(ip, caller);
    }
}

impl Identify for Arc<FakeIdentify> {
    async fn identify(&self, ip: IpAddr) -> Result<Caller, LookupError> {
        self.callers
            .lock()
            .get(&ip)
            .cloned()
            .unwrap_or(Err(LookupError::NotFound {
                ip,
                node: "node-a".into(),
            }))
    }
}

#[derive(Default)]
struct FakeSource {
    /// The answer for every call; `None`: a session for the role asked for.
    error: Mutex<Option<CredentialError>>,
    /// (pod uid, role ARN) of each call.
    calls: Mutex<Vec<(String, String)>>,
}

impl AwsCredentialSource for FakeSource {
    async fn session(
        &self,
        caller: &Caller,
        role_arn: &str,
    ) -> Result<Arc<AwsSession>, CredentialError> {
        self.calls
            .lock()
            .push((caller.pod.uid.clone(), role_arn.to_string()));
        if let Some(error) = self.error.lock().clone() {
            return Err(error);
        }
        Ok(Arc::new(session(role_arn)))
    }
}

fn session(role_arn: &str) -> AwsSession {
    let body = format!(
        "{{\"Code\":\"Success\",\"LastUpdated\":\"2026-01-01T00:00:00Z\",\"Type\":\"AWS-HMAC\",\
         \"AccessKeyId\":\"ASIAFAKE\",\"SecretAccessKey\":\"secret\",\"Token\":\"token-of {role_arn}\",\
         \"Expiration\":\"2026-01-01T01:00:00Z\"}}"
    );
    let extended = body.replace('}', ",\"AccountId\":\"123456789012\"}");
    AwsSession {
        access_key_id: "ASIAFAKE".into(),
        secret_access_key: "secret".into(),
        session_token: format!("token-of {role_arn}"),
        expiration: SystemTime::now() + Duration::from_secs(3600),
        last_updated: SystemTime::now(),
        assumed_role_arn: "arn:aws:sts::123456789012:assumed-role/app-reader/s".into(),
        account_id: "123456789012".into(),
        imds_body: Bytes::from(body),
        imds_extended_body: Bytes::from(extended),
    }
}

fn caller(uid: &str, role: Option<&str>) -> Caller {
    let mut annotations = BTreeMap::new();
    if let Some(role) = role {
        annotations.insert(AWS_ROLE_ARN_ANNOTATION.to_string(), role.to_string());
    }
    Caller {
        pod: Arc::new(PodInfo {
            namespace: "shop".into(),
            name: format!("web-{uid}"),
            uid: uid.into(),
            service_account: "web".into(),
            ips: vec![POD_IP],
        }),
        service_account: Arc::new(ServiceAccountInfo {
            namespace: "shop".into(),
            name: "web".into(),
            uid: "sa-uid".into(),
            annotations,
        }),
    }
}

struct Harness {
    api: ImdsApi<FakeSource, Arc<FakeIdentify>>,
    identify: Arc<FakeIdentify>,
    source: Arc<FakeSource>,
    node: Arc<RwLock<NodeFacts>>,
}

fn harness(allow_v1: bool) -> Harness {
    let identify = Arc::new(FakeIdentify::default());
    identify.set(POD_IP, Ok(caller("uid-1", Some(ROLE_ARN))));
    identify.set(OTHER_IP, Ok(caller("uid-2", Some(OTHER_ROLE_ARN))));
    identify.set(NO_ROLE_IP, Ok(caller("uid-3", None)));
    let source = Arc::new(FakeSource::default());
    let mut labels = BTreeMap::new();
    labels.insert("topology.kubernetes.io/zone".into(), "us-east-1c".into());
    labels.insert("node.kubernetes.io/instance-type".into(), "m5.large".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    let node = Arc::new(RwLock::new(NodeFacts {
        labels,
        provider_id: Some("gce://proj/us-central1-a/node-a".into()),
        internal_ip: Some("10.128.0.5".into()),
    }));
    let api = ImdsApi::new(
        ImdsSettings {
            region: "us-east-1".into(),
            allow_v1,
            node_name: "node-a".into(),
        },
        source.clone(),
        identify.clone(),
        node.clone(),
    );
    Harness {
        api,
        identify,
        source,
        node,
    }
}

/// IMDS serves JSON as `text/plain`: parse whatever came.
trait JsonReply {
    fn json(&self) -> serde_json::Value;
}

impl JsonReply for Reply {
    fn json(&self) -> serde_json::Value {
        self.parse_json()
    }
}

impl Harness {
    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        peer: IpAddr,
    ) -> Reply {
        let parts = request_parts(method.as_str(), path, headers);
        Reply::of(self.api.handle(&parts, peer).await).await
    }

    async fn put_token(&self, ttl: &str, peer: IpAddr) -> Reply {
        self.request(
            Method::PUT,
            TOKEN_PATH,
            &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)],
            peer,
        )
        .await
    }

    async fn token(&self, peer: IpAddr) -> String {
        let reply = self.put_token("21600", peer).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body
    }

    async fn get_v2(&self, path: &str, token: &str, peer: IpAddr) -> Reply {
        self.request(
            Method::GET,
            path,
            &[("X-aws-ec2-metadata-token", token)],
            peer,
        )
        .await
    }

    async fn get_v1(&self, path: &str, peer: IpAddr) -> Reply {
        self.request(Method::GET, path, &[], peer).await
    }
}

const CREDS_PATH: &str = "/latest/meta-data/iam/security-credentials/";

// === the token endpoint ===

#[tokio::test]
async fn token_ttl_bounds_and_echo() {
    let h = harness(false);
    for ttl in ["1", "300", "21600", " 60 "] {
        let reply = h.put_token(ttl, POD_IP).await;
        assert_eq!(reply.status, StatusCode::OK, "ttl {ttl:?}");
        assert_eq!(reply.route, "token");
        assert_eq!(
            reply.headers["x-aws-ec2-metadata-token-ttl-seconds"],
            ttl.trim(),
            "TTL echoed"
        );
        assert!(
            reply.headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        assert!(!reply.body.is_empty() && !reply.body.contains('\n'));
    }
    for ttl in ["0", "21601", "-1", "abc", "", "1.5", "99999999999999999999"] {
        let reply = h.put_token(ttl, POD_IP).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "ttl {ttl:?}");
        assert!(reply.headers.get(TOKEN_TTL_HEADER).is_none());
    }
    let missing = h.request(Method::PUT, TOKEN_PATH, &[], POD_IP).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let twice = h
        .request(
            Method::PUT,
            TOKEN_PATH,
            &[
                ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
                ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
            ],
            POD_IP,
        )
        .await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn token_put_with_x_forwarded_for_is_forbidden() {
    let h = harness(true);
    let reply = h
        .request(
            Method::PUT,
            TOKEN_PATH,
            &[
                ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
                ("X-Forwarded-For", "10.4.0.17"),
            ],
            POD_IP,
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.route, "token");
    assert!(reply.headers.get(TOKEN_TTL_HEADER).is_none());
}

#[tokio::test]
async fn token_put_from_unknown_or_refused_callers() {
    let h = harness(false);
    // Not in the index (yet): transient, retry.
    let unknown: IpAddr = "10.4.0.99".parse().unwrap();
    let reply = h.put_token("60", unknown).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.body.contains("10.4.0.99"), "{}", reply.body);
    // Claimed by two pods: refused for good.
    h.identify.set(
        unknown,
        Err(LookupError::Conflict {
            ip: unknown,
            pods: vec![
                PodKey {
                    namespace: "a".into(),
                    name: "x".into(),
                },
                PodKey {
                    namespace: "b".into(),
                    name: "y".into(),
                },
            ],
        }),
    );
    let reply = h.put_token("60", unknown).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.body.contains("a/x, b/y"), "{}", reply.body);
}

#[tokio::test]
async fn wrong_methods_are_405() {
    let h = harness(true);
    let reply = h.get_v1(TOKEN_PATH, POD_IP).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.route, "method_not_allowed");
    assert_eq!(reply.headers[header::ALLOW], "PUT");
    for method in [Method::POST, Method::DELETE, Method::PATCH] {
        let reply = h
            .request(
                method.clone(),
                TOKEN_PATH,
                &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
                POD_IP,
            )
            .await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
    }
    for method in [Method::POST, Method::PUT, Method::DELETE, Method::HEAD] {
        let reply = h
            .request(method.clone(), "/latest/meta-data/instance-id", &[], POD_IP)
            .await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(reply.headers[header::ALLOW], "GET");
    }
}

// === token checks on GET ===

#[tokio::test]
async fn v1_refused_by_default_allowed_by_configuration() {
    let strict = harness(false);
    let reply = strict
        .get_v1("/latest/meta-data/placement/region", POD_IP)
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.route, "unauthorized");
    assert!(reply.body.contains("401 - Unauthorized"));
    // Even unknown paths: the token is checked first, as on IMDS.
    let reply = strict.get_v1("/latest/nothing", POD_IP).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let token = strict.token(POD_IP).await;
    let reply = strict
        .get_v2("/latest/meta-data/placement/region", &token, POD_IP)
        .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "us-east-1")
    );

    let lax = harness(true);
    let reply = lax
        .get_v1("/latest/meta-data/placement/region", POD_IP)
        .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "us-east-1")
    );
    let reply = lax.get_v1(CREDS_PATH, POD_IP).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "app-reader")
    );
}

#[tokio::test]
async fn bad_tokens_are_401_even_with_v1_allowed() {
    let h = harness(true);
    for token in ["", "garbage", "AQAAAAAAAAAA"] {
        let reply = h
            .get_v2("/latest/meta-data/instance-id", token, POD_IP)
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{token:?}");
    }
    // A token from another process (another key).
    let other = harness(true);
    let foreign = other.token(POD_IP).await;
    let reply = h
        .get_v2("/latest/meta-data/instance-id", &foreign, POD_IP)
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // Two token headers.
    let token = h.token(POD_IP).await;
    let reply = h
        .request(
            Method::GET,
            "/latest/meta-data/instance-id",
            &[
                ("X-aws-ec2-metadata-token", &token),
                ("X-aws-ec2-metadata-token", &token),
            ],
            POD_IP,
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn token_is_bound_to_the_ip_and_the_pod() {
    let h = harness(false);
    let token = h.token(POD_IP).await;
    assert_eq!(
        h.get_v2(CREDS_PATH, &token, POD_IP).await.status,
        StatusCode::OK
    );

    // Presented from another pod's IP: refused everywhere.
    for path in [CREDS_PATH, "/latest/meta-data/placement/region"] {
        let reply = h.get_v2(path, &token, OTHER_IP).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
    }

    // The pod is replaced and its IP reused by a new pod (new uid): the old
    // token no longer reaches anything that depends on the caller.
    h.identify
        .set(POD_IP, Ok(caller("uid-new", Some(ROLE_ARN))));
    for path in [
        CREDS_PATH,
        "/latest/meta-data/iam/security-credentials/app-reader",
        "/latest/meta-data/iam/security-credentials-extended/app-reader",
        "/latest/meta-data/iam/info",
        "/latest/dynamic/instance-identity/document",
    ] {
        let reply = h.get_v2(path, &token, POD_IP).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    assert!(
        h.source.calls.lock().is_empty(),
        "nothing minted for a stale token"
    );
    // The new pod's own token works.
    let fresh = h.token(POD_IP).await;
    let reply = h
        .get_v2(
            "/latest/meta-data/iam/security-credentials/app-reader",
            &fresh,
            POD_IP,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        h.source.calls.lock().as_slice(),
        &[("uid-new".to_string(), ROLE_ARN.to_string())]
    );
}

#[tokio::test]
async fn tokens_expire() {
    let h = harness(false);
    let reply = h.put_token("2", POD_IP).await;
    let token = reply.body;
    let path = "/latest/meta-data/instance-id";
    assert_eq!(h.get_v2(path, &token, POD_IP).await.status, StatusCode::OK);
    h.api.advance_clock(Duration::from_millis(1_999));
    assert_eq!(h.get_v2(path, &token, POD_IP).await.status, StatusCode::OK);
    h.api.advance_clock(Duration::from_millis(1));
    let reply = h.get_v2(path, &token, POD_IP).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.route, "unauthorized");
}

// === credentials ===

#[tokio::test]
async fn role_name_and_credentials() {
    let h = harness(false);
    let token = h.token(POD_IP).await;
    for path in [
        "/latest/meta-data/iam/security-credentials",
        CREDS_PATH,
        "/latest/meta-data/iam/security-credentials-extended/",
    ] {
        let reply = h.get_v2(path, &token, POD_IP).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.route, "role_name");
        assert_eq!(
            reply.body, "app-reader",
            "no trailing newline: botocore pastes it into the URL"
        );
    }

    let reply = h
        .get_v2(
            "/latest/meta-data/iam/security-credentials/app-reader",
            &token,
            POD_IP,
        )
        .await;
    assert_eq!((reply.status, reply.route), (StatusCode::OK, "credentials"));
    let creds = reply.json();
    assert_eq!(creds["Code"], "Success");
    assert_eq!(creds["Token"], format!("token-of {ROLE_ARN}"));
    assert!(creds.get("AccountId").is_none());

    let reply = h
        .get_v2(
            "/latest/meta-data/iam/security-credentials-extended/app-reader",
            &token,
            POD_IP,
        )
        .await;
    assert_eq!(
        (reply.status, reply.route),
        (StatusCode::OK, "credentials_extended")
    );
    assert_eq!(reply.json()["AccountId"], "123456789012");

    // Each pod its own role.
    let other = h.token(OTHER_IP).await;
    let reply = h
        .get_v2(
            "/latest/meta-data/iam/security-credentials/other",
            &other,
            OTHER_IP,
        )
        .await;
    assert_eq!(reply.json()["Token"], format!("token-of {OTHER_ROLE_ARN}"));
    assert_eq!(
        h.source.calls.lock().as_slice(),
        &[
            ("uid-1".to_string(), ROLE_ARN.to_string()),
            ("uid-1".to_string(), ROLE_ARN.to_string()),
            ("uid-2".to_string(), OTHER_ROLE_ARN.to_string()),
        ]
    );
}

#[tokio::test]
async fn another_role_name_is_404() {
    let h = harness(false);
    let token = h.token(POD_IP).await;
    for path in [
        "/latest/meta-data/iam/security-credentials/other",
        "/latest/meta-data/iam/security-credentials/App-Reader",
        "/latest/meta-data/iam/security-credentials/app-reader/",
        "/latest/meta-data/iam/security-credentials/app-reader/x",
        "/latest/meta-data/iam/security-credentials-extended/other",
    ] {
        let reply = h.get_v2(path, &token, POD_IP).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        assert!(reply.body.contains("404 - Not Found"), "{path}");
    }
    assert!(h.source.calls.lock().is_empty());
}

#[tokio::test]
async fn no_role_annotation_is_404_naming_the_annotation() {
    let h = harness(false);
    let token = h.token(NO_ROLE_IP).await;
    for path in [
        "/latest/meta-data/iam/security-credentials",
        CREDS_PATH,
        "/latest/meta-data/iam/security-credentials/app-reader",
        "/latest/meta-data/iam/security-credentials-extended/",
        "/latest/meta-data/iam/security-credentials-extended/app-reader",
        "/latest/meta-data/iam/info",
    ] {
        let reply = h.get_v2(path, &token, NO_ROLE_IP).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        assert!(
            reply.body.contains("eks.amazonaws.com/role-arn"),
            "{path}: {}",
            reply.body
        );
        assert!(reply.body.contains("shop/web"), "{path}: {}", reply.body);
        assert!(!reply.body.contains("10.128.0.5") && !reply.body.contains("node-a"));
    }
    assert!(h.source.calls.lock().is_empty());
    // The identity document still answers, without an account.
    let reply = h
        .get_v2(
            "/latest/dynamic/instance-identity/document",
            &token,
            NO_ROLE_IP,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.json()["accountId"].is_null());
}

#[tokio::test]
async fn malformed_role_annotation_is_404_with_the_value() {
    let h = harness(true);
    h.identify.set(
        NO_ROLE_IP,
        Ok(caller("uid-3", Some("arn:aws:iam::123:user/bob"))),
    );
    let reply = h.get_v1(CREDS_PATH, NO_ROLE_IP).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(
        reply.body.contains("arn:aws:iam::123:user/bob"),
        "{}",
        reply.body
    );
    assert!(reply.body.contains("not an IAM role ARN"), "{}", reply.body);
}

#[tokio::test]
async fn caller_lookup_failures_on_credential_paths() {
    let h = harness(true);
    let unknown: IpAddr = "10.4.0.99".parse().unwrap();
    let reply = h.get_v1(CREDS_PATH, unknown).await;
    assert_eq!(
        (reply.status, reply.route),
        (StatusCode::SERVICE_UNAVAILABLE, "role_name")
    );
    h.identify.set(
        unknown,
        Err(LookupError::ServiceAccountNotFound {
            namespace: "shop".into(),
            name: "gone".into(),
        }),
    );
    let reply = h
        .get_v1(
            "/latest/meta-data/iam/security-credentials/app-reader",
            unknown,
        )
        .await;
    assert_eq!(
        (reply.status, reply.route),
        (StatusCode::NOT_FOUND, "credentials")
    );
    assert!(reply.body.contains("shop/gone"), "{}", reply.body);
    // Node-wide paths need no lookup.
    let reply = h
        .get_v1("/latest/meta-data/placement/region", unknown)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

fn upstream(code: &str, retryable: bool, status: Option<u16>) -> CredentialError {
    CredentialError::Upstream {
        service: "AWS STS",
        status,
        code: code.into(),
        message: format!("{code} happened"),
        retryable,
    }
}

#[tokio::test]
async fn credential_errors_are_mapped_once() {
    let h = harness(true);
    let path = "/latest/meta-data/iam/security-credentials/app-reader";

    // Permanent: 200 with Code/Message, as IMDS reports a role it cannot assume.
    *h.source.error.lock() = Some(upstream("AccessDenied", false, Some(403)));
    let reply = h.get_v1(path, POD_IP).await;
    assert_eq!((reply.status, reply.route), (StatusCode::OK, "credentials"));
    let body = reply.json();
    assert_eq!(body["Code"], "AssumeRoleUnauthorizedAccess");
    let message = body["Message"].as_str().unwrap();
    assert!(message.contains("AccessDenied happened"), "{message}");
    assert!(message.contains(ROLE_ARN), "{message}");
    assert!(message.contains("shop/web"), "{message}");
    assert!(body["LastUpdated"].as_str().unwrap().ends_with('Z'));
    assert!(body.get("AccessKeyId").is_none());

    *h.source.error.lock() = Some(upstream("InvalidIdentityToken", false, Some(400)));
    let reply = h.get_v1(path, POD_IP).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["Code"], "InvalidIdentityToken");

    *h.source.error.lock() = Some(CredentialError::KubeToken {
        service_account: "shop/web".into(),
        status: 403,
        message: "forbidden".into(),
    });
    let reply = h.get_v1(path, POD_IP).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["Code"], "KubernetesTokenRequestFailed");

    // Retryable: 503, which Go and Rust retry.
    for error in [
        upstream("Throttling", true, Some(400)),
        upstream("ServiceUnavailable", true, Some(503)),
        upstream("", true, None),
        CredentialError::KubeToken {
            service_account: "shop/web".into(),
            status: 500,
            message: "etcd".into(),
        },
    ] {
        *h.source.error.lock() = Some(error.clone());
        let reply = h
            .get_v1(
                "/latest/meta-data/iam/security-credentials-extended/app-reader",
                POD_IP,
            )
            .await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
        assert_eq!(reply.route, "credentials_extended");
        assert!(reply.body.contains(&error.to_string()), "{}", reply.body);
    }

    // Not configured in the source: 404 with its message.
    *h.source.error.lock() = Some(CredentialError::NotConfigured {
        message: "no AWS token source".into(),
    });
    let reply = h.get_v1(path, POD_IP).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.body.contains("no AWS token source"));
}

#[tokio::test]
async fn unwired_source_says_so() {
    let identify = Arc::new(FakeIdentify::default());
    identify.set(POD_IP, Ok(caller("uid-1", Some(ROLE_ARN))));
    let api: ImdsApi<Unwired, Arc<FakeIdentify>> = ImdsApi::new(
        ImdsSettings {
            region: "us-east-1".into(),
            allow_v1: true,
            node_name: "node-a".into(),
        },
        Arc::new(Unwired),
        identify,
        Arc::default(),
    );
    let (parts, ()) = Request::get("/latest/meta-data/iam/security-credentials/app-reader")
        .body(())
        .unwrap()
        .into_parts();
    let answer = api.handle(&parts, POD_IP).await;
    assert_eq!(answer.response.status(), StatusCode::NOT_FOUND);
}

// === iam/info, placement, instance, identity document ===

#[tokio::test]
async fn iam_info_is_synthesised_from_the_role() {
    let h = harness(true);
    let reply = h.get_v1("/latest/meta-data/iam/info", POD_IP).await;
    assert_eq!((reply.status, reply.route), (StatusCode::OK, "iam_info"));
    let info = reply.json();
    assert_eq!(info["Code"], "Success");
    assert_eq!(
        info["InstanceProfileArn"],
        "arn:aws:iam::123456789012:instance-profile/team/app-reader"
    );
    let id = info["InstanceProfileId"].as_str().unwrap();
    assert!(id.starts_with("AIPA") && id.len() == 21, "{id}");
    assert_eq!(info["LastUpdated"].as_str().unwrap().len(), 20);
    // Stable per role, different between roles.
    let again = h.get_v1("/latest/meta-data/iam/info", POD_IP).await.json();
    assert_eq!(again["InstanceProfileId"], id);
    let other = h
        .get_v1("/latest/meta-data/iam/info", OTHER_IP)
        .await
        .json();
    assert_ne!(other["InstanceProfileId"], id);
}

#[tokio::test]
async fn placement_instance_and_identity_document_agree() {
    let h = harness(true);
    let get = |path: &'static str| {
        let h = &h;
        async move {
            let reply = h.get_v1(path, POD_IP).await;
            assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
            reply
        }
    };
    let region = get("/latest/meta-data/placement/region").await;
    assert_eq!(
        (region.route, region.body.as_str()),
        ("placement", "us-east-1")
    );
    let az = get("/latest/meta-data/placement/availability-zone")
        .await
        .body;
    assert_eq!(az, "us-east-1c");
    // botocore's region lookup asks for the leaf with a trailing slash.
    let az_slash = get("/latest/meta-data/placement/availability-zone/")
        .await
        .body;
    assert_eq!(az_slash, "us-east-1c");
    let instance_id = get("/latest/meta-data/instance-id").await;
    assert_eq!(instance_id.route, "instance");
    let instance_id = instance_id.body;
    assert!(
        instance_id.starts_with("i-") && instance_id.len() == 19,
        "{instance_id}"
    );
    assert_eq!(
        get("/latest/meta-data/instance-type").await.body,
        "m5.large"
    );
    assert_eq!(get("/latest/meta-data/local-ipv4").await.body, "10.128.0.5");

    let doc = get("/latest/dynamic/instance-identity/document").await;
    assert_eq!(doc.route, "identity_document");
    let doc = doc.json();
    assert_eq!(doc["region"], "us-east-1");
    assert_eq!(doc["availabilityZone"], az);
    assert_eq!(doc["instanceId"], instance_id);
    assert_eq!(doc["instanceType"], "m5.large");
    assert_eq!(doc["privateIp"], "10.128.0.5");
    assert_eq!(doc["accountId"], "123456789012");
    assert_eq!(doc["architecture"], "x86_64");
    assert_eq!(doc["version"], "2017-09-30");
    assert!(doc["imageId"].is_null() && doc["kernelId"].is_null());
    let fields: Vec<&str> = doc
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for field in [
        "accountId",
        "architecture",
        "availabilityZone",
        "billingProducts",
        "devpayProductCodes",
        "marketplaceProductCodes",
        "imageId",
        "instanceId",
        "instanceType",
        "kernelId",
        "pendingTime",
        "privateIp",
        "ramdiskId",
        "region",
        "version",
    ] {
        assert!(fields.contains(&field), "{field} missing");
    }
    // Botocore's region from the AZ (minus its last letter) is the region.
    assert_eq!(&az[..az.len() - 1], "us-east-1");

    // A Google zone on the node: a fixed AZ of the configured region, the
    // same in the document.
    h.node
        .write()
        .labels
        .insert("topology.kubernetes.io/zone".into(), "us-central1-a".into());
    let az = get("/latest/meta-data/placement/availability-zone")
        .await
        .body;
    assert_eq!(az, "us-east-1a");
    let doc = get("/latest/dynamic/instance-identity/document")
        .await
        .json();
    assert_eq!(doc["availabilityZone"], "us-east-1a");
    // Instance id does not move with Node updates.
    assert_eq!(doc["instanceId"], instance_id);
}

#[tokio::test]
async fn node_facts_missing() {
    let h = harness(true);
    *h.node.write() = NodeFacts::default();
    for path in [
        "/latest/meta-data/instance-type",
        "/latest/meta-data/local-ipv4",
    ] {
        assert_eq!(
            h.get_v1(path, POD_IP).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    let listing = h.get_v1("/latest/meta-data/", POD_IP).await.body;
    assert_eq!(listing, "iam/\ninstance-id\nplacement/");
    let doc = h
        .get_v1("/latest/dynamic/instance-identity/document", POD_IP)
        .await
        .json();
    assert!(doc["privateIp"].is_null() && doc["instanceType"].is_null());
    assert_eq!(doc["availabilityZone"], "us-east-1a");
}

#[tokio::test]
async fn listings_and_unknown_paths() {
    let h = harness(true);
    for (path, body) in [
        ("/", "latest"),
        ("/latest", "dynamic\nmeta-data"),
        ("/latest/", "dynamic\nmeta-data"),
        (
            "/latest/meta-data/",
            "iam/\ninstance-id\ninstance-type\nlocal-ipv4\nplacement/",
        ),
        (
            "/latest/meta-data",
            "iam/\ninstance-id\ninstance-type\nlocal-ipv4\nplacement/",
        ),
        ("/latest/meta-data/iam/", "info\nsecurity-credentials/"),
        ("/latest/meta-data/placement/", "availability-zone\nregion"),
        ("/latest/dynamic/", "instance-identity/"),
        ("/latest/dynamic/instance-identity/", "document"),
    ] {
        let reply = h.get_v1(path, POD_IP).await;
        assert_eq!(
            (reply.status, reply.route),
            (StatusCode::OK, "listing"),
            "{path}"
        );
        assert_eq!(reply.body, body, "{path}");
    }
    for path in [
        "/latest/user-data",
        "/latest/meta-data/ami-id",
        "/latest/meta-data/placement/availability-zone-id",
        "/latest/meta-data/iam/security-credentialsx",
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/api/token/",
        "/latest/api",
    ] {
        let reply = h.get_v1(path, POD_IP).await;
        assert_eq!(
            (reply.status, reply.route),
            (StatusCode::NOT_FOUND, "not_found"),
            "{path}"
        );
        assert!(reply.body.contains("<title>404 - Not Found</title>"));
        assert_eq!(reply.headers[header::CONTENT_TYPE], "text/html");
    }
}

// === settings ===

#[test]
fn settings_from_config() {
    use clap::Parser;
    let parse = |extra: &[&str]| {
        let mut argv = vec!["metabridge", "run", "--node-name", "node-a"];
        argv.extend_from_slice(extra);
        match crate::config::Cli::try_parse_from(argv).unwrap().command {
            crate::config::Command::Run(config) => ImdsSettings::from_config(&config),
            _ => unreachable!(),
        }
    };
    assert_eq!(
        parse(&["--aws-region", "eu-west-1", "--imds-allow-v1"]),
        Ok(ImdsSettings {
            region: "eu-west-1".into(),
            allow_v1: true,
            node_name: "node-a".into(),
        })
    );
    assert!(!parse(&["--aws-region", "us-gov-west-1"]).unwrap().allow_v1);
    assert!(parse(&[]).unwrap_err().contains("--aws-region"));
    for bad in ["us-central1", "US-EAST-1", "us-east-1a", "us--1", "east-1"] {
        let err = parse(&["--aws-region", bad]).unwrap_err();
        assert!(err.contains(bad), "{bad}: {err}");
    }
}
