//! The GCE metadata API (`/computeMetadata/v1/…`).
//! Placeholder until the GCE API lands: every path answers 404.

use std::net::IpAddr;

use crate::server::{Answer, plain};

pub struct GceApi;

impl GceApi {
    pub async fn handle(&self, _parts: &http::request::Parts, _peer: IpAddr) -> Answer {
        Answer::new(
            "not_found",
            plain(http::StatusCode::NOT_FOUND, "Not Found\n"),
        )
    }
}
