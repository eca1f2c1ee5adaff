//! `containerEvent` and `serviceEvent`: what agents report about the containers on their
//! hosts; and `/v1/cleanup`, the `table.cleanup` job's status and its `run` action.
//!
//! Only an agent key may post an event, only for one of its own hosts, and only while fewer
//! than `container.event.max.size` events wait on that host (else 409
//! `TooManyContainerEvents`, as the original). The event worker (`container_events.rs`)
//! then reconciles the instance.

use std::collections::HashMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use drover_proto::ids;
use drover_store::{
    AccountKind, EventFilter, EventKind, EventRecord, Filter, FilterOp, FilterValue, HostLookup,
    NewContainerEvent, NewServiceEvent, PostEventError,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::render::{collection, rfc3339};
use super::resources::{pagination, parse_limit, parse_marker};
use super::{ApiJson, Base};
use crate::auth::{Auth, Principal};
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/containerevents",
            get(list_container).post(post_container),
        )
        .route("/v1/containerevents/{id}", get(get_container))
        .route(
            "/v1/projects/{project}/containerevents",
            get(list_container).post(post_container),
        )
        .route(
            "/v1/projects/{project}/containerevents/{id}",
            get(get_container),
        )
        .route("/v1/serviceevents", get(list_service).post(post_service))
        .route("/v1/serviceevents/{id}", get(get_service))
        .route(
            "/v1/projects/{project}/serviceevents",
            get(list_service).post(post_service),
        )
        .route(
            "/v1/projects/{project}/serviceevents/{id}",
            get(get_service),
        )
        .route("/v1/cleanup", get(cleanup_status).post(cleanup_action))
}

type Params = Path<HashMap<String, String>>;

const MAX_TEXT: usize = 255;

fn api_type(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Container => "containerEvent",
        EventKind::Service => "serviceEvent",
    }
}

fn plural(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Container => "containerevents",
        EventKind::Service => "serviceevents",
    }
}

/// An event as the API shows it.
pub fn render(base: &str, event: &EventRecord) -> Value {
    let kind = api_type(event.kind);
    let id = ids::format(kind, event.id);
    let mut links = Map::new();
    links.insert(
        "self".into(),
        json!(format!("{base}/{}/{id}", plural(event.kind))),
    );
    if let Some(host) = event.host_id {
        links.insert(
            "host".into(),
            json!(format!("{base}/hosts/{}", ids::format("host", host))),
        );
    }
    let mut out = json!({
        "id": id,
        "type": kind,
        "kind": kind,
        "links": links,
        "actions": {},
        "state": event.state,
        "created": rfc3339(event.created),
        "createdTS": event.created,
        "accountId": event.account_id.map(|id| ids::format("project", id)),
        "hostId": event.host_id.map(|id| ids::format("host", id)),
        "externalTimestamp": event.external_timestamp,
        "data": event.data,
    });
    match event.kind {
        EventKind::Container => {
            out["externalId"] = json!(event.external_id);
            out["externalStatus"] = json!(event.external_status);
            out["externalFrom"] = json!(event.external_from);
            out["reportedHostUuid"] = json!(event.reported_host_uuid);
            out["dockerInspect"] = event
                .data
                .get("dockerInspect")
                .cloned()
                .unwrap_or(Value::Null);
            if let Some(instance) = event.data.pointer("/result/instanceId") {
                out["instanceId"] = instance.clone();
            }
        }
        EventKind::Service => {
            out["instanceId"] = json!(event.instance_id.map(|id| ids::format("container", id)));
            out["healthcheckUuid"] = json!(event.healthcheck_uuid);
            out["reportedHealth"] = json!(event.reported_health);
            out["description"] = json!(event.description);
        }
    }
    out
}

/// What a container event post carries (the original agents' fields; others are ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerEventBody {
    external_id: Option<String>,
    external_status: Option<String>,
    external_from: Option<String>,
    external_timestamp: Option<i64>,
    reported_host_uuid: Option<String>,
    host_id: Option<String>,
    docker_inspect: Option<Value>,
    data: Option<Map<String, Value>>,
}

/// What a service event (health report) post carries.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceEventBody {
    instance_id: Option<String>,
    healthcheck_uuid: Option<String>,
    reported_health: Option<String>,
    external_timestamp: Option<i64>,
    reported_host_uuid: Option<String>,
    host_id: Option<String>,
    description: Option<String>,
    data: Option<Map<String, Value>>,
}

fn required_text(state: &AppState, field: &str, value: Option<String>) -> Result<String, ApiError> {
    optional_text(state, field, value)?.ok_or_else(|| {
        state.metrics.bad_input.increment(1);
        ApiError::invalid("MissingRequired", field, format!("{field} is required"))
    })
}

fn optional_text(
    state: &AppState,
    field: &str,
    value: Option<String>,
) -> Result<Option<String>, ApiError> {
    match value {
        Some(text) if text.trim().is_empty() => Ok(None),
        Some(text) if text.len() > MAX_TEXT => {
            state.metrics.bad_input.increment(1);
            Err(ApiError::invalid(
                "MaxLengthExceeded",
                field,
                format!("{field} is longer than {MAX_TEXT} bytes"),
            ))
        }
        other => Ok(other),
    }
}

/// The host of a report: one of the calling agent's hosts, or a clear refusal.
async fn reporting_host(
    state: &AppState,
    principal: &Principal,
    host_id: Option<String>,
    uuid: Option<String>,
) -> Result<(i64, Option<i64>), ApiError> {
    let agent_id = match (principal.account.kind, principal.account.agent_id) {
        (AccountKind::Agent, Some(agent_id)) => agent_id,
        _ => {
            state.metrics.events_refused.increment(1);
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "CantVerifyAgent",
                "only an agent key may post events about its host",
            ));
        }
    };
    let host = match host_id.as_deref() {
        Some(text) => Some(ids::parse("host", text).ok_or_else(|| {
            state.metrics.bad_input.increment(1);
            ApiError::invalid(
                "InvalidReference",
                "hostId",
                format!("{text:?} is not a host id"),
            )
        })?),
        None => None,
    };
    match state
        .store
        .host_for_report(agent_id, host, uuid.as_deref())
        .await?
    {
        HostLookup::Found {
            host_id,
            account_id,
        } => Ok((host_id, account_id)),
        HostLookup::NotYours { host_id } => {
            state.metrics.events_refused.increment(1);
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "CantVerifyHost",
                format!(
                    "host {} is not a host of agent {}",
                    ids::format("host", host_id),
                    ids::format("agent", agent_id)
                ),
            ))
        }
        HostLookup::Unknown => {
            state.metrics.bad_input.increment(1);
            Err(ApiError::invalid(
                "InvalidReference",
                "reportedHostUuid",
                match (host_id, uuid) {
                    (None, None) => format!(
                        "agent {} has no host; name one with reportedHostUuid or hostId",
                        ids::format("agent", agent_id)
                    ),
                    _ => "no host with that reportedHostUuid or hostId".to_owned(),
                },
            ))
        }
    }
}

fn too_many(state: &AppState, error: PostEventError, host_id: i64) -> ApiError {
    match error {
        PostEventError::TooMany { pending, limit } => {
            state.metrics.events_refused.increment(1);
            ApiError::new(
                StatusCode::CONFLICT,
                "TooManyContainerEvents",
                format!(
                    "host {} has {pending} events waiting to be handled; the limit is {limit} (container.event.max.size): retry later",
                    ids::format("host", host_id)
                ),
            )
        }
        PostEventError::Store(error) => error.into(),
    }
}

async fn check_scope(
    state: &AppState,
    principal: &Principal,
    params: &HashMap<String, String>,
) -> Result<Option<i64>, ApiError> {
    if let Some(text) = params.get("project") {
        let project = super::project_id(state, text).await?;
        principal.check_project(project)?;
        Ok(Some(project))
    } else {
        Ok(None)
    }
}

async fn post_container(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    base: Base,
    ApiJson(body): ApiJson<ContainerEventBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_scope(&state, &principal, &params).await?;
    let external_id = required_text(&state, "externalId", body.external_id)?;
    let external_status = required_text(&state, "externalStatus", body.external_status)?;
    let external_from = optional_text(&state, "externalFrom", body.external_from)?;
    let uuid = optional_text(&state, "reportedHostUuid", body.reported_host_uuid)?;
    let (host_id, account_id) =
        reporting_host(&state, &principal, body.host_id, uuid.clone()).await?;
    let mut data = body.data.unwrap_or_default();
    if let Some(inspect) = body.docker_inspect {
        data.insert("dockerInspect".into(), inspect);
    }
    let new = NewContainerEvent {
        account_id,
        host_id,
        external_id,
        external_status,
        external_from,
        external_timestamp: body.external_timestamp,
        reported_host_uuid: uuid,
        data,
    };
    let limit = state.settings.server().container_event_max;
    let event = state
        .store
        .post_container_event(&new, limit)
        .await
        .map_err(|error| too_many(&state, error, host_id))?;
    state.events.wake();
    Ok((StatusCode::CREATED, Json(render(&base, &event))))
}

async fn post_service(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    base: Base,
    ApiJson(body): ApiJson<ServiceEventBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_scope(&state, &principal, &params).await?;
    let reported_health = required_text(&state, "reportedHealth", body.reported_health)?;
    let healthcheck_uuid = optional_text(&state, "healthcheckUuid", body.healthcheck_uuid)?;
    let description = optional_text(&state, "description", body.description)?;
    let uuid = optional_text(&state, "reportedHostUuid", body.reported_host_uuid)?;
    let instance_id = match body.instance_id.as_deref() {
        Some(text) => Some(ids::parse("container", text).ok_or_else(|| {
            state.metrics.bad_input.increment(1);
            ApiError::invalid(
                "InvalidReference",
                "instanceId",
                format!("{text:?} is not a container id"),
            )
        })?),
        None => None,
    };
    let (host_id, account_id) = reporting_host(&state, &principal, body.host_id, uuid).await?;
    if let Some(instance) = instance_id
        && state
            .store
            .instance_on_host(host_id, Some(instance), "")
            .await?
            .is_none()
    {
        state.metrics.events_refused.increment(1);
        return Err(ApiError::invalid(
            "InvalidReference",
            "instanceId",
            format!(
                "no container {} on host {}",
                ids::format("container", instance),
                ids::format("host", host_id)
            ),
        ));
    }
    let new = NewServiceEvent {
        account_id,
        host_id,
        instance_id,
        healthcheck_uuid,
        reported_health,
        external_timestamp: body.external_timestamp,
        description,
        data: body.data.unwrap_or_default(),
    };
    let limit = state.settings.server().container_event_max;
    let event = state
        .store
        .post_service_event(&new, limit)
        .await
        .map_err(|error| too_many(&state, error, host_id))?;
    state.events.wake();
    Ok((StatusCode::CREATED, Json(render(&base, &event))))
}

/// Who sees which events: admins all (or one project's through a project URL), everyone
/// else their project's.
fn visible_account(principal: &Principal, scoped: Option<i64>) -> Result<Option<i64>, ApiError> {
    if scoped.is_some() {
        return Ok(scoped);
    }
    if principal.is_privileged() {
        return Ok(None);
    }
    principal
        .account
        .default_project()
        .map(Some)
        .ok_or_else(|| ApiError::forbidden("this key belongs to no project"))
}

async fn list_events(
    kind: EventKind,
    state: AppState,
    principal: std::sync::Arc<Principal>,
    params: HashMap<String, String>,
    raw: Option<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let scoped = check_scope(&state, &principal, &params).await?;
    let mut filter = EventFilter {
        account_id: visible_account(&principal, scoped)?,
        limit: 100,
        ..EventFilter::default()
    };
    let invalid = |state: &AppState, field: &str, message: String| {
        state.metrics.bad_input.increment(1);
        ApiError::invalid("InvalidOption", field, message)
    };
    for (key, value) in form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes()) {
        let value = value.into_owned();
        let (column, parsed) = match (kind, key.as_ref()) {
            (_, "limit") => {
                filter.limit = parse_limit(&value)?;
                continue;
            }
            (_, "marker") => {
                filter.marker = Some(parse_marker(&value)?);
                continue;
            }
            (_, "state") => ("state", FilterValue::Text(value)),
            (_, "hostId") => (
                "host_id",
                FilterValue::Int(ids::parse("host", &value).ok_or_else(|| {
                    invalid(&state, "hostId", format!("{value:?} is not a host id"))
                })?),
            ),
            (EventKind::Container, "externalId") => ("external_id", FilterValue::Text(value)),
            (EventKind::Container, "externalStatus") => {
                ("external_status", FilterValue::Text(value))
            }
            (EventKind::Container, "reportedHostUuid") => {
                ("reported_host_uuid", FilterValue::Text(value))
            }
            (EventKind::Service, "instanceId") => (
                "instance_id",
                FilterValue::Int(ids::parse("container", &value).ok_or_else(|| {
                    invalid(
                        &state,
                        "instanceId",
                        format!("{value:?} is not a container id"),
                    )
                })?),
            ),
            (EventKind::Service, "healthcheckUuid") => {
                ("healthcheck_uuid", FilterValue::Text(value))
            }
            (EventKind::Service, "reportedHealth") => ("reported_health", FilterValue::Text(value)),
            (_, other) => {
                return Err(invalid(
                    &state,
                    other,
                    format!("{other:?} is not a filter of {}", api_type(kind)),
                ));
            }
        };
        filter.filters.push(Filter {
            column,
            op: FilterOp::Eq,
            value: parsed,
        });
    }
    let page = state.store.list_events(kind, &filter).await?;
    let path = match params.get("project") {
        Some(project) => format!("{base}/projects/{project}/{}", plural(kind)),
        None => format!("{base}/{}", plural(kind)),
    };
    let data = page.data.iter().map(|event| render(&base, event)).collect();
    let mut body = collection(api_type(kind), path.clone(), data);
    body["pagination"] = pagination(&path, raw.as_deref(), filter.limit, page.next_marker);
    Ok(Json(body))
}

async fn get_event(
    kind: EventKind,
    state: AppState,
    principal: std::sync::Arc<Principal>,
    params: HashMap<String, String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let scoped = check_scope(&state, &principal, &params).await?;
    let text = params.get("id").map(String::as_str).unwrap_or("");
    let not_found = || ApiError::not_found(format!("no {} {text:?}", api_type(kind)));
    let id = ids::parse(api_type(kind), text).ok_or_else(not_found)?;
    let event = state
        .store
        .get_event(kind, id)
        .await?
        .ok_or_else(not_found)?;
    if let Some(account) = visible_account(&principal, scoped)?
        && event.account_id != Some(account)
    {
        return Err(not_found());
    }
    Ok(Json(render(&base, &event)))
}

async fn list_container(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    RawQuery(raw): RawQuery,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    list_events(EventKind::Container, state, principal, params, raw, base).await
}

async fn list_service(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    RawQuery(raw): RawQuery,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    list_events(EventKind::Service, state, principal, params, raw, base).await
}

async fn get_container(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    get_event(EventKind::Container, state, principal, params, base).await
}

async fn get_service(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    get_event(EventKind::Service, state, principal, params, base).await
}

fn admin(principal: &Principal) -> Result<(), ApiError> {
    principal.require_privileged("the clean-up job is for admins")
}

fn cleanup_json(base: &str, state: &AppState) -> Value {
    let settings: Map<String, Value> = [
        "task.table.cleanup.schedule",
        "cleanup.query_limit.rows",
        "events.purge.after.seconds",
        "process_instance.purge.after.seconds",
        "main_tables.purge.after.seconds",
    ]
    .iter()
    .map(|name| ((*name).to_owned(), json!(state.settings.int(name))))
    .collect();
    json!({
        "id": "table.cleanup",
        "type": "cleanup",
        "links": {"self": format!("{base}/cleanup")},
        "actions": {"run": format!("{base}/cleanup?action=run")},
        "nextRun": state.cleanup.next_run().map(rfc3339),
        "lastRun": state.cleanup.last().map(|report| crate::cleanup::render(base, &report)),
        "settings": settings,
    })
}

async fn cleanup_status(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    admin(&principal)?;
    Ok(Json(cleanup_json(&base, &state)))
}

/// `POST /v1/cleanup?action=run`: runs the job now and answers with its report.
async fn cleanup_action(
    State(state): State<AppState>,
    Auth(principal): Auth,
    RawQuery(raw): RawQuery,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    admin(&principal)?;
    let action = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "action")
        .map(|(_, value)| value.into_owned());
    match action.as_deref() {
        Some("run") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "InvalidAction",
                "action",
                format!("cleanup has no action {other:?}; it has run"),
            ));
        }
        None => {
            return Err(ApiError::invalid(
                "MissingRequired",
                "action",
                "POST /v1/cleanup?action=run runs the job now",
            ));
        }
    }
    let report = state.cleanup.run_now(&state, "api").await;
    Ok(Json(crate::cleanup::render(&base, &report)))
}
