//! The HTTP API: one file per resource, each exposing its routes; [`router`] merges them.
//! Routes are written under `/v1`; [`version`] serves the same routes at `/v2-beta`.

mod accounts;
mod apikeys;
mod clusternodes;
mod events;
mod idempotency;
pub mod openapi;
pub(crate) mod processes;
mod publish;
mod register;
mod render;
pub mod resources;
mod root;
pub mod schema;
mod schemas;
mod settings;
pub(crate) mod text;
mod ui;
pub mod version;

use std::time::Duration;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

use crate::error::ApiError;
use crate::state::AppState;

pub use version::{ApiVersion, Base};

/// The whole HTTP surface of the server: the API at `/v1` and `/v2-beta` ([`version::map`]
/// routes the second as the first, before routing), the web UI, `/healthz`, `/metrics`.
pub fn router(state: AppState) -> Router {
    let routes = routes(state);
    Router::new().fallback_service(tower::util::MapRequest::new(
        routes,
        version::map as fn(Request) -> Request,
    ))
}

fn routes(state: AppState) -> Router {
    let (max_body, body_timeout) = {
        let tunables = state.settings.server();
        (tunables.max_body_bytes, tunables.http_body_timeout)
    };
    Router::new()
        .route("/v1", get(root::root))
        .route("/v1/", get(root::root))
        .route("/v1/subscribe", get(crate::ws::subscribe))
        .route(
            "/v1/projects/{project}/subscribe",
            get(crate::ws::subscribe_project),
        )
        .route("/v1/logs", get(crate::logs::socket))
        .route("/v1/logs/", get(crate::logs::socket))
        .merge(publish::routes())
        .merge(apikeys::routes())
        .merge(accounts::routes())
        .merge(processes::routes())
        .merge(events::routes())
        .merge(register::routes())
        .merge(schemas::routes())
        .merge(openapi::routes())
        .merge(settings::routes())
        .merge(clusternodes::routes())
        .merge(resources::routes())
        .merge(ui::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::middleware::from_fn(schemas_header))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            text::reject_nul_in_url,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            utf8_path,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        // A body that sends nothing for this long is answered 408 (and its connection closed).
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(60),
        ))
        .layer(axum::middleware::from_fn(close_after_timeout))
        .layer(CatchPanicLayer::custom(|_panic| {
            ApiError::internal("a request handler panicked").into_response()
        }))
        // Outermost: times the whole answer, by the route that matched.
        .layer(crate::metrics::HttpMetricsLayer::new(
            state.metrics.http.clone(),
        ))
        .with_state(state)
}

/// A request that timed out (408) leaves its connection in an unknown state (a body half
/// read): the connection is closed after the answer.
async fn close_after_timeout(
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut response = next.run(request).await;
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Refuses a path whose percent escapes are not UTF-8 with our error body, before any handler's
/// `Path` extractor would answer its own plain-text 400 (found by fuzzing).
async fn utf8_path(
    State(state): State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if percent_encoding::percent_decode_str(request.uri().path())
        .decode_utf8()
        .is_err()
    {
        state.metrics.bad_input.increment(1);
        return ApiError::bad_request("the path's percent escapes are not UTF-8").into_response();
    }
    next.run(request).await
}

/// Adds `X-API-Schemas` to every API response, as GDAPI clients expect: the schemas under
/// the version path the request used.
async fn schemas_header(
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let api = request.uri().path().starts_with("/v1");
    let schemas = api.then(|| {
        let base = Base::new(request.headers(), ApiVersion::of(request.extensions()));
        format!("{base}/schemas")
    });
    let mut response = next.run(request).await;
    if let Some(value) = schemas.and_then(|text| axum::http::HeaderValue::from_str(&text).ok()) {
        response.headers_mut().insert("x-api-schemas", value);
    }
    response
}

/// `200 {"status":"ok", "cluster":{…}}` when the store answers (and, in a cluster, NATS is
/// connected and the node's lease holds); `503` with what is wrong otherwise. A node that
/// lost NATS keeps serving its own API and sockets; a load balancer should send clients
/// elsewhere.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let store = match state.store.count_rows("setting").await {
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(%error, "health check: store unreachable");
            Some(format!("store unreachable: {error}"))
        }
    };
    let (cluster_ok, cluster) = state.cluster.health();
    let healthy = store.is_none() && cluster_ok;
    let body = serde_json::json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "store": store.unwrap_or_else(|| "ok".to_owned()),
        "cluster": cluster,
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let mut body = state.metrics.render();
    crate::metrics::render_processes(&mut body, state.engine.stats());
    match state.metrics.store_gauges(&state.store).await {
        Ok(gauges) => crate::metrics::render_store_gauges(
            &mut body,
            &gauges,
            drover_proto::event::now_millis(),
        ),
        Err(error) => tracing::warn!(%error, "metrics: reading the store's gauges failed"),
    }
    state.metrics.http.render(&mut body);
    let writer = state.store.writer_stats();
    for (name, help, value) in [
        (
            "drover_store_writer_batches_total",
            "Transactions the store's writer committed (group commits).",
            writer.batches.load(Relaxed),
        ),
        (
            "drover_store_writer_jobs_total",
            "Writes (creates, schedules, claims, finishes, progress, renewals) answered by those transactions.",
            writer.jobs.load(Relaxed),
        ),
        (
            "drover_store_writer_split_total",
            "Batches that failed and were run again one job at a time.",
            writer.split.load(Relaxed),
        ),
        (
            "drover_store_writer_failed_total",
            "Writes answered with a database error.",
            writer.failed.load(Relaxed),
        ),
    ] {
        let _ = write!(
            body,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        );
    }
    let cluster = &state.cluster.stats;
    for (name, kind, help, value) in [
        (
            "drover_cluster_peers",
            "gauge",
            "Live nodes of this node's cluster, itself included, at its last heartbeat.",
            cluster.peers.load(Relaxed).max(0) as u64,
        ),
        (
            "drover_external_handlers_active",
            "gauge",
            "Active external handlers this node's engine calls (its registry, updated at once on this node and by a hint on the others).",
            state.external.len() as u64,
        ),
        (
            "drover_cluster_leader",
            "gauge",
            "1 while this node holds the leader duty (clean-up, ping monitor, event worker).",
            u64::from(state.cluster.is_leader()),
        ),
        (
            "drover_cluster_nats_connected",
            "gauge",
            "1 while this node is connected to NATS (always 0 for a server alone).",
            u64::from(cluster.nats_connected.load(Relaxed)),
        ),
        (
            "drover_cluster_epoch",
            "gauge",
            "The epoch of this node's current membership.",
            state.cluster.epoch().max(0) as u64,
        ),
        (
            "drover_engine_fenced_total",
            "counter",
            "Attempts whose finish changed nothing: the process was canceled, or taken over by another node or a later attempt.",
            state.engine.fenced(),
        ),
        (
            "drover_cluster_takeovers_total",
            "counter",
            "Dead nodes whose processes, sessions and duties this node released.",
            cluster.takeovers.load(Relaxed),
        ),
        (
            "drover_cluster_rejoins_total",
            "counter",
            "Times this node found its lease gone (paused, cut off) and joined again.",
            cluster.rejoins.load(Relaxed),
        ),
        (
            "drover_cluster_remote_published_total",
            "counter",
            "Events this node handed to NATS for the other nodes.",
            cluster.published.load(Relaxed),
        ),
        (
            "drover_cluster_remote_received_total",
            "counter",
            "Events from other nodes delivered to this node's subscribers and calls.",
            cluster.received.load(Relaxed),
        ),
        (
            "drover_cluster_remote_dropped_total",
            "counter",
            "Events not handed to NATS because the outgoing queue was full.",
            cluster.dropped.load(Relaxed),
        ),
    ] {
        let _ = write!(
            body,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

async fn not_found(State(state): State<AppState>, request: Request) -> axum::response::Response {
    state.metrics.bad_input.increment(1);
    if let Some(page) = ui::unknown_page(&request) {
        return page;
    }
    ApiError::not_found(format!(
        "no such resource: {} {}",
        request.method(),
        ApiVersion::of(request.extensions()).shown(request.uri().path())
    ))
    .into_response()
}

/// A known path asked with a method it does not have (axum's own answer has no body); the
/// `Allow` header is kept.
async fn method_not_allowed(State(state): State<AppState>, request: Request) -> ApiError {
    state.metrics.bad_input.increment(1);
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            ApiVersion::of(request.extensions()).shown(request.uri().path())
        ),
    )
}

/// Parses a project id from a URL and checks the project exists.
pub async fn project_id(state: &AppState, text: &str) -> Result<i64, ApiError> {
    let id = drover_proto::ids::parse("project", text)
        .ok_or_else(|| ApiError::not_found(format!("no project {text:?}")))?;
    match state.store.get_account(id).await? {
        Some(account)
            if account.kind == drover_store::AccountKind::Project && account.state != "removed" =>
        {
            Ok(id)
        }
        _ => Err(ApiError::not_found(format!("no project {text:?}"))),
    }
}

/// A raw body whose read failures answer with our error shape: 408 when the client stopped
/// sending it (`api.http.body.timeout.millis`), 413 over `api.max.body.bytes`, else 400.
#[derive(Debug)]
pub struct ApiBytes(pub axum::body::Bytes);

impl FromRequest<AppState> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(request, state)
            .await
            .map(ApiBytes)
            .map_err(|rejection: BytesRejection| {
                state.metrics.bad_input.increment(1);
                if body_timed_out(&rejection) {
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "RequestTimeout",
                        "request body timed out",
                    )
                    .with_detail(format!(
                        "no part of the body arrived for {} ms (api.http.body.timeout.millis)",
                        state.settings.server().http_body_timeout.as_millis()
                    ))
                } else if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "MaxLimitExceeded",
                        "request body is too large",
                    )
                    .with_detail(format!(
                        "the limit is {} bytes (api.max.body.bytes)",
                        state.settings.server().max_body_bytes
                    ))
                } else {
                    ApiError::bad_request(rejection.body_text())
                }
            })
    }
}

/// A JSON body that answers malformed input with our error shape: 400 for text that is not
/// JSON, 422 for JSON of the wrong shape, 413 for a body over `api.max.body.bytes`.
/// The content type is not checked: the original's clients do not all send one.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let ApiBytes(bytes) = ApiBytes::from_request(request, state).await?;
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
            axum::body::Bytes::from_static(b"{}")
        } else {
            bytes
        };
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            state.metrics.bad_input.increment(1);
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                    Ok(_) => ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "InvalidFormat",
                        "request body must be a JSON object",
                    ),
                    Err(error) => {
                        ApiError::bad_request(format!("request body is not valid JSON: {error}"))
                    }
                },
            );
        }
        text::check_json(state, &bytes)?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|error| {
                state.metrics.bad_input.increment(1);
                match error.classify() {
                    serde_json::error::Category::Data => ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "InvalidFormat",
                        format!("request body has an invalid field: {error}"),
                    ),
                    _ => ApiError::bad_request(format!("request body is not valid JSON: {error}")),
                }
            })
    }
}

/// Whether reading a body failed because the client stopped sending it
/// ([`RequestBodyTimeoutLayer`]).
fn body_timed_out(rejection: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = error.source();
    }
    false
}
