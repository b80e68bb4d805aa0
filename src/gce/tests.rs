//! `GceApi::handle` driven with a fake caller identification and a fake
//! credential source, rule by rule.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::StatusCode;
use parking_lot::{Mutex, RwLock};

use super::*;
use crate::pods::{LookupError, PodInfo, PodKey, ServiceAccountInfo};
use crate::server::testing::{Reply, request_parts};

const PROJECT_NUMBER: u64 = 123456789012;
const APP_EMAIL: &str = "app@my-project.iam.gserviceaccount.com";
const POOL: &str = "eks-pool";
const PROVIDER_ID: &str = "aws:///us-east-1a/i-0123456789abcdef0";

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

// === fakes ===

/// Callers by IP; an IP not listed is "not known yet" (transient).
#[derive(Clone, Default)]
struct FakeIdentify {
    callers: Arc<HashMap<IpAddr, Result<Caller, LookupError>>>,
    lookups: Arc<Mutex<usize>>,
}

impl Identify for FakeIdentify {
    async fn identify(&self, ip: IpAddr) -> Result<Caller, LookupError> {
        *self.lookups.lock() += 1;
        self.callers
            .get(&ip)
            .cloned()
            .unwrap_or(Err(LookupError::NotFound {
                ip,
                node: "node-1".into(),
            }))
    }
}

fn caller(namespace: &str, sa: &str, gsa: Option<&str>) -> Caller {
    let mut annotations = BTreeMap::new();
    if let Some(gsa) = gsa {
        annotations.insert(GCP_SERVICE_ACCOUNT_ANNOTATION.to_string(), gsa.to_string());
    }
    Caller {
        pod: Arc::new(PodInfo {
            namespace: namespace.into(),
            name: format!("{sa}-pod"),
            uid: format!("uid-{sa}"),
            service_account: sa.into(),
            ips: vec![],
        }),
        service_account: Arc::new(ServiceAccountInfo {
            namespace: namespace.into(),
            name: sa.into(),
            uid: format!("sa-uid-{sa}"),
            annotations,
        }),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Access {
        sa: String,
        scopes: Vec<String>,
    },
    Id {
        sa: String,
        audience: String,
        full: bool,
    },
}

/// Mints `ya29.<sa>` / `jwt.<sa>.<audience>`, or fails with the set error.
#[derive(Default)]
struct FakeSource {
    calls: Mutex<Vec<Call>>,
    fail: Mutex<Option<CredentialError>>,
}

impl FakeSource {
    fn failing(error: CredentialError) -> Self {
        Self {
            fail: Mutex::new(Some(error)),
            ..Self::default()
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().clone()
    }
}

impl GoogleCredentialSource for FakeSource {
    async fn access_token(
        &self,
        caller: &Caller,
        scopes: &[String],
    ) -> Result<Arc<GoogleAccessToken>, CredentialError> {
        self.calls.lock().push(Call::Access {
            sa: caller.service_account.name.clone(),
            scopes: scopes.to_vec(),
        });
        if let Some(error) = self.fail.lock().clone() {
            return Err(error);
        }
        Ok(Arc::new(GoogleAccessToken::new(
            format!("ya29.{}", caller.service_account.name),
            now() + Duration::from_secs(3599),
        )))
    }

    async fn id_token(
        &self,
        caller: &Caller,
        audience: &str,
        full: bool,
    ) -> Result<Arc<GoogleIdToken>, CredentialError> {
        self.calls.lock().push(Call::Id {
            sa: caller.service_account.name.clone(),
            audience: audience.into(),
            full,
        });
        if let Some(error) = self.fail.lock().clone() {
            return Err(error);
        }
        Ok(Arc::new(GoogleIdToken {
            token: Bytes::from(format!("jwt.{}.{audience}", caller.service_account.name)),
            expires_at: now() + Duration::from_secs(3600),
        }))
    }
}

// === harness ===

struct Harness {
    api: GceApi<FakeSource, FakeIdentify>,
    source: Arc<FakeSource>,
    identify: FakeIdentify,
    node: Arc<RwLock<NodeFacts>>,
}

fn settings() -> GceSettings {
    GceSettings {
        project_id: "my-project".into(),
        numeric_project_id: PROJECT_NUMBER,
        direct_access_email: POOL.into(),
        cluster_name: Some("prod".into()),
        cluster_location: Some("us-east-1".into()),
        node_name: "ip-10-0-1-2.ec2.internal".into(),
    }
}

fn harness_with(source: FakeSource) -> Harness {
    let mut callers = HashMap::new();
    callers.insert(ip(1), Ok(caller("team-a", "app", Some(APP_EMAIL))));
    callers.insert(ip(2), Ok(caller("team-b", "direct", None)));
    callers.insert(
        ip(3),
        Err(LookupError::HostNetwork {
            ip: ip(3),
            pod: PodKey {
                namespace: "kube-system".into(),
                name: "aws-node-x".into(),
            },
        }),
    );
    callers.insert(
        ip(4),
        Err(LookupError::ServiceAccountNotFound {
            namespace: "team-c".into(),
            name: "gone".into(),
        }),
    );
    let identify = FakeIdentify {
        callers: Arc::new(callers),
        lookups: Arc::default(),
    };
    let mut facts = NodeFacts::default();
    facts
        .labels
        .insert("topology.kubernetes.io/zone".into(), "us-east-1a".into());
    facts.provider_id = Some(PROVIDER_ID.into());
    let node = Arc::new(RwLock::new(facts));
    let source = Arc::new(source);
    let api =
        GceApi::new(settings(), source.clone(), identify.clone(), node.clone()).with_clock(now);
    Harness {
        api,
        source,
        identify,
        node,
    }
}

fn harness() -> Harness {
    harness_with(FakeSource::default())
}

/// GCE answers JSON only with `application/json` (Python parses nothing else).
trait JsonReply {
    fn json(&self) -> serde_json::Value;
}

impl JsonReply for Reply {
    fn json(&self) -> serde_json::Value {
        assert_eq!(
            self.header("content-type"),
            "application/json",
            "{}",
            self.body
        );
        self.parse_json()
    }
}

impl Harness {
    async fn request(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        from: IpAddr,
    ) -> Reply {
        let parts = request_parts(method, uri, headers);
        Reply::of(self.api.handle(&parts, from).await).await
    }

    /// A GET with the flavor header from `from`.
    async fn get_from(&self, uri: &str, from: IpAddr) -> Reply {
        self.request("GET", uri, &[("Metadata-Flavor", "Google")], from)
            .await
    }

    /// A GET with the flavor header from the annotated pod.
    async fn get(&self, uri: &str) -> Reply {
        self.get_from(uri, ip(1)).await
    }

    fn lookups(&self) -> usize {
        *self.identify.lookups.lock()
    }
}

fn assert_gce_headers(reply: &Reply) {
    assert_eq!(reply.header("metadata-flavor"), "Google");
    assert_eq!(reply.header("server"), SERVER);
    assert_eq!(reply.header("x-xss-protection"), "0");
    assert_eq!(reply.header("x-frame-options"), "SAMEORIGIN");
}

fn assert_not_found_page(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    assert_eq!(reply.route, "not_found");
    assert_eq!(reply.header("content-type"), "text/html; charset=UTF-8");
    assert!(
        reply.body.contains("Error 404 (Not Found)!!1"),
        "{}",
        reply.body
    );
    assert_gce_headers(reply);
}

const V1: &str = "/computeMetadata/v1";

// === the root and the header rules ===

#[tokio::test]
async fn root_answers_without_the_flavor_header() {
    let h = harness();
    let reply = h.request("GET", "/", &[], ip(1)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "computeMetadata/\n");
    assert_eq!(reply.route, "root");
    assert_gce_headers(&reply);
    // Go's probe: only a User-Agent, from a pod not known yet.
    let reply = h
        .request("GET", "/", &[("User-Agent", "gcloud-golang/0.1")], ip(99))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(h.lookups(), 0, "the root does not depend on the caller");

    let reply = h.request("GET", "/computeMetadata/", &[], ip(1)).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "v1/\n")
    );
    let reply = h.request("GET", "/computeMetadata", &[], ip(1)).await;
    assert_eq!(reply.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(reply.header("location"), "/computeMetadata/");
}

#[tokio::test]
async fn flavor_header_is_required_under_v1() {
    let h = harness();
    for uri in [
        format!("{V1}/project/project-id"),
        format!("{V1}/"),
        V1.to_string(),
        format!("{V1}/instance/service-accounts/default/token"),
    ] {
        for headers in [
            &[][..],
            &[("Metadata-Flavor", "google")][..],
            &[("Metadata-Flavor", "Googl")][..],
        ] {
            let reply = h.request("GET", &uri, headers, ip(1)).await;
            assert_eq!(reply.status, StatusCode::FORBIDDEN, "{uri} {headers:?}");
            assert_eq!(
                reply.body,
                "Missing required header \"Metadata-Flavor\": \"Google\"\n"
            );
            assert_eq!(reply.route, "forbidden");
            assert_gce_headers(&reply);
        }
    }
    assert!(h.source.calls().is_empty());
    assert_eq!(h.lookups(), 0);
    // The header name is case-insensitive.
    let reply = h
        .request(
            "GET",
            &format!("{V1}/project/project-id"),
            &[("metadata-flavor", "Google")],
            ip(1),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn forwarded_requests_are_refused() {
    let h = harness();
    for uri in [
        "/",
        &format!("{V1}/instance/service-accounts/default/token"),
    ] {
        let reply = h
            .request(
                "GET",
                uri,
                &[
                    ("Metadata-Flavor", "Google"),
                    ("X-Forwarded-For", "10.0.0.1"),
                ],
                ip(1),
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{uri}");
        assert!(reply.body.contains("X-Forwarded-For"), "{}", reply.body);
        assert_eq!(reply.route, "forbidden");
        assert_gce_headers(&reply);
    }
    assert!(h.source.calls().is_empty());
}

#[tokio::test]
async fn only_get_and_head() {
    let h = harness();
    let uri = format!("{V1}/project/project-id");
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let reply = h
            .request(method, &uri, &[("Metadata-Flavor", "Google")], ip(1))
            .await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(reply.header("allow"), "GET, HEAD");
        assert_eq!(reply.route, "method_not_allowed");
    }
    let reply = h
        .request("HEAD", &uri, &[("Metadata-Flavor", "Google")], ip(1))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = h.request("POST", "/", &[], ip(1)).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
}

// === directories ===

#[tokio::test]
async fn directories_redirect_to_the_slash_form_keeping_the_query() {
    let h = harness();
    for (uri, location) in [
        (V1.to_string(), format!("{V1}/")),
        (format!("{V1}/instance"), format!("{V1}/instance/")),
        (
            format!("{V1}/instance?recursive=true&alt=json"),
            format!("{V1}/instance/?recursive=true&alt=json"),
        ),
        (
            format!("{V1}/instance/service-accounts/default?recursive=true"),
            format!("{V1}/instance/service-accounts/default/?recursive=true"),
        ),
        (format!("{V1}/project"), format!("{V1}/project/")),
    ] {
        let reply = h.get(&uri).await;
        assert_eq!(reply.status, StatusCode::MOVED_PERMANENTLY, "{uri}");
        assert_eq!(reply.header("location"), location, "{uri}");
        assert_eq!(reply.route, "redirect");
        assert_gce_headers(&reply);
    }
}

#[tokio::test]
async fn listings_end_subdirectories_with_a_slash() {
    let h = harness();
    let cases = [
        (format!("{V1}/"), "instance/\nproject/\n", "root"),
        (
            format!("{V1}/instance/"),
            "attributes/\nhostname\nid\nservice-accounts/\nzone\n",
            "instance",
        ),
        (
            format!("{V1}/instance/attributes/"),
            "cluster-location\ncluster-name\n",
            "attributes",
        ),
        (
            format!("{V1}/project/"),
            "numeric-project-id\nproject-id\n",
            "project",
        ),
        (
            format!("{V1}/instance/service-accounts/"),
            "default/\napp@my-project.iam.gserviceaccount.com/\n",
            "service_accounts",
        ),
        (
            format!("{V1}/instance/service-accounts/default/"),
            "aliases\nemail\nidentity\nscopes\ntoken\n",
            "service_accounts",
        ),
        (
            format!("{V1}/instance/service-accounts/{APP_EMAIL}/"),
            "aliases\nemail\nidentity\nscopes\ntoken\n",
            "service_accounts",
        ),
    ];
    for (uri, body, route) in cases {
        let reply = h.get(&uri).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}");
        assert_eq!(reply.body, body, "{uri}");
        assert_eq!(reply.route, route, "{uri}");
        assert_eq!(reply.header("content-type"), "application/text");
        assert_gce_headers(&reply);
    }
}

#[tokio::test]
async fn recursive_json_is_camel_case_and_carries_no_credentials() {
    let h = harness();
    let scopes = serde_json::json!(DEFAULT_SCOPES);
    let account = |email: &str| serde_json::json!({ "aliases": ["default"], "email": email, "scopes": scopes });

    // Python's get_service_account_info.
    let reply = h
        .get(&format!(
            "{V1}/instance/service-accounts/default/?recursive=true"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), account(APP_EMAIL));
    assert_eq!(
        reply.body,
        format!(
            "{{\"aliases\":[\"default\"],\"email\":\"{APP_EMAIL}\",\"scopes\":[\"{}\",\"{}\"]}}",
            DEFAULT_SCOPES[0], DEFAULT_SCOPES[1]
        )
    );
    assert_eq!(reply.route, "service_accounts");

    // Java.
    let reply = h
        .get(&format!("{V1}/instance/service-accounts/?recursive=true"))
        .await;
    assert_eq!(
        reply.json(),
        serde_json::json!({ "default": account(APP_EMAIL), APP_EMAIL: account(APP_EMAIL) })
    );

    let reply = h.get(&format!("{V1}/instance/?recursive=true")).await;
    let instance = serde_json::json!({
        "attributes": { "cluster-location": "us-east-1", "cluster-name": "prod" },
        "hostname": "ip-10-0-1-2.ec2.internal",
        "id": instance_id(PROVIDER_ID),
        "serviceAccounts": { "default": account(APP_EMAIL), APP_EMAIL: account(APP_EMAIL) },
        "zone": format!("projects/{PROJECT_NUMBER}/zones/us-east-1a"),
    });
    assert_eq!(reply.json(), instance);
    assert_eq!(reply.route, "instance");

    let reply = h.get(&format!("{V1}/project/?recursive=true")).await;
    let project =
        serde_json::json!({ "numericProjectId": PROJECT_NUMBER, "projectId": "my-project" });
    assert_eq!(reply.json(), project);
    assert_eq!(
        reply.body,
        format!("{{\"numericProjectId\":{PROJECT_NUMBER},\"projectId\":\"my-project\"}}")
    );

    // .NET.
    let reply = h.get(&format!("{V1}/?recursive=true")).await;
    assert_eq!(
        reply.json(),
        serde_json::json!({ "instance": instance, "project": project })
    );
    assert_eq!(reply.route, "root");

    // The whole tree: no credential endpoint, no credential.
    let body = &reply.body;
    assert!(!body.contains("ya29") && !body.contains("jwt."), "{body}");
    assert!(
        !body.contains("token") && !body.contains("identity"),
        "{body}"
    );
    assert!(h.source.calls().is_empty(), "recursive answers never mint");
}

#[tokio::test]
async fn recursive_text_flattens_paths() {
    let h = harness();
    let reply = h
        .get(&format!(
            "{V1}/instance/service-accounts/default/?recursive=true&alt=text"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/text");
    assert_eq!(
        reply.body,
        format!(
            "aliases/0 default\nemail {APP_EMAIL}\nscopes/0 {}\nscopes/1 {}\n",
            DEFAULT_SCOPES[0], DEFAULT_SCOPES[1]
        )
    );
}

#[tokio::test]
async fn alt_json_and_text_on_leaves_and_directories() {
    let h = harness();
    let cases = [
        ("project/project-id", "my-project", "\"my-project\""),
        ("project/numeric-project-id", "123456789012", "123456789012"),
        (
            "instance/service-accounts/default/aliases",
            "default\n",
            "[\"default\"]",
        ),
        (
            "instance/service-accounts/default/email",
            APP_EMAIL,
            "\"app@my-project.iam.gserviceaccount.com\"",
        ),
    ];
    for (path, text, json) in cases {
        for uri in [format!("{V1}/{path}"), format!("{V1}/{path}?alt=text")] {
            let reply = h.get(&uri).await;
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (StatusCode::OK, text),
                "{uri}"
            );
            assert_eq!(reply.header("content-type"), "application/text");
        }
        let reply = h.get(&format!("{V1}/{path}?alt=json")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("content-type"), "application/json");
        assert_eq!(reply.body, json, "{path}");
    }
    let reply = h.get(&format!("{V1}/project/?alt=json")).await;
    assert_eq!(
        reply.json(),
        serde_json::json!(["numeric-project-id", "project-id"])
    );
    let reply = h
        .get(&format!("{V1}/project/?recursive=true&alt=json"))
        .await;
    assert_eq!(reply.json()["projectId"], "my-project");

    let reply = h.get(&format!("{V1}/project/project-id?alt=xml")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // Unknown parameters, and long-poll ones, are answered at once.
    let reply = h
        .get(&format!(
            "{V1}/project/project-id?wait_for_change=true&last_etag=x&foo=1"
        ))
        .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "my-project")
    );
}

#[tokio::test]
async fn instance_facts() {
    let h = harness();
    let get = |path: &'static str| {
        let h = &h;
        async move { h.get(&format!("{V1}/{path}")).await }
    };
    assert_eq!(
        get("instance/hostname").await.body,
        "ip-10-0-1-2.ec2.internal"
    );
    assert_eq!(
        get("instance/zone").await.body,
        format!("projects/{PROJECT_NUMBER}/zones/us-east-1a")
    );
    let id = get("instance/id").await;
    assert_eq!(id.body, instance_id(PROVIDER_ID).to_string());
    assert_eq!(id.route, "instance");
    assert_eq!(get("instance/attributes/cluster-name").await.body, "prod");
    let location = get("instance/attributes/cluster-location").await;
    assert_eq!(
        (location.body.as_str(), location.route),
        ("us-east-1", "attributes")
    );
    assert_eq!(get("project/numeric-project-id").await.body, "123456789012");
    let project = get("project/project-id").await;
    assert_eq!(
        (project.body.as_str(), project.route),
        ("my-project", "project")
    );
    assert_eq!(h.lookups(), 0, "static facts never identify the caller");

    // Without a zone label or providerID: the cluster location and the node name.
    *h.node.write() = NodeFacts::default();
    assert_eq!(
        get("instance/zone").await.body,
        format!("projects/{PROJECT_NUMBER}/zones/us-east-1")
    );
    assert_eq!(
        get("instance/id").await.body,
        instance_id("ip-10-0-1-2.ec2.internal").to_string()
    );
}

#[tokio::test]
async fn unknown_paths_get_googles_404_page() {
    let h = harness();
    for uri in [
        format!("{V1}/instance/name"),
        format!("{V1}/instance/attributes/kube-env"),
        format!("{V1}/instance/attributes/cluster-uid"),
        format!("{V1}/instance/service-accounts/default/nothing"),
        format!("{V1}/project/project-id/"),
        format!("{V1}/instance/hostname/x"),
        format!("{V1}/universe/universe-domain"),
        format!("{V1}/instance/service-accounts/default/token/"),
        format!("{V1}beta1/instance/"),
        "/0.1/meta-data/".to_string(),
        "/computeMetadata/v2/".to_string(),
        "/latest-ish".to_string(),
    ] {
        let reply = h.get(&uri).await;
        assert_not_found_page(&reply);
        assert!(reply.body.contains("<code>"), "{}", reply.body);
    }
    let reply = h.get(&format!("{V1}/instance/a\"b")).await;
    assert!(
        reply
            .body
            .contains("<code>/computeMetadata/v1/instance/a&quot;b</code>"),
        "the path is escaped: {}",
        reply.body
    );
    assert!(h.source.calls().is_empty());
}

// === service accounts and credentials ===

#[tokio::test]
async fn each_caller_gets_its_own_email_and_token() {
    let h = harness();
    let email = |from| {
        let h = &h;
        async move {
            h.get_from(
                &format!("{V1}/instance/service-accounts/default/email"),
                from,
            )
            .await
        }
    };
    let a = email(ip(1)).await;
    assert_eq!(
        (a.status, a.body.as_str(), a.route),
        (StatusCode::OK, APP_EMAIL, "email")
    );
    // Not annotated: direct access, reported under the pool's name.
    let b = email(ip(2)).await;
    assert_eq!((b.status, b.body.as_str()), (StatusCode::OK, POOL));
    let listing = h
        .get_from(&format!("{V1}/instance/service-accounts/"), ip(2))
        .await;
    assert_eq!(listing.body, format!("default/\n{POOL}/\n"));

    let token = |from| {
        let h = &h;
        async move {
            h.get_from(
                &format!("{V1}/instance/service-accounts/default/token"),
                from,
            )
            .await
        }
    };
    let ta = token(ip(1)).await;
    let tb = token(ip(2)).await;
    assert_eq!(ta.json()["access_token"], "ya29.app");
    assert_eq!(tb.json()["access_token"], "ya29.direct");

    // Each may use its own email as the account name, never the other's.
    let own = h
        .get_from(
            &format!("{V1}/instance/service-accounts/{POOL}/token"),
            ip(2),
        )
        .await;
    assert_eq!(own.status, StatusCode::OK);
    for (uri, from) in [
        (
            format!("{V1}/instance/service-accounts/{APP_EMAIL}/token"),
            ip(2),
        ),
        (
            format!("{V1}/instance/service-accounts/{POOL}/email"),
            ip(1),
        ),
        (
            format!("{V1}/instance/service-accounts/{APP_EMAIL}/email"),
            ip(2),
        ),
        (
            format!("{V1}/instance/service-accounts/other@x.iam.gserviceaccount.com/"),
            ip(1),
        ),
        (
            format!("{V1}/instance/service-accounts/{APP_EMAIL}/identity?audience=a"),
            ip(2),
        ),
    ] {
        let reply = h.get_from(&uri, from).await;
        assert_not_found_page(&reply);
    }
    assert_eq!(
        h.source.calls().len(),
        3,
        "refused accounts never reach the source"
    );
}

#[tokio::test]
async fn token_body_content_type_and_scopes() {
    let h = harness();
    let reply = h
        .get(&format!("{V1}/instance/service-accounts/default/token"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.route, "token");
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(
        reply.body,
        r#"{"access_token":"ya29.app","expires_in":3599,"token_type":"Bearer"}"#
    );
    assert_gce_headers(&reply);

    // Comma-separated and trimmed; repeats add up; other parameters tolerated.
    let reply = h
        .get(&format!(
            "{V1}/instance/service-accounts/{}/token?scopes=https://www.googleapis.com/auth/devstorage.read_only,%20b%20,,b&transport=mtls&binding-enforcement=on&bindCertificateFingerprint=abc&unknown=1&scopes=c",
            APP_EMAIL.replace('@', "%40")
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        h.source.calls(),
        vec![
            Call::Access {
                sa: "app".into(),
                scopes: vec![]
            },
            Call::Access {
                sa: "app".into(),
                scopes: vec![
                    "https://www.googleapis.com/auth/devstorage.read_only".into(),
                    "b".into(),
                    "c".into()
                ]
            },
        ]
    );
}

#[tokio::test]
async fn identity_needs_an_audience() {
    let h = harness();
    for query in ["", "?audience=", "?format=full", "?audience=%20"] {
        let reply = h
            .get(&format!(
                "{V1}/instance/service-accounts/default/identity{query}"
            ))
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(reply.body, "non-empty audience parameter required\n");
        assert_eq!(reply.route, "identity");
    }
    let reply = h
        .get(&format!(
            "{V1}/instance/service-accounts/default/identity?audience=x&format=weird"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(h.source.calls().is_empty());
    assert_eq!(
        h.lookups(),
        0,
        "bad parameters are refused before identification"
    );

    let reply = h
        .get(&format!(
            "{V1}/instance/service-accounts/default/identity?audience=https%3A%2F%2Fapi.example.com&format=full&licenses=TRUE"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "jwt.app.https://api.example.com");
    assert_eq!(reply.header("content-type"), "application/text");
    assert_eq!(reply.route, "identity");
    assert_gce_headers(&reply);
    let reply = h
        .get(&format!(
            "{V1}/instance/service-accounts/{APP_EMAIL}/identity?audience=aud"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        h.source.calls(),
        vec![
            Call::Id {
                sa: "app".into(),
                audience: "https://api.example.com".into(),
                full: true
            },
            Call::Id {
                sa: "app".into(),
                audience: "aud".into(),
                full: false
            },
        ]
    );
}

#[tokio::test]
async fn not_configured_is_a_404_naming_the_annotation() {
    let message = format!(
        "Your Kubernetes service account (team-b/direct) is not annotated with a target Google \
         service account, which is a requirement for retrieving Identity Tokens using Workload \
         Identity. Please add the {GCP_SERVICE_ACCOUNT_ANNOTATION} annotation to your \
         Kubernetes service account."
    );
    let h = harness_with(FakeSource::failing(CredentialError::NotConfigured {
        message: message.clone(),
    }));
    let reply = h
        .get_from(
            &format!("{V1}/instance/service-accounts/default/identity?audience=x&format=full"),
            ip(2),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.body, format!("{message}\n"));
    assert!(reply.body.contains(GCP_SERVICE_ACCOUNT_ANNOTATION));
    assert_eq!(reply.route, "identity");
    assert_gce_headers(&reply);
}

#[tokio::test]
async fn upstream_failures_map_to_what_sdks_retry_or_report() {
    let upstream = |status: Option<u16>, code: &str, retryable: bool| CredentialError::Upstream {
        service: "Google STS",
        status,
        code: code.into(),
        message: format!("reason for {code}"),
        retryable,
    };
    let cases = [
        (
            upstream(Some(429), "RESOURCE_EXHAUSTED", true),
            StatusCode::TOO_MANY_REQUESTS,
        ),
        (
            upstream(Some(500), "internal", true),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            upstream(Some(502), "bad_gateway", true),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            upstream(None, "connect", true),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            upstream(Some(400), "invalid_grant", false),
            StatusCode::BAD_REQUEST,
        ),
        (
            upstream(Some(403), "PERMISSION_DENIED", false),
            StatusCode::FORBIDDEN,
        ),
    ];
    for (error, status) in cases {
        let code = match &error {
            CredentialError::Upstream { code, .. } => code.clone(),
            _ => unreachable!(),
        };
        let h = harness_with(FakeSource::failing(error));
        let reply = h
            .get(&format!("{V1}/instance/service-accounts/default/token"))
            .await;
        assert_eq!(reply.status, status, "{code}");
        assert_eq!(reply.route, "token");
        let body = reply.json();
        assert_eq!(body["error"], code.as_str());
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.contains(&format!("reason for {code}")),
            "{description}"
        );
        assert!(description.contains("Google STS"), "{description}");
        assert_gce_headers(&reply);
    }

    let kube = |status| CredentialError::KubeToken {
        service_account: "team-a/app".into(),
        status,
        message: "the server is busy".into(),
    };
    for (error, status) in [
        (kube(500), StatusCode::SERVICE_UNAVAILABLE),
        (kube(403), StatusCode::FORBIDDEN),
    ] {
        let h = harness_with(FakeSource::failing(error));
        let reply = h
            .get(&format!(
                "{V1}/instance/service-accounts/default/identity?audience=a"
            ))
            .await;
        assert_eq!(reply.status, status);
        assert!(
            reply.json()["error_description"]
                .as_str()
                .unwrap()
                .contains("the server is busy")
        );
    }

    let h = harness_with(FakeSource::failing(CredentialError::InvalidAnnotation {
        message: "iam.gke.io/gcp-service-account \"nope\" is not an email".into(),
    }));
    let reply = h
        .get(&format!("{V1}/instance/service-accounts/default/token"))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.body.contains("is not an email"));

    let h = harness_with(FakeSource::failing(CredentialError::TooManyCredentials {
        namespace: "team-a".into(),
        service_account: "app".into(),
        limit: 64,
    }));
    let reply = h
        .get(&format!(
            "{V1}/instance/service-accounts/default/identity?audience=aud-65"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["error"], "too_many_credentials");
    assert!(
        reply.body.contains("team-a/app already holds 64"),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn lookup_failures_are_clear_and_transient_ones_retryable() {
    let h = harness();
    let token = format!("{V1}/instance/service-accounts/default/token");
    // Not known yet (a pod seconds old): 503, which Python retries.
    let reply = h.get_from(&token, ip(50)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.body.contains("10.0.0.50"), "{}", reply.body);
    assert_eq!(reply.route, "token");
    assert_gce_headers(&reply);

    let reply = h.get_from(&token, ip(3)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.body.contains("hostNetwork"), "{}", reply.body);

    let reply = h
        .get_from(
            &format!("{V1}/instance/service-accounts/default/email"),
            ip(4),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.body.contains("team-c/gone"), "{}", reply.body);
    assert_eq!(reply.route, "email");

    let reply = h.get_from(&format!("{V1}/?recursive=true"), ip(50)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    // What does not depend on the caller still answers an unknown pod.
    let reply = h.get_from(&format!("{V1}/instance/"), ip(50)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = h
        .get_from(&format!("{V1}/project/?recursive=true"), ip(50))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(h.source.calls().is_empty());
}

fn zone_label(h: &Harness, zone: &str) {
    h.node
        .write()
        .labels
        .insert("topology.kubernetes.io/zone".into(), zone.into());
}

#[tokio::test]
async fn values_carry_an_etag_that_changes_with_the_value() {
    let h = harness();
    let first = h.get(&format!("{V1}/instance/zone")).await;
    let etag = first.header("etag").to_owned();
    assert_eq!(etag.len(), 16, "{etag:?}");
    assert!(etag.bytes().all(|b| b.is_ascii_hexdigit()), "{etag:?}");
    assert_eq!(
        h.get(&format!("{V1}/instance/zone")).await.header("etag"),
        etag
    );
    assert_ne!(
        h.get(&format!("{V1}/project/project-id"))
            .await
            .header("etag"),
        etag
    );
    zone_label(&h, "us-east-1b");
    assert_ne!(
        h.get(&format!("{V1}/instance/zone")).await.header("etag"),
        etag
    );
    // Errors carry none: there is no value to watch.
    assert_eq!(
        h.get(&format!("{V1}/instance/nope")).await.header("etag"),
        ""
    );
}

#[tokio::test(start_paused = true)]
async fn wait_for_change_holds_until_the_value_changes() {
    let h = harness();
    let etag = h
        .get(&format!("{V1}/instance/zone"))
        .await
        .header("etag")
        .to_owned();
    let start = tokio::time::Instant::now();
    let uri = format!("{V1}/instance/zone?wait_for_change=true&last_etag={etag}");
    let (reply, ()) = tokio::join!(h.get(&uri), async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        zone_label(&h, "us-east-1c");
    });
    let waited = start.elapsed();
    assert_eq!(
        reply.body,
        format!("projects/{PROJECT_NUMBER}/zones/us-east-1c")
    );
    assert_ne!(reply.header("etag"), etag);
    assert!(
        waited >= Duration::from_millis(2500) && waited <= Duration::from_secs(4),
        "answered after {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn wait_for_change_answers_the_current_value_at_the_timeout() {
    let h = harness();
    let current = h.get(&format!("{V1}/project/project-id")).await;
    let etag = current.header("etag").to_owned();

    let start = tokio::time::Instant::now();
    let reply = h
        .get(&format!(
            "{V1}/project/project-id?wait_for_change=true&last_etag={etag}&timeout_sec=7"
        ))
        .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "my-project")
    );
    assert_eq!(reply.header("etag"), etag);
    assert_eq!(start.elapsed(), Duration::from_secs(7));

    // Without last_etag: the change from the current value, bounded by the
    // default wait.
    let start = tokio::time::Instant::now();
    h.get(&format!("{V1}/project/project-id?wait_for_change=true"))
        .await;
    assert_eq!(start.elapsed(), DEFAULT_WAIT);

    // A timeout beyond the bound is clamped to it.
    let start = tokio::time::Instant::now();
    h.get(&format!(
        "{V1}/project/project-id?wait_for_change=true&timeout_sec=100000"
    ))
    .await;
    assert_eq!(start.elapsed(), MAX_WAIT);

    // An older ETag: the current value at once.
    let start = tokio::time::Instant::now();
    let reply = h
        .get(&format!(
            "{V1}/project/project-id?wait_for_change=true&last_etag=0123456789abcdef"
        ))
        .await;
    assert_eq!(reply.body, "my-project");
    assert_eq!(start.elapsed(), Duration::ZERO);

    // Errors are never held.
    let start = tokio::time::Instant::now();
    let reply = h
        .get(&format!("{V1}/instance/nope?wait_for_change=true"))
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(start.elapsed(), Duration::ZERO);

    let reply = h
        .get(&format!(
            "{V1}/project/project-id?wait_for_change=true&timeout_sec=soon"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.contains("timeout_sec"), "{}", reply.body);
}

#[tokio::test(start_paused = true)]
async fn long_polls_are_bounded() {
    let h = Arc::new(harness());
    let etag = h
        .get(&format!("{V1}/project/project-id"))
        .await
        .header("etag")
        .to_owned();
    let uri = format!("{V1}/project/project-id?wait_for_change=true&last_etag={etag}");
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..MAX_LONG_POLLS {
        let (h, uri) = (h.clone(), uri.clone());
        held.spawn(async move { h.get(&uri).await.status });
    }
    // Let every one of them take its place.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = tokio::time::Instant::now();
    let reply = h.get(&uri).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "one too many is answered at once"
    );
    while let Some(status) = held.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
}
