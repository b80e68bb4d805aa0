//! The Google and AWS calls against a tiny canned HTTP server (shapes from
//! exchange.md §2 and §3).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

use super::{
    CredentialError,
    aws::{AwsSettings, StsClient, is_expired_token},
    google::{GoogleClient, GoogleSettings},
};
use crate::{
    config::{AwsTokenSource, GcpConfig, GcpProviderType},
    metrics::Metrics,
};

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: String,
}

type Handler = dyn Fn(&Seen) -> (u16, &'static str, String) + Send + Sync;

/// Serves `handler` on 127.0.0.1:0; returns the base URL and what it saw.
async fn serve(handler: Arc<Handler>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    let log = log.clone();
                    async move {
                        let method = req.method().to_string();
                        let path = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let seen = Seen {
                            method,
                            path,
                            headers,
                            body: String::from_utf8_lossy(&body).into_owned(),
                        };
                        let (status, content_type, body) = handler(&seen);
                        log.lock().push(seen);
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", content_type)
                                .header("x-amzn-RequestId", "req-1")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

fn form(body: &str) -> HashMap<String, String> {
    form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}

const PROVIDER: &str =
    "projects/123456/locations/global/workloadIdentityPools/my-pool/providers/eks-dev";

fn google(base: &str) -> GoogleClient {
    let settings = GoogleSettings::from_config(&GcpConfig {
        gcp_workload_identity_provider: Some(PROVIDER.into()),
        gcp_project_id: None,
        gcp_project_number: None,
        gcp_cluster_issuer: None,
        gcp_token_audience: None,
        gcp_provider_type: GcpProviderType::Oidc,
        gcp_sts_url: base.into(),
        gcp_iamcredentials_url: base.into(),
    })
    .unwrap()
    .unwrap();
    GoogleClient::new(settings, Metrics::new()).unwrap()
}

#[tokio::test]
async fn google_sts_and_iam_credentials_on_the_wire() {
    let (base, seen) = serve(Arc::new(|req: &Seen| match req.path.as_str() {
        "/v1/token" => (
            200,
            "application/json",
            r#"{"access_token":"fed-tok","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":3600}"#.into(),
        ),
        p if p.ends_with(":generateAccessToken") => (
            200,
            "application/json",
            r#"{"accessToken":"ya29.gsa","expireTime":"2030-01-01T01:00:00Z"}"#.into(),
        ),
        p if p.ends_with(":generateIdToken") => (
            200,
            "application/json",
            // {"exp":1893459600} = 2030-01-01T01:00:00Z
            r#"{"token":"eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjE4OTM0NTk2MDB9.sig"}"#.into(),
        ),
        _ => (404, "text/plain", "no".into()),
    }))
    .await;
    let g = google(&base);
    let scopes = vec!["https://www.googleapis.com/auth/cloud-platform".to_string()];
    let sts = g
        .sts_exchange("ksa.jwt", super::google::TOKEN_TYPE_JWT, &scopes)
        .await
        .unwrap();
    assert_eq!(sts.access_token, "fed-tok");
    let at = g
        .generate_access_token(
            &sts.access_token,
            "app@proj.iam.gserviceaccount.com",
            &scopes,
        )
        .await
        .unwrap();
    assert_eq!(at.access_token, "ya29.gsa");
    assert_eq!(
        at.expires_at,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_459_600)
    );
    let id = g
        .generate_id_token(
            &sts.access_token,
            "app@proj.iam.gserviceaccount.com",
            "https://aud",
            true,
        )
        .await
        .unwrap();
    assert_eq!(
        id.expires_at,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_459_600)
    );

    let seen = seen.lock().clone();
    let sts_req = &seen[0];
    assert_eq!(sts_req.method, "POST");
    assert!(
        !sts_req.headers.contains_key("authorization"),
        "STS gets no Authorization header"
    );
    assert_eq!(
        sts_req.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    let f = form(&sts_req.body);
    assert_eq!(
        f["grant_type"],
        "urn:ietf:params:oauth:grant-type:token-exchange"
    );
    assert_eq!(f["audience"], format!("//iam.googleapis.com/{PROVIDER}"));
    assert_eq!(
        f["requested_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(
        f["subject_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    assert_eq!(f["subject_token"], "ksa.jwt");
    assert_eq!(f["scope"], "https://www.googleapis.com/auth/cloud-platform");

    let gat = &seen[1];
    assert_eq!(
        gat.path,
        "/v1/projects/-/serviceAccounts/app@proj.iam.gserviceaccount.com:generateAccessToken"
    );
    assert_eq!(gat.headers["authorization"], "Bearer fed-tok");
    let body: serde_json::Value = serde_json::from_str(&gat.body).unwrap();
    assert_eq!(body["scope"], serde_json::json!(scopes));
    assert_eq!(body["lifetime"], "3600s");

    let gid = &seen[2];
    assert_eq!(gid.headers["authorization"], "Bearer fed-tok");
    let body: serde_json::Value = serde_json::from_str(&gid.body).unwrap();
    assert_eq!(body["audience"], "https://aud");
    assert_eq!(body["includeEmail"], true);
}

#[tokio::test]
async fn google_errors_keep_upstream_reasons() {
    let (base, _seen) = serve(Arc::new(|req: &Seen| match req.path.as_str() {
        "/v1/token" => (
            400,
            "application/json",
            r#"{"error":"invalid_target","error_description":"The target service indicated by the \"audience\" parameters is invalid."}"#.into(),
        ),
        _ => (
            403,
            "application/json",
            r#"{"error":{"code":403,"message":"Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).","status":"PERMISSION_DENIED"}}"#.into(),
        ),
    }))
    .await;
    let g = google(&base);
    match g.sts_exchange("t", "x", &[]).await.unwrap_err() {
        CredentialError::Upstream {
            service,
            status,
            code,
            message,
            retryable,
        } => {
            assert_eq!(
                (service, status, code.as_str()),
                ("Google STS", Some(400), "invalid_target")
            );
            assert!(message.starts_with("The target service"));
            assert!(!retryable);
        }
        other => panic!("{other:?}"),
    }
    match g
        .generate_access_token("t", "a@b.iam.gserviceaccount.com", &[])
        .await
        .unwrap_err()
    {
        CredentialError::Upstream {
            service,
            code,
            retryable,
            ..
        } => {
            assert_eq!(
                (service, code.as_str()),
                ("IAM Credentials", "PERMISSION_DENIED")
            );
            assert!(!retryable);
        }
        other => panic!("{other:?}"),
    }
    // Nothing listening: a retryable network error.
    let dead = google("http://127.0.0.1:9");
    assert!(
        dead.sts_exchange("t", "x", &[])
            .await
            .unwrap_err()
            .is_retryable()
    );
}

fn sts(base: &str) -> StsClient {
    let settings = AwsSettings {
        region: Some("eu-west-1".into()),
        sts_url: Some(base.into()),
        token_source: AwsTokenSource::Kubernetes,
        token_audience: "sts.amazonaws.com".into(),
        google_audience: "sts.amazonaws.com".into(),
        session_duration: Duration::from_secs(3600),
    };
    StsClient::new(&settings, Metrics::new())
}

const ROLE: &str = "arn:aws:iam::123456789012:role/app";

fn sts_error(code: &str, message: &str) -> String {
    format!(
        r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>r</RequestId></ErrorResponse>"#
    )
}

#[tokio::test]
async fn aws_sts_assume_role_with_web_identity_on_the_wire() {
    let (base, seen) = serve(Arc::new(|req: &Seen| {
        let f = form(&req.body);
        match f.get("WebIdentityToken").map(String::as_str) {
            Some("good") => (200, "text/xml", format!(
                r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
 <AssumeRoleWithWebIdentityResult>
  <Credentials><AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>sec/ret</SecretAccessKey>
   <SessionToken>sess+tok</SessionToken><Expiration>2030-01-01T01:00:00Z</Expiration></Credentials>
  <SubjectFromWebIdentityToken>system:serviceaccount:ns:sa</SubjectFromWebIdentityToken>
  <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/app/{}</Arn>
   <AssumedRoleId>AROAEXAMPLE:{}</AssumedRoleId></AssumedRoleUser>
  <PackedPolicySize>6</PackedPolicySize>
 </AssumeRoleWithWebIdentityResult>
 <ResponseMetadata><RequestId>uuid</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#,
                f["RoleSessionName"], f["RoleSessionName"]
            )),
            Some("denied") => (403, "text/xml", sts_error("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")),
            Some("throttled") => (400, "text/xml", sts_error("Throttling", "Rate exceeded")),
            Some("expired") => (400, "text/xml", sts_error("ExpiredTokenException", "Token expired")),
            Some("jwks") => (400, "text/xml", sts_error("InvalidIdentityToken", "Couldn't retrieve verification key from your identity provider")),
            _ => (500, "text/xml", sts_error("InternalFailure", "boom")),
        }
    }))
    .await;
    let client = sts(&base);
    let session = client
        .assume_role(ROLE, "ns.pod-1", "good", Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(session.access_key_id, "ASIAEXAMPLE");
    assert_eq!(session.secret_access_key, "sec/ret");
    assert_eq!(session.session_token, "sess+tok");
    assert_eq!(session.account_id, "123456789012");
    assert_eq!(
        session.assumed_role_arn,
        "arn:aws:sts::123456789012:assumed-role/app/ns.pod-1"
    );
    assert_eq!(
        session.expiration,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_459_600)
    );
    let body: serde_json::Value = serde_json::from_slice(&session.imds_body).unwrap();
    assert_eq!(body["Expiration"], "2030-01-01T01:00:00Z");
    assert_eq!(body["Token"], "sess+tok");
    let ext: serde_json::Value = serde_json::from_slice(&session.imds_extended_body).unwrap();
    assert_eq!(ext["AccountId"], "123456789012");

    let req = seen.lock()[0].clone();
    assert_eq!(req.method, "POST");
    assert!(!req.headers.contains_key("authorization"), "unsigned");
    let f = form(&req.body);
    assert_eq!(f["Action"], "AssumeRoleWithWebIdentity");
    assert_eq!(f["Version"], "2011-06-15");
    assert_eq!(f["RoleArn"], ROLE);
    assert_eq!(f["RoleSessionName"], "ns.pod-1");
    assert_eq!(f["DurationSeconds"], "3600");

    let expect = |token: &'static str| {
        let client = client.clone();
        async move {
            client
                .assume_role(ROLE, "ns.pod-1", token, Duration::from_secs(3600))
                .await
                .unwrap_err()
        }
    };
    match expect("denied").await {
        CredentialError::Upstream {
            service,
            status,
            code,
            message,
            retryable,
        } => {
            assert_eq!(
                (service, status, code.as_str()),
                ("AWS STS", Some(403), "AccessDenied")
            );
            assert_eq!(
                message,
                "Not authorized to perform sts:AssumeRoleWithWebIdentity"
            );
            assert!(!retryable);
        }
        other => panic!("{other:?}"),
    }
    assert!(expect("throttled").await.is_retryable());
    assert!(expect("jwks").await.is_retryable());
    assert!(expect("boom").await.is_retryable());
    let expired = expect("expired").await;
    assert!(is_expired_token(&expired) && !expired.is_retryable());
    assert_eq!(seen.lock().len(), 6, "no SDK retries: one request per call");
}

// === the whole flows through Upstream: fake API server + Google + AWS ===

mod flows {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use clap::Parser;

    use super::*;
    use crate::{
        config::{Cli, Command, RunConfig},
        credentials::{Mint, Upstream},
        pods::{Caller, PodInfo, ServiceAccountInfo},
    };

    fn run_config(base: &str, extra: &[&str]) -> RunConfig {
        let mut argv = vec![
            "metabridge",
            "run",
            "--node-name",
            "n1",
            "--gcp-workload-identity-provider",
            PROVIDER,
            "--gcp-sts-url",
            base,
            "--gcp-iamcredentials-url",
            base,
            "--aws-region",
            "eu-west-1",
            "--aws-sts-url",
            base,
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(cfg) => *cfg,
            _ => unreachable!(),
        }
    }

    fn caller(annotations: &[(&str, &str)]) -> Caller {
        Caller {
            pod: Arc::new(PodInfo {
                namespace: "ns".into(),
                name: "web-1".into(),
                uid: "pod-uid-1".into(),
                service_account: "sa".into(),
                ips: vec!["10.0.0.9".parse().unwrap()],
            }),
            service_account: Arc::new(ServiceAccountInfo {
                namespace: "ns".into(),
                name: "sa".into(),
                uid: "sa-uid".into(),
                annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
        }
    }

    const ASSUMED: &str = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIAFLOW</AccessKeyId><SecretAccessKey>flowsecret</SecretAccessKey><SessionToken>flowsession</SessionToken><Expiration>2030-01-01T01:00:00Z</Expiration></Credentials><AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/app/ns.web-1</Arn><AssumedRoleId>AROA:ns.web-1</AssumedRoleId></AssumedRoleUser></AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>u</RequestId></ResponseMetadata></AssumeRoleWithWebIdentityResponse>"#;

    /// One server playing the API server, Google STS, IAM Credentials and
    /// AWS STS. The first `expire_first` AWS calls answer ExpiredTokenException.
    async fn world(expire_first: usize) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let kube_n = Arc::new(AtomicUsize::new(0));
        let aws_n = Arc::new(AtomicUsize::new(0));
        serve(Arc::new(move |req: &Seen| {
            if req
                .path
                .starts_with("/api/v1/namespaces/ns/serviceaccounts/sa/token")
            {
                let n = kube_n.fetch_add(1, Ordering::SeqCst) + 1;
                let mut v: serde_json::Value = serde_json::from_str(&req.body).unwrap();
                let aud = v["spec"]["audiences"][0].as_str().unwrap().to_string();
                v["status"] = serde_json::json!({
                    "token": format!("ksa{n}|{aud}"),
                    "expirationTimestamp": "2030-01-01T01:00:00Z"
                });
                (201, "application/json", v.to_string())
            } else if req.path == "/v1/token" {
                (
                    200,
                    "application/json",
                    r#"{"access_token":"fed","token_type":"Bearer","expires_in":3600}"#.into(),
                )
            } else if req.path.ends_with(":generateAccessToken") {
                (
                    200,
                    "application/json",
                    r#"{"accessToken":"gsa-token","expireTime":"2030-01-01T01:00:00Z"}"#.into(),
                )
            } else if req.path.ends_with(":generateIdToken") {
                (
                    200,
                    "application/json",
                    r#"{"token":"eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjE4OTM0NTk2MDB9.google"}"#.into(),
                )
            } else if form(&req.body).get("Action").map(String::as_str)
                == Some("AssumeRoleWithWebIdentity")
            {
                if aws_n.fetch_add(1, Ordering::SeqCst) < expire_first {
                    (
                        400,
                        "text/xml",
                        sts_error("ExpiredTokenException", "Token expired"),
                    )
                } else {
                    (200, "text/xml", ASSUMED.into())
                }
            } else {
                (
                    404,
                    "text/plain",
                    format!("unexpected {} {}", req.method, req.path),
                )
            }
        }))
        .await
    }

    async fn upstream(base: &str, extra: &[&str]) -> Upstream {
        let config = run_config(base, extra);
        let client = ::kube::Client::try_from(::kube::Config::new(base.parse().unwrap())).unwrap();
        Upstream::new(&config, client, Metrics::new()).unwrap()
    }

    #[tokio::test]
    async fn oidc_direct_and_impersonated() {
        let (base, seen) = world(0).await;
        let up = upstream(&base, &[]).await;
        let scopes = vec!["https://www.googleapis.com/auth/devstorage.read_only".to_string()];

        let direct = up.google_access(&caller(&[]), None, &scopes).await.unwrap();
        assert_eq!(direct.access_token, "fed");
        let log = seen.lock().clone();
        let kube = &log[0];
        let tr: serde_json::Value = serde_json::from_str(&kube.body).unwrap();
        let aud = format!("//iam.googleapis.com/{PROVIDER}");
        assert_eq!(tr["spec"]["audiences"], serde_json::json!([aud]));
        assert_eq!(tr["spec"]["boundObjectRef"]["uid"], "pod-uid-1");
        let f = form(&log[1].body);
        assert_eq!(f["subject_token"], format!("ksa1|{aud}"));
        assert_eq!(
            f["scope"], scopes[0],
            "direct access asks STS for the pod's scopes"
        );

        let gsa = "app@proj.iam.gserviceaccount.com";
        let t = up
            .google_access(&caller(&[]), Some(gsa), &scopes)
            .await
            .unwrap();
        assert_eq!(t.access_token, "gsa-token");
        let id = up
            .google_id(&caller(&[]), gsa, "https://svc", true)
            .await
            .unwrap();
        assert!(id.token.ends_with(b".google"));
        let log = seen.lock().clone();
        assert_eq!(
            form(&log[3].body)["scope"],
            "https://www.googleapis.com/auth/cloud-platform"
        );
        let body: serde_json::Value = serde_json::from_str(&log[4].body).unwrap();
        assert_eq!(body["scope"], serde_json::json!(scopes));
    }

    #[tokio::test]
    async fn aws_provider_type_presents_a_signed_get_caller_identity() {
        let (base, seen) = world(0).await;
        let up = upstream(&base, &["--gcp-provider-type", "aws"]).await;
        let c = caller(&[("eks.amazonaws.com/role-arn", ROLE)]);
        let t = up.google_access(&c, None, &[]).await.unwrap();
        assert_eq!(t.access_token, "fed");
        let log = seen.lock().clone();
        // kube token for AWS, AssumeRoleWithWebIdentity, then Google STS.
        let tr: serde_json::Value = serde_json::from_str(&log[0].body).unwrap();
        assert_eq!(
            tr["spec"]["audiences"],
            serde_json::json!(["sts.amazonaws.com"])
        );
        assert_eq!(
            form(&log[1].body)["WebIdentityToken"],
            "ksa1|sts.amazonaws.com"
        );
        let f = form(&log[2].body);
        assert_eq!(
            f["subject_token_type"],
            "urn:ietf:params:aws:token-type:aws4_request"
        );
        let json = percent_encoding::percent_decode_str(&f["subject_token"])
            .decode_utf8()
            .unwrap()
            .into_owned();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        // The signed URL is the real regional endpoint even with --aws-sts-url.
        assert_eq!(
            v["url"],
            "https://sts.eu-west-1.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
        );
        let headers = v["headers"].as_array().unwrap();
        let get = |k: &str| {
            headers
                .iter()
                .find(|h| h["key"] == k)
                .map(|h| h["value"].as_str().unwrap().to_string())
        };
        assert_eq!(get("x-amz-security-token").as_deref(), Some("flowsession"));
        assert_eq!(
            get("x-goog-cloud-target-resource"),
            Some(format!("//iam.googleapis.com/{PROVIDER}"))
        );
        assert!(
            get("Authorization")
                .unwrap()
                .starts_with("AWS4-HMAC-SHA256 Credential=ASIAFLOW/")
        );
    }

    #[tokio::test]
    async fn aws_sessions_from_kubernetes_and_google_tokens() {
        let (base, seen) = world(1).await;
        let up = upstream(&base, &[]).await;
        // Expired on the first try: one fresh kube token and a retry.
        let s = up
            .aws_session(&caller(&[]), ROLE, AwsTokenSource::Kubernetes)
            .await
            .unwrap();
        assert_eq!(s.access_key_id, "ASIAFLOW");
        assert_eq!(
            s.assumed_role_arn,
            "arn:aws:sts::123456789012:assumed-role/app/ns.web-1"
        );
        let log = seen.lock().clone();
        assert_eq!(log.len(), 4, "kube, sts (expired), kube, sts");
        assert_eq!(
            form(&log[3].body)["WebIdentityToken"],
            "ksa2|sts.amazonaws.com"
        );
        assert_eq!(form(&log[3].body)["RoleSessionName"], "ns.web-1");

        let c = caller(&[(
            "iam.gke.io/gcp-service-account",
            "app@proj.iam.gserviceaccount.com",
        )]);
        up.aws_session(&c, ROLE, AwsTokenSource::Google)
            .await
            .unwrap();
        let log = seen.lock().clone();
        let id_req: serde_json::Value = serde_json::from_str(&log[6].body).unwrap();
        assert_eq!(id_req["audience"], "sts.amazonaws.com");
        assert!(form(&log[7].body)["WebIdentityToken"].ends_with(".google"));
    }
}
