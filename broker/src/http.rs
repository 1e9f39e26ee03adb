//! The broker's HTTP endpoint: `/health` and Prometheus `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::service::BrokerService;

pub(crate) fn router(service: Arc<BrokerService>) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(service)
}

async fn health(State(s): State<Arc<BrokerService>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok", "topics": s.loaded_topics().len() }))
}

async fn metrics(State(s): State<Arc<BrokerService>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.render_metrics())
}
