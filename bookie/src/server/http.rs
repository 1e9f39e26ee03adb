//! The bookie's HTTP endpoint: `/health` (JSON; 200 while alive, read-only state in the body: a read-only bookie still serves reads) and Prometheus `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;

use crate::storage::Storage;

#[derive(Debug, Clone)]
pub(crate) struct HttpState {
    pub storage: Arc<Storage>,
    pub bookie_id: String,
    pub instance_id: String,
}

#[derive(Debug, Serialize)]
struct Health<'a> {
    status: &'static str,
    bookie_id: &'a str,
    instance_id: &'a str,
    read_only: bool,
    read_only_reason: Option<String>,
    disk_usage_ratio: f64,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(state)
}

async fn health(State(s): State<HttpState>) -> impl IntoResponse {
    let reason = s.storage.read_only_reason();
    let body = Health {
        status: if reason.is_some() { "read_only" } else { "ok" },
        bookie_id: &s.bookie_id,
        instance_id: &s.instance_id,
        read_only: reason.is_some(),
        read_only_reason: reason,
        disk_usage_ratio: s.storage.metrics().disk_usage_ratio.get(),
    };
    // A read-only bookie is alive and serves reads: report it, but keep 200 so it is not killed.
    (StatusCode::OK, axum::Json(serde_json::to_value(&body).unwrap_or_default()))
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.storage.metrics().render(),
    )
}
