//! The broker's HTTP endpoint: `/health`, Prometheus `/metrics`, and the admin API under
//! `/admin/v1` (JSON). Every broker answers for the whole cluster: cluster-wide requests read the
//! metadata store, and requests about one topic are forwarded to the topic's owner (looked up,
//! and assigned if nobody owns it). Errors are JSON `{"error": "..."}` with a fitting status.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use magnetar_common::wire::InitialPosition;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::service::admin::ResetTarget;
use crate::service::ownership::{Bundle, BundleRange, Phase};
use crate::service::policies::NamespacePolicies;
use crate::service::{BrokerService, ServiceError};

/// Marks a request one broker forwarded to another, so it is never forwarded twice.
const FORWARDED: &str = "x-magnetar-forwarded";
/// How long a forwarded request may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct AppState {
    service: Arc<BrokerService>,
    http: reqwest::Client,
}

pub(crate) fn router(service: Arc<BrokerService>) -> Router {
    let http = reqwest::Client::builder().timeout(FORWARD_TIMEOUT).build().unwrap_or_default();
    let state = AppState { service, http };
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/v1/brokers", get(brokers))
        .route("/admin/v1/bookies", get(bookies))
        .route("/admin/v1/tenants", get(tenants))
        .route("/admin/v1/tenants/{tenant}", put(create_tenant).delete(delete_tenant))
        .route("/admin/v1/namespaces/{tenant}", get(namespaces))
        .route(
            "/admin/v1/namespaces/{tenant}/{namespace}",
            get(namespace).put(create_namespace).delete(delete_namespace),
        )
        .route("/admin/v1/namespaces/{tenant}/{namespace}/policies", put(set_policies))
        .route("/admin/v1/namespaces/{tenant}/{namespace}/bundles", get(bundles))
        .route("/admin/v1/topics/{tenant}/{namespace}", get(topics))
        .route("/admin/v1/topics/{tenant}/{namespace}/{topic}", put(create_topic).delete(delete_topic))
        .route("/admin/v1/topics/{tenant}/{namespace}/{topic}/lookup", get(lookup))
        .route("/admin/v1/topics/{tenant}/{namespace}/{topic}/stats", get(topic_stats))
        .route("/admin/v1/topics/{tenant}/{namespace}/{topic}/unload", post(unload_topic))
        .route("/admin/v1/topics/{tenant}/{namespace}/{topic}/retention", post(apply_retention))
        .route("/admin/v1/topics/{tenant}/{namespace}/{topic}/offload", get(offload_status).post(offload))
        .route("/admin/v1/topics/{tenant}/{namespace}/{topic}/subscriptions", get(subscriptions))
        .route(
            "/admin/v1/topics/{tenant}/{namespace}/{topic}/subscriptions/{subscription}",
            put(create_subscription).delete(delete_subscription),
        )
        .route("/admin/v1/topics/{tenant}/{namespace}/{topic}/subscriptions/{subscription}/reset", post(reset))
        .route("/admin/v1/topics/{tenant}/{namespace}/{topic}/subscriptions/{subscription}/skip_all", post(skip_all))
        .fallback(not_found)
        .with_state(state)
}

/// An admin error: a status and a JSON message.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let status = match &e {
            ServiceError::InvalidTopic(_) | ServiceError::BadRequest(_) | ServiceError::MessageTooLarge { .. } => {
                StatusCode::BAD_REQUEST
            }
            ServiceError::TopicNotFound(_) | ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
            ServiceError::AlreadyExists(_)
            | ServiceError::Conflict(_)
            | ServiceError::ConsumerBusy(_)
            | ServiceError::ProducerBusy(_) => StatusCode::CONFLICT,
            ServiceError::Unavailable(_)
            | ServiceError::Closed(_)
            | ServiceError::NotOwner { .. }
            | ServiceError::ShuttingDown
            | ServiceError::Persistence(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok<T: Serialize>(v: T) -> ApiResult {
    Ok(axum::Json(v).into_response())
}

fn no_content() -> ApiResult {
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no such endpoint: {}", uri.path()))
}

/// The body as JSON of `T`; an empty body is `T::default()`.
fn json_body<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("request body: {e}")))
}

async fn health(State(s): State<AppState>) -> Response {
    let svc = &s.service;
    let phase = svc.ownership().phase();
    let (status, phase_name) = match phase {
        Phase::Serving { .. } => (StatusCode::OK, "serving"),
        Phase::Suspended => (StatusCode::SERVICE_UNAVAILABLE, "suspended: the lease cannot be renewed"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
        "phase": phase_name,
        "broker": svc.ownership().broker_url(),
        "topics": svc.loaded_topics().len(),
        "bundles": svc.ownership().owned_bundles().len(),
        "writable_bookies": svc.ledgers().registry().live().iter().filter(|b| !b.read_only).count(),
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.service.render_metrics())
}

// ---- cluster ----

async fn brokers(State(s): State<AppState>) -> ApiResult {
    let svc = &s.service;
    let owners = svc.ownership().bundle_owners("").await?;
    let list: Vec<_> = svc
        .ownership()
        .brokers()
        .await?
        .into_iter()
        .map(|b| {
            let bundles = owners.iter().filter(|(_, o)| o.broker_id == b.broker_id).count();
            json!({
                "broker_id": b.broker_id,
                "broker_url": b.broker_url,
                "http_url": b.http_url,
                "bundles": bundles,
                "started_at_ms": b.started_at_ms,
            })
        })
        .collect();
    ok(list)
}

async fn bookies(State(s): State<AppState>) -> ApiResult {
    let list: Vec<_> = s
        .service
        .ledgers()
        .registry()
        .live()
        .into_iter()
        .map(|b| json!({ "bookie_id": b.bookie_id, "address": b.address, "read_only": b.read_only }))
        .collect();
    ok(list)
}

async fn tenants(State(s): State<AppState>) -> ApiResult {
    ok(s.service.policies().tenants().await?)
}

async fn create_tenant(State(s): State<AppState>, Path(tenant): Path<String>) -> ApiResult {
    s.service.policies().create_tenant(&tenant).await?;
    no_content()
}

async fn delete_tenant(State(s): State<AppState>, Path(tenant): Path<String>) -> ApiResult {
    s.service.policies().delete_tenant(&tenant).await?;
    no_content()
}

async fn namespaces(State(s): State<AppState>, Path(tenant): Path<String>) -> ApiResult {
    if !s.service.policies().tenant_exists(&tenant).await? {
        return Err(ServiceError::NotFound(format!("tenant {tenant}")).into());
    }
    ok(s.service.policies().namespaces(&tenant).await?)
}

async fn namespace(State(s): State<AppState>, Path((tenant, ns)): Path<(String, String)>) -> ApiResult {
    let (p, _) = s.service.policies().namespace(&tenant, &ns).await?;
    let config = s.service.config();
    ok(json!({
        "namespace": format!("{tenant}/{ns}"),
        "policies": p,
        "effective": {
            "bundles": p.bundles(config),
            "quorums": p.quorums(config),
        },
    }))
}

async fn create_namespace(
    State(s): State<AppState>,
    Path((tenant, ns)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let policies: NamespacePolicies = json_body(&body)?;
    s.service.policies().create_namespace(&tenant, &ns, &policies, s.service.config()).await?;
    no_content()
}

async fn set_policies(State(s): State<AppState>, Path((tenant, ns)): Path<(String, String)>, body: Bytes) -> ApiResult {
    let policies: NamespacePolicies = json_body(&body)?;
    let (old, version) = s.service.policies().namespace(&tenant, &ns).await?;
    let has_topics = !s.service.list_topics(&tenant, &ns).await?.is_empty();
    if has_topics && old.bundles(s.service.config()) != policies.bundles(s.service.config()) {
        return Err(ServiceError::Conflict(format!(
            "namespace {tenant}/{ns} has topics: its number of bundles cannot change"
        ))
        .into());
    }
    s.service.policies().set_policies(&tenant, &ns, &policies, version, s.service.config()).await?;
    no_content()
}

async fn delete_namespace(State(s): State<AppState>, Path((tenant, ns)): Path<(String, String)>) -> ApiResult {
    let topics = s.service.list_topics(&tenant, &ns).await?;
    if !topics.is_empty() {
        return Err(ServiceError::Conflict(format!(
            "namespace {tenant}/{ns} still has {} topics; delete them first",
            topics.len()
        ))
        .into());
    }
    s.service.policies().delete_namespace(&tenant, &ns).await?;
    no_content()
}

async fn bundles(State(s): State<AppState>, Path((tenant, ns)): Path<(String, String)>) -> ApiResult {
    let (p, _) = s.service.policies().namespace(&tenant, &ns).await?;
    let n = p.bundles(s.service.config());
    let owners = s.service.ownership().bundle_owners(&format!("{tenant}/{ns}/")).await?;
    let list: Vec<_> = (0..n)
        .map(|i| {
            let range = BundleRange::nth(i, n);
            let key = Bundle { tenant: tenant.clone(), namespace: ns.clone(), range }.to_string();
            let owner = owners.iter().find(|(k, _)| *k == key).map(|(_, o)| o.broker_url.clone());
            json!({ "bundle": range.to_string(), "owner": owner })
        })
        .collect();
    ok(list)
}

async fn topics(State(s): State<AppState>, Path((tenant, ns)): Path<(String, String)>) -> ApiResult {
    ok(s.service.list_topics(&tenant, &ns).await?)
}

// ---- one topic: answered by its owner ----

#[derive(Debug, Deserialize)]
struct TopicPath {
    tenant: String,
    namespace: String,
    topic: String,
}

impl TopicPath {
    fn name(&self) -> String {
        format!("persistent://{}/{}/{}", self.tenant, self.namespace, self.topic)
    }
}

#[derive(Debug, Deserialize)]
struct SubPath {
    tenant: String,
    namespace: String,
    topic: String,
    subscription: String,
}

impl SubPath {
    fn name(&self) -> String {
        format!("persistent://{}/{}/{}", self.tenant, self.namespace, self.topic)
    }
}

/// Forwards the request to the topic's owner unless this broker owns it. `Ok(None)`: answer here.
async fn forward_to_owner(
    s: &AppState,
    topic: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Option<Response>, ApiError> {
    let (_, owner) = s.service.lookup(topic).await?;
    if owner.broker_id == s.service.ownership().broker_id() {
        return Ok(None);
    }
    if headers.contains_key(FORWARDED) {
        return Err(ServiceError::Unavailable(format!(
            "ownership of {topic} is moving ({} owns it now); retry",
            owner.broker_url
        ))
        .into());
    }
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let url = format!("{}{path}", owner.http_url);
    let reply = s
        .http
        .request(method.clone(), &url)
        .header(FORWARDED, HeaderValue::from_static("1"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| ServiceError::Unavailable(format!("forward to {}, the owner of {topic}: {e}", owner.http_url)))?;
    let status = reply.status();
    let bytes = reply
        .bytes()
        .await
        .map_err(|e| ServiceError::Unavailable(format!("read the answer of {}: {e}", owner.http_url)))?;
    Ok(Some((status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()))
}

/// Runs `local` on the owner of `topic`: here, or by forwarding the request.
macro_rules! on_owner {
    ($s:expr, $topic:expr, $method:expr, $uri:expr, $headers:expr, $body:expr, $local:expr) => {{
        if let Some(r) = forward_to_owner(&$s, &$topic, &$method, &$uri, &$headers, $body).await? {
            return Ok(r);
        }
        $local
    }};
}

#[derive(Debug, Deserialize, Default)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

async fn lookup(State(s): State<AppState>, Path(p): Path<TopicPath>) -> ApiResult {
    let (topic, owner) = s.service.lookup(&p.name()).await?;
    ok(json!({ "topic": topic.to_string(), "broker_url": owner.broker_url, "http_url": owner.http_url }))
}

async fn create_topic(
    State(s): State<AppState>,
    Path(p): Path<TopicPath>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, {
        let name = s.service.create_topic(&topic).await?;
        Ok((StatusCode::CREATED, axum::Json(json!({ "topic": name.to_string() }))).into_response())
    })
}

async fn delete_topic(
    State(s): State<AppState>,
    Path(p): Path<TopicPath>,
    Query(q): Query<ForceQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, {
        s.service.delete_topic(&topic, q.force).await?;
        no_content()
    })
}

async fn topic_stats(
    State(s): State<AppState>,
    Path(p): Path<TopicPath>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, ok(s.service.topic_stats(&topic).await?))
}

async fn unload_topic(
    State(s): State<AppState>,
    Path(p): Path<TopicPath>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, {
        let name =
            magnetar_common::topic::TopicName::parse(&topic).map_err(|e| ServiceError::InvalidTopic(e.to_string()))?;
        let unloaded = s.service.unload(&name).await;
        ok(json!({ "topic": name.to_string(), "unloaded": unloaded }))
    })
}

async fn apply_retention(
    State(s): State<AppState>,
    Path(p): Path<TopicPath>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, {
        let t = s.service.apply_retention(&topic).await?;
        ok(json!({ "deleted_ledgers": t.ledgers, "deleted_bytes": t.bytes, "deleting_ledgers": t.deleting }))
    })
}

async fn offload(
    State(s): State<AppState>,
    Path(p): Path<TopicPath>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, ok(s.service.offload(&topic).await?))
}

async fn offload_status(
    State(s): State<AppState>,
    Path(p): Path<TopicPath>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, ok(s.service.offload_status(&topic).await?))
}

async fn subscriptions(
    State(s): State<AppState>,
    Path(p): Path<TopicPath>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, ok(s.service.list_subscriptions(&topic).await?))
}

#[derive(Debug, Deserialize)]
struct PositionQuery {
    position: Option<String>,
}

async fn create_subscription(
    State(s): State<AppState>,
    Path(p): Path<SubPath>,
    Query(q): Query<PositionQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    let position: InitialPosition = match q.position.as_deref() {
        None => InitialPosition::Latest,
        Some(v) => v.parse().map_err(bad_request)?,
    };
    on_owner!(s, topic, method, uri, headers, body, {
        s.service.create_subscription(&topic, &p.subscription, position).await?;
        Ok(StatusCode::CREATED.into_response())
    })
}

async fn delete_subscription(
    State(s): State<AppState>,
    Path(p): Path<SubPath>,
    Query(q): Query<ForceQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, {
        s.service.delete_subscription(&topic, &p.subscription, q.force).await?;
        no_content()
    })
}

#[derive(Debug, Deserialize)]
struct ResetQuery {
    to: Option<String>,
}

async fn reset(
    State(s): State<AppState>,
    Path(p): Path<SubPath>,
    Query(q): Query<ResetQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    let Some(to) = q.to.as_deref() else {
        return Err(bad_request("reset needs ?to=earliest, ?to=latest or ?to=LEDGER:ENTRY"));
    };
    let target: ResetTarget = to.parse().map_err(bad_request)?;
    on_owner!(s, topic, method, uri, headers, body, {
        s.service.reset_subscription(&topic, &p.subscription, target).await?;
        no_content()
    })
}

async fn skip_all(
    State(s): State<AppState>,
    Path(p): Path<SubPath>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let topic = p.name();
    on_owner!(s, topic, method, uri, headers, body, {
        s.service.reset_subscription(&topic, &p.subscription, ResetTarget::Latest).await?;
        no_content()
    })
}
