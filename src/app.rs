//! Wires the parts together: pod identity, interception, listeners; then
//! readiness, drain and shutdown.

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use crate::{
    admin,
    config::RunConfig,
    credentials::{Budgeted, Credentials},
    gce::{GceApi, GceSettings},
    imds::{ImdsApi, ImdsSettings},
    intercept::{self, Interceptor},
    metrics::Metrics,
    pods::{self, PodIndex, Resolver},
    server::{self, Router, ServerLimits},
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot build a Kubernetes client (KUBECONFIG or in-cluster): {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove interception rules: {0}")]
    Intercept(#[from] intercept::InterceptError),
    #[error("{0}")]
    Config(String),
}

/// Runs the daemon until `shutdown` resolves (SIGTERM/SIGINT in the binary),
/// then removes the interception rules and drains connections.
pub async fn run(
    config: RunConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AppError> {
    let metrics = Metrics::new();
    let client = kube::Client::try_default().await?;

    // Bind first: the DNAT target must be listening before rules point at it.
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: config.listen,
            source,
        })?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| AppError::Listen {
            addr: config.admin_listen,
            source,
        })?;

    let credentials =
        Credentials::new(&config, client.clone(), metrics.clone()).map_err(AppError::Config)?;

    let index = Arc::new(PodIndex::new());
    // Pods seen by the watch are prefetched so their first request is a hit.
    // Bounded: a burst beyond it is caught by the cache's periodic sweep.
    let (new_pods, mut new_pods_rx) = tokio::sync::mpsc::channel::<pods::PodInfo>(1024);
    let watches = pods::spawn_watchers(
        client.clone(),
        &config.node_name,
        index.clone(),
        metrics.clone(),
        move |pod| {
            let _ = new_pods.try_send(pod.clone());
        },
    );
    {
        let credentials = credentials.clone();
        let service_accounts = watches.service_accounts.clone();
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(pod) = new_pods_rx.recv().await {
                match service_accounts.get(&pod.namespace, &pod.service_account) {
                    Some(sa) => credentials.prefetch(pods::Caller {
                        pod: Arc::new(pod),
                        service_account: Arc::new(sa),
                    }),
                    // A pod applied together with its new ServiceAccount can
                    // arrive first: wait for the SA off this loop.
                    None => {
                        tokio::spawn(prefetch_when_service_account_known(
                            credentials.clone(),
                            service_accounts.clone(),
                            client.clone(),
                            pod,
                        ));
                    }
                }
            }
        });
    }
    let resolver = Resolver::new(
        index,
        watches.service_accounts.clone(),
        client.clone(),
        config.node_name.clone(),
        config.pod_lookup_timeout,
        metrics.clone(),
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let (rules_tx, rules_rx) = watch::channel(config.intercept_interfaces.is_empty());
    let interceptor = (!config.intercept_interfaces.is_empty()).then(|| {
        Interceptor::new(
            &config.iptables,
            config.intercept_interfaces.clone(),
            config.intercept_target(),
        )
    });
    let rules_task = interceptor.clone().map(|interceptor| {
        tokio::spawn(intercept::keep_in_place(
            interceptor,
            config.iptables_resync,
            metrics.clone(),
            rules_tx,
            stopped(),
        ))
    });
    if interceptor.is_none() {
        tracing::info!("no --intercept-interface given: installing no interception rules");
    }

    let readiness = admin::Readiness {
        pods_synced: watches.synced.clone(),
        rules_installed: rules_rx,
    };
    {
        let readiness = readiness.clone();
        let metrics = metrics.clone();
        let taint = config
            .startup_taint
            .clone()
            .map(|key| (client.clone(), config.node_name.clone(), key));
        let stop = stopped();
        tokio::spawn(async move {
            tokio::pin!(stop);
            let mut announced = false;
            loop {
                let ready = readiness.check().is_ok();
                metrics.ready.set(ready as i64);
                if ready && !announced {
                    tracing::info!("ready: pod index synced and interception in place");
                    announced = true;
                    if let Some((client, node, key)) = taint.clone() {
                        tokio::spawn(async move {
                            crate::startup_taint::remove(client, &node, &key).await
                        });
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = &mut stop => return,
                }
            }
        });
    }

    let gce = match config.gcp.gcp_workload_identity_provider {
        Some(_) => Some(Arc::new(GceApi::new(
            GceSettings::from_config(&config).map_err(AppError::Config)?,
            Arc::new(Budgeted::new(credentials.clone(), config.cache.mint_wait)),
            resolver.clone(),
            watches.node.clone(),
        ))),
        None => None,
    };
    let cache_task = credentials.spawn_background(
        resolver.index().clone(),
        watches.service_accounts.clone(),
        stopped(),
    );
    let router = Arc::new(Router {
        gce,
        imds: match config.aws.aws_region {
            Some(_) => Some(Arc::new(ImdsApi::new(
                ImdsSettings::from_config(&config).map_err(AppError::Config)?,
                Arc::new(Budgeted::new(credentials.clone(), config.cache.mint_wait)),
                resolver.clone(),
                watches.node.clone(),
            ))),
            None => None,
        },
        resolver,
        whoami: config.debug_whoami,
    });
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        readiness,
        metrics.clone(),
        stopped(),
    ));
    tracing::info!(
        listen = %config.listen,
        admin = %config.admin_listen,
        node = %config.node_name,
        gce = router.gce.is_some(),
        imds = router.imds.is_some(),
        "metabridge started"
    );

    let server_task = tokio::spawn(server::serve(
        listener,
        router,
        ServerLimits {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout,
            connection_max_age: config.connection_max_age,
        },
        metrics.clone(),
        stopped(),
    ));

    shutdown.await;
    tracing::info!(
        keep_rules = config.keep_rules_on_exit,
        "shutting down: draining connections"
    );
    let _ = stop_tx.send(true);
    if let Some(task) = rules_task {
        let _ = task.await;
    }
    let removal = match &interceptor {
        // Fail closed through a restart: the DNAT stays and points at a
        // closed port until the next instance listens there.
        Some(_) if config.keep_rules_on_exit => {
            tracing::info!("interception rules left in place (--keep-rules-on-exit)");
            Ok(())
        }
        Some(interceptor) => interceptor.remove().await,
        None => Ok(()),
    };
    if let Ok(mut connections) = server_task.await {
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(config.shutdown_grace, drain)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the shutdown grace; closing them");
        }
    }
    let _ = admin_task.await;
    cache_task.abort();
    for task in watches.tasks {
        task.abort();
    }
    removal?;
    tracing::info!("stopped; interception rules removed");
    Ok(())
}

/// Prefetches for `pod` once its ServiceAccount is known: from the watch if it
/// shows up within a couple of seconds, else from the API server directly.
async fn prefetch_when_service_account_known(
    credentials: Credentials,
    service_accounts: pods::ServiceAccounts,
    client: kube::Client,
    pod: pods::PodInfo,
) {
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(sa) = service_accounts.get(&pod.namespace, &pod.service_account) {
            return credentials.prefetch(pods::Caller {
                pod: Arc::new(pod),
                service_account: Arc::new(sa),
            });
        }
    }
    let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(client, &pod.namespace);
    match api.get_opt(&pod.service_account).await {
        Ok(Some(sa)) => {
            if let Some(sa) = pods::ServiceAccountInfo::from_service_account(&sa) {
                credentials.prefetch(pods::Caller {
                    pod: Arc::new(pod),
                    service_account: Arc::new(sa),
                });
            }
        }
        Ok(None) => tracing::debug!(pod = %pod.key(), "no service account to prefetch for"),
        Err(error) => {
            tracing::debug!(pod = %pod.key(), %error, "prefetch skipped: service account lookup failed")
        }
    }
}
