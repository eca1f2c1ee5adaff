//! Process resources: `processInstance` (with `replay` and `cancel`), `processExecution` and
//! `processSummary`: "what is stuck and why" in one request.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use drover_proto::ids;
use drover_store::{AccountKind, ProcessFilter, ProcessInstance, ResourceKind, ScheduleError};
use serde_json::{Value, json};

use super::Base;
use super::render::{collection, rfc3339};
use crate::auth::{Auth, Principal};
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/processinstances", get(list))
        .route("/v1/processinstances/{id}", get(get_one).post(action))
        .route("/v1/processexecutions", get(list_executions))
        .route("/v1/processexecutions/{id}", get(get_execution))
        .route("/v1/processsummary", get(summary))
}

fn admin(principal: &Principal) -> Result<(), ApiError> {
    principal.require_privileged("only admins replay or cancel processes")
}

/// Whose processes a key may read: every project's for admins and service keys (`None`), its
/// own project's for project and user keys; agent keys none.
fn readable(principal: &Principal) -> Result<Option<i64>, ApiError> {
    if principal.is_privileged() {
        return Ok(None);
    }
    match (principal.account.kind, principal.account.default_project()) {
        (AccountKind::Project | AccountKind::User, Some(project)) => Ok(Some(project)),
        _ => Err(ApiError::forbidden(
            "processes are visible to admins and to project keys (their project's)",
        )),
    }
}

/// A process the key may read, or 404 as if it did not exist.
async fn find_readable(
    state: &AppState,
    principal: &Principal,
    text: &str,
) -> Result<ProcessInstance, ApiError> {
    let scope = readable(principal)?;
    let process = find(state, text).await?;
    match scope {
        Some(project) if process.account_id != Some(project) => {
            Err(ApiError::not_found(format!("no process instance {text:?}")))
        }
        _ => Ok(process),
    }
}

/// `running`, `delayed`, `ready` or `done`, as the Processes view groups them.
fn status(process: &ProcessInstance, now: i64) -> &'static str {
    if process.end_time.is_some() {
        "done"
    } else if process.is_running(now) {
        "running"
    } else if process.run_after.is_some_and(|after| after > now) {
        "delayed"
    } else {
        "ready"
    }
}

fn render(base: &str, process: &ProcessInstance, now: i64) -> Value {
    let id = ids::format("processInstance", process.id);
    let api_type = process.kind.api_type();
    let resource_id = ids::format(api_type, process.resource_id);
    let plural = super::schema::of_kind(process.kind).plural;
    let self_link = format!("{base}/processinstances/{id}");
    let status = status(process, now);
    let mut actions = serde_json::Map::new();
    if status != "running" && process.result.as_deref() != Some("SUCCESS") {
        actions.insert("replay".into(), json!(format!("{self_link}?action=replay")));
    }
    if status != "done" {
        actions.insert("cancel".into(), json!(format!("{self_link}?action=cancel")));
    }
    json!({
        "id": id,
        "type": "processInstance",
        "links": {
            "self": self_link,
            "resource": format!("{base}/{plural}/{resource_id}"),
            "processExecutions": format!("{base}/processexecutions?processInstanceId={id}"),
        },
        "actions": actions,
        "processName": process.process_name,
        "resourceType": api_type,
        "resourceId": resource_id,
        "accountId": process.account_id.map(|id| ids::format("project", id)),
        "state": status,
        "created": rfc3339(process.created),
        "startTime": process.start_time.map(rfc3339),
        "endTime": process.end_time.map(rfc3339),
        "runAfter": process.run_after.map(rfc3339),
        "runAfterTS": process.run_after,
        "executionCount": process.execution_count,
        "waitCount": process.wait_count,
        "exitReason": process.exit_reason,
        "result": process.result,
        "phase": process.phase,
        "lastError": process.last_error,
        "runningProcessServerId": process.running_process_server_id.as_ref().filter(|_| status == "running"),
        "startProcessServerId": process.start_process_server_id,
        "priority": process.priority,
        "data": process.data,
    })
}

/// Parses the filters and paging of `GET /v1/processinstances`.
pub(crate) fn filter(raw: Option<&str>) -> Result<ProcessFilter, ApiError> {
    let mut filter = ProcessFilter {
        limit: 100,
        ..ProcessFilter::default()
    };
    let mut resource_id = None;
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "processName" | "name" => filter.name = Some(value.into_owned()),
            "resourceType" => {
                filter.kind = Some(ResourceKind::parse(&value).ok_or_else(|| {
                    ApiError::invalid(
                        "InvalidOption",
                        "resourceType",
                        format!("no resource type {value:?}"),
                    )
                })?);
            }
            "resourceId" => resource_id = Some(value.into_owned()),
            "state" | "status" => {
                if !matches!(
                    value.as_ref(),
                    "running" | "delayed" | "ready" | "pending" | "done"
                ) {
                    return Err(ApiError::invalid(
                        "InvalidOption",
                        "state",
                        "state is one of running, delayed, ready, pending, done",
                    ));
                }
                filter.newest_first = value == "done";
                filter.status = Some(value.into_owned());
            }
            "result" => filter.result = Some(value.to_uppercase()),
            "limit" => filter.limit = super::resources::parse_limit(&value)?,
            "marker" => filter.marker = Some(super::resources::parse_marker(&value)?),
            "sort" | "order" => filter.newest_first = value == "desc" || filter.newest_first,
            _ => {}
        }
    }
    if let Some(text) = resource_id {
        let (kind, id) = resource_filter(filter.kind, &text)?;
        filter.kind = Some(kind);
        filter.resource_id = Some(id);
    }
    Ok(filter)
}

/// What a `resourceId` filter names: a typed id (`1i42`) carries its type, a bare number needs
/// `resourceType` (ids are numbered per type, so `42` alone would match a container, a host
/// and a volume alike). A typed id of another type than `resourceType` is refused.
fn resource_filter(
    kind: Option<ResourceKind>,
    text: &str,
) -> Result<(ResourceKind, i64), ApiError> {
    let numeric = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if numeric {
        let kind = kind.ok_or_else(|| {
            ApiError::invalid(
                "MissingRequired",
                "resourceType",
                format!(
                    "resourceId {text:?} is a bare number, which every resource type has: add resourceType, or use a typed id such as 1i{text}"
                ),
            )
        })?;
        let id = ids::parse(kind.api_type(), text).ok_or_else(|| {
            ApiError::invalid(
                "InvalidReference",
                "resourceId",
                format!("{text:?} is not a resource id"),
            )
        })?;
        return Ok((kind, id));
    }
    let (typed, id) = ResourceKind::ALL
        .iter()
        .find_map(|kind| ids::parse(kind.api_type(), text).map(|id| (*kind, id)))
        .ok_or_else(|| {
            ApiError::invalid(
                "InvalidReference",
                "resourceId",
                format!("{text:?} is not a resource id (a typed id such as 1i42, or a number with resourceType)"),
            )
        })?;
    match kind {
        Some(kind) if kind != typed => Err(ApiError::invalid(
            "InvalidReference",
            "resourceId",
            format!(
                "{text:?} is a {}, not a {}",
                typed.api_type(),
                kind.api_type()
            ),
        )),
        _ => Ok((typed, id)),
    }
}

async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    RawQuery(raw): RawQuery,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let scope = readable(&principal)?;
    let mut filter = filter(raw.as_deref())?;
    if scope.is_some() {
        filter.account_id = scope;
    }
    let page = state.store.list_processes(&filter).await?;
    let now = drover_proto::event::now_millis();
    let path = format!("{base}/processinstances");
    let data = page
        .data
        .iter()
        .map(|process| render(&base, process, now))
        .collect();
    let mut body = collection("processInstance", path.clone(), data);
    body["pagination"] =
        super::resources::pagination(&path, raw.as_deref(), filter.limit, page.next_marker);
    Ok(Json(body))
}

async fn find(state: &AppState, text: &str) -> Result<ProcessInstance, ApiError> {
    let not_found = || ApiError::not_found(format!("no process instance {text:?}"));
    let id = ids::parse("processInstance", text).ok_or_else(not_found)?;
    state.store.get_process(id).await?.ok_or_else(not_found)
}

async fn get_one(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let process = find_readable(&state, &principal, &id).await?;
    Ok(Json(render(
        &base,
        &process,
        drover_proto::event::now_millis(),
    )))
}

async fn action(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    base: Base,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin(&principal)?;
    let process = find(&state, &id).await?;
    let action = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "action")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    let conflict = |error: ScheduleError| match error {
        ScheduleError::NotFound => ApiError::not_found(format!("no process instance {id:?}")),
        ScheduleError::InvalidState { state } => ApiError::new(
            StatusCode::CONFLICT,
            "InvalidState",
            format!("process {id} cannot do that now: {state}"),
        ),
        ScheduleError::Busy {
            process_id,
            process_name,
        } => ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "process {} ({process_name}) holds the resource",
                ids::format("processInstance", process_id)
            ),
        ),
        ScheduleError::Store(error) => error.into(),
    };
    let updated = match action.as_str() {
        "replay" => {
            let replayed = state.store.replay(process.id).await.map_err(conflict)?;
            if let Ok(Some(resource)) = state
                .store
                .get_resource(replayed.kind, replayed.resource_id)
                .await
            {
                state.changes.changed(&resource, None);
            }
            state.engine.wake();
            replayed
        }
        "cancel" => {
            let (canceled, resource) = state.store.cancel(process.id).await.map_err(conflict)?;
            if let Some(resource) = resource {
                state
                    .changes
                    .changed(&resource, canceled.transitioning_state());
            }
            canceled
        }
        other => {
            return Err(ApiError::not_found(format!(
                "processInstance has no action {other:?}; it has replay and cancel"
            )));
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(render(&base, &updated, drover_proto::event::now_millis())),
    ))
}

fn render_execution(base: &str, row: &drover_store::ExecutionRow) -> Value {
    let id = ids::format("processExecution", row.id);
    let process = ids::format("processInstance", row.process_instance_id);
    json!({
        "id": id,
        "type": "processExecution",
        "links": {"self": format!("{base}/processexecutions/{id}"), "processInstance": format!("{base}/processinstances/{process}")},
        "actions": {},
        "processInstanceId": process,
        "created": rfc3339(row.created),
        "startTime": row.started.map(rfc3339),
        "endTime": row.ended.map(rfc3339),
        "durationMillis": row.started.zip(row.ended).map(|(start, end)| end - start),
        "exitReason": row.exit_reason,
        "message": row.message,
        "log": row.log.as_deref().and_then(|log| serde_json::from_str::<Value>(log).ok()),
    })
}

async fn list_executions(
    State(state): State<AppState>,
    Auth(principal): Auth,
    RawQuery(raw): RawQuery,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    readable(&principal)?;
    let process = form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes())
        .find(|(key, _)| key == "processInstanceId")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| {
            ApiError::invalid(
                "MissingRequired",
                "processInstanceId",
                "list executions of one process: ?processInstanceId=<id>",
            )
        })?;
    let process = find_readable(&state, &principal, &process).await?;
    let data = state
        .store
        .list_executions(process.id)
        .await?
        .iter()
        .map(|row| render_execution(&base, row))
        .collect();
    Ok(Json(collection(
        "processExecution",
        format!("{base}/processexecutions"),
        data,
    )))
}

async fn get_execution(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::not_found(format!("no process execution {id:?}"));
    let row = state
        .store
        .get_execution(ids::parse("processExecution", &id).ok_or_else(not_found)?)
        .await?
        .ok_or_else(not_found)?;
    // Readable when its process is.
    find_readable(
        &state,
        &principal,
        &ids::format("processInstance", row.process_instance_id),
    )
    .await
    .map_err(|_| not_found())?;
    Ok(Json(render_execution(&base, &row)))
}

async fn summary(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let scope = readable(&principal)?;
    let data = state
        .store
        .process_summary(scope)
        .await?
        .into_iter()
        .map(|row| {
            json!({
                "id": row.process_name,
                "type": "processSummary",
                "links": {"self": format!("{base}/processsummary"),
                          "processInstances": format!("{base}/processinstances?processName={}&state=pending", row.process_name)},
                "actions": {},
                "processName": row.process_name,
                "running": row.running,
                "ready": row.ready,
                "delay": row.delayed,
                "done": row.done,
            })
        })
        .collect();
    Ok(Json(collection(
        "processSummary",
        format!("{base}/processsummary"),
        data,
    )))
}
