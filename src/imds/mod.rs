//! The AWS EC2 instance metadata API (`/latest/…`).
//! Placeholder until the IMDS API lands: every path answers 404.

use std::net::IpAddr;

use crate::server::{Answer, plain};

pub struct ImdsApi;

impl ImdsApi {
    pub async fn handle(&self, _parts: &http::request::Parts, _peer: IpAddr) -> Answer {
        Answer::new(
            "not_found",
            plain(http::StatusCode::NOT_FOUND, "Not Found\n"),
        )
    }
}
