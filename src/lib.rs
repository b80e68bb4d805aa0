//! metabridge: a per-node metadata server that lets every pod reach the other
//! cloud with unmodified SDKs — a GCE metadata server on EKS, an AWS IMDS on
//! GKE — minting each pod's credentials from its own Kubernetes service
//! account.
//!
//! The path of one request, top to bottom:
//!
//! - [`intercept`]: iptables DNAT of pod traffic to 169.254.169.254:80;
//! - [`server`]: the hardened listener, routing by path to an API;
//! - [`pods`]: who is calling (source IP → pod → ServiceAccount);
//! - [`gce`] / [`imds`]: the cloud's wire protocol;
//! - [`credentials`]: the cache, and minting on a miss;
//! - [`metrics`], [`admin`]: what operators see.
//!
//! [`app`] wires them together; [`config`] is the one typed configuration.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod credentials;
pub mod gce;
pub mod imds;
pub mod intercept;
pub mod metrics;
pub mod pods;
pub mod server;
pub mod startup_taint;
pub mod telemetry;
