//! The engine-driven resources (containers, volumes, hosts, agents, stacks, services): list,
//! get, create, update, remove and actions, each scheduling a process.

use std::collections::HashMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use drover_engine::defs::{self, UPDATING};
use drover_proto::ids;
use drover_store::{
    Filter, FilterOp, FilterValue, ListQuery, NewCreate, NewProcess, NewResource, Resource,
    ResourceKind, ScheduleError,
};
use serde_json::{Map, Value, json};

use super::schema::{self, TypeSchema};
use super::{ApiJson, Base};
use crate::auth::{Auth, Principal};
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/{collection}", get(list).post(create))
        .route(
            "/v1/{collection}/{id}",
            get(get_one).put(update).delete(remove).post(action),
        )
        .route(
            "/v1/projects/{project}/{collection}",
            get(list).post(create),
        )
        .route(
            "/v1/projects/{project}/{collection}/{id}",
            get(get_one).put(update).delete(remove).post(action),
        )
}

type Params = Path<HashMap<String, String>>;

fn schema_of(params: &HashMap<String, String>) -> Result<&'static TypeSchema, ApiError> {
    let collection = params.get("collection").map(String::as_str).unwrap_or("");
    schema::by_plural(collection)
        .ok_or_else(|| ApiError::not_found(format!("no collection {collection:?}")))
}

/// The project a request acts in: the URL's, else the caller's default.
pub(crate) async fn scope(
    state: &AppState,
    principal: &Principal,
    params: &HashMap<String, String>,
) -> Result<i64, ApiError> {
    match params.get("project") {
        Some(text) => {
            let project = super::project_id(state, text).await?;
            principal.check_project(project)?;
            Ok(project)
        }
        None => principal
            .account
            .default_project()
            .or_else(|| {
                principal
                    .is_privileged()
                    .then_some(state.default_project.id)
            })
            .ok_or_else(|| ApiError::forbidden("this key belongs to no project")),
    }
}

/// `limit`: 1 to 1000.
pub(crate) fn parse_limit(value: &str) -> Result<i64, ApiError> {
    value
        .parse()
        .ok()
        .filter(|limit| (1..=1000).contains(limit))
        .ok_or_else(|| {
            ApiError::invalid(
                "InvalidOption",
                "limit",
                "limit must be a number from 1 to 1000",
            )
        })
}

/// `marker`: one this server gave out in `pagination.next` (`m<id>`).
pub(crate) fn parse_marker(value: &str) -> Result<i64, ApiError> {
    value.trim_start_matches('m').parse().map_err(|_| {
        ApiError::invalid(
            "InvalidOption",
            "marker",
            "marker is not one this server gave out",
        )
    })
}

/// A resource as the API renders it: fields, `type`, `links`, and the actions valid now.
pub fn render(base: &str, resource: &Resource) -> Value {
    let schema = schema::of_kind(resource.kind);
    let mut out = drover_engine::render::resource_json(resource);
    let id = ids::format(resource.kind.api_type(), resource.id);
    let self_link = format!("{base}/{}/{id}", schema.plural);
    let mut actions = Map::new();
    for action in defs::actions_for(resource.kind, &resource.state) {
        actions.insert(action.into(), json!(format!("{self_link}?action={action}")));
    }
    if crate::logs::has_log(resource) {
        let action = crate::logs::ACTION;
        actions.insert(action.into(), json!(format!("{self_link}?action={action}")));
    }
    out.insert("type".into(), json!(schema.id));
    out.insert(
        "links".into(),
        json!({
            "self": self_link,
            "processes": format!("{base}/processinstances?resourceType={}&resourceId={id}", schema.id),
        }),
    );
    out.insert("actions".into(), Value::Object(actions));
    Value::Object(out)
}

async fn find(
    state: &AppState,
    principal: &Principal,
    schema: &TypeSchema,
    project: i64,
    text: &str,
) -> Result<Resource, ApiError> {
    let kind = schema.kind.expect("resource types have a kind");
    let not_found = || ApiError::not_found(format!("no {} {text:?}", schema.id));
    let id = ids::parse(schema.id, text).ok_or_else(not_found)?;
    let resource = state
        .store
        .get_resource(kind, id)
        .await?
        .ok_or_else(not_found)?;
    let visible = resource.account_id == Some(project)
        || (principal.is_privileged() && resource.account_id.is_none());
    if !visible {
        return Err(not_found());
    }
    Ok(resource)
}

/// Parses the collection filters and paging of a query string.
pub(crate) fn list_query(
    schema: &TypeSchema,
    project: i64,
    raw: Option<&str>,
) -> Result<ListQuery, ApiError> {
    let mut query = ListQuery {
        account_id: Some(project),
        filters: Vec::new(),
        marker: None,
        limit: 100,
    };
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "limit" => query.limit = super::resources::parse_limit(&value)?,
            "marker" => query.marker = Some(super::resources::parse_marker(&value)?),
            key if key.starts_with('_') || key == "sort" || key == "order" || key == "include" => {}
            key => {
                let (name, op) = match key.rsplit_once('_') {
                    Some((name, "ne")) => (name, FilterOp::Ne),
                    Some((name, "like")) => (name, FilterOp::Like),
                    Some((name, "null")) => (name, FilterOp::Null),
                    Some((name, "notnull")) => (name, FilterOp::NotNull),
                    _ => (key, FilterOp::Eq),
                };
                let field = schema::field(schema, name)
                    .filter(|field| field.column.is_some())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "InvalidFilter",
                            name,
                            format!("{name:?} is not a filter of {}", schema.id),
                        )
                    })?;
                let column = field.column.expect("filtered above");
                // `_null` and `_notnull` take no value (`hostId_notnull=true`).
                let value = if matches!(op, FilterOp::Null | FilterOp::NotNull) {
                    FilterValue::Text(String::new())
                } else if let Some(target) = field
                    .kind
                    .strip_prefix("reference[")
                    .and_then(|rest| rest.strip_suffix(']'))
                {
                    FilterValue::Int(ids::parse(target, &value).ok_or_else(|| {
                        ApiError::invalid(
                            "InvalidReference",
                            name,
                            format!("{value:?} is not a {target} id"),
                        )
                    })?)
                } else if column == "id" {
                    FilterValue::Int(ids::parse(schema.id, &value).ok_or_else(|| {
                        ApiError::invalid(
                            "InvalidReference",
                            name,
                            format!("{value:?} is not a {} id", schema.id),
                        )
                    })?)
                } else {
                    FilterValue::Text(value.into_owned())
                };
                query.filters.push(Filter { column, op, value });
            }
        }
    }
    Ok(query)
}

async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    RawQuery(raw): RawQuery,
    base: Base,
) -> Result<impl IntoResponse, ApiError> {
    let schema = schema_of(&params)?;
    let project = scope(&state, &principal, &params).await?;
    let mut query = list_query(schema, project, raw.as_deref())?;
    if schema.kind == Some(ResourceKind::ExternalHandler)
        && principal.is_privileged()
        && !params.contains_key("project")
    {
        // Global handlers belong to no project: an admin or service key lists them at
        // `/v1/externalhandlers`, a project's own at `/v1/projects/{id}/externalhandlers`.
        query.account_id = None;
        query.filters.push(Filter {
            column: "account_id",
            op: FilterOp::Null,
            value: FilterValue::Int(0),
        });
    }
    // Read before the list: a subscriber that resumes from it misses no change the list lacks.
    let head = state.store.change_bounds().await?.head;
    let page = state
        .store
        .list_resources(schema.kind.expect("resource type"), &query)
        .await?;
    let path = match params.get("project") {
        Some(project) => format!("{base}/projects/{project}/{}", schema.plural),
        None => format!("{base}/{}", schema.plural),
    };
    let data = page
        .data
        .iter()
        .map(|resource| render(&base, resource))
        .collect();
    let mut body = super::render::collection(schema.id, path.clone(), data);
    body["pagination"] = pagination(&path, raw.as_deref(), query.limit, page.next_marker);
    body["createTypes"] = if schema.collection_methods.contains(&"POST") {
        json!({ schema.id: path })
    } else {
        json!({})
    };
    Ok((
        [(crate::ws::STREAM_POSITION_HEADER, head.to_string())],
        Json(body),
    ))
}

/// GDAPI pagination: `limit`, `partial`, and a `next` link carrying the marker.
pub(crate) fn pagination(
    path: &str,
    raw: Option<&str>,
    limit: i64,
    next_marker: Option<i64>,
) -> Value {
    let next = next_marker.map(|marker| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            if key != "marker" {
                query.append_pair(&key, &value);
            }
        }
        query.append_pair("marker", &format!("m{marker}"));
        format!("{path}?{}", query.finish())
    });
    json!({"limit": limit, "partial": next.is_some(), "next": next, "marker": next_marker.map(|m| format!("m{m}"))})
}

async fn get_one(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let resource = target(&state, &principal, &params, "GET").await?;
    Ok(Json(render(&base, &resource)))
}

/// Whether a value has a field's GDAPI type (`null` only when the field is not required).
pub(crate) fn type_ok(field: &schema::Field, value: &Value) -> bool {
    match field.kind {
        _ if value.is_null() => !field.required,
        "string" | "date" | "enum" => value.is_string(),
        "int" => value.is_i64(),
        "boolean" => value.is_boolean(),
        "json" => true,
        "array[string]" => value
            .as_array()
            .is_some_and(|items| items.iter().all(Value::is_string)),
        "array[externalHandlerProcessConfig]" => value.is_array(),
        "map[string]" => value
            .as_object()
            .is_some_and(|map| map.values().all(Value::is_string)),
        kind if kind.starts_with("reference[") => value.is_string(),
        _ => false,
    }
}

/// Checks a value against a field's GDAPI type, names and descriptions against
/// [`super::text::check_name`] and [`super::text::check_description`], and a service's `scale`
/// and `launchConfig` against what the service reconciler can run.
fn check_type(schema: &TypeSchema, field: &schema::Field, value: &Value) -> Result<(), ApiError> {
    if !type_ok(field, value) {
        return Err(ApiError::invalid(
            "InvalidType",
            field.name,
            format!("{} must be of type {}", field.name, field.kind),
        ));
    }
    match (field.name, value.as_str()) {
        ("name", Some(name)) => super::text::check_name("name", name)?,
        ("description", Some(text)) => super::text::check_description("description", text)?,
        _ => {}
    }
    if schema.kind != Some(ResourceKind::Service) || value.is_null() {
        return Ok(());
    }
    match field.name {
        "scale" => {
            let scale = value.as_i64().unwrap_or(0);
            if scale < 0 {
                return Err(ApiError::invalid(
                    "MinLimitExceeded",
                    "scale",
                    "scale must be at least 0",
                ));
            }
            if scale > crate::services::MAX_SCALE {
                return Err(ApiError::invalid(
                    "MaxLimitExceeded",
                    "scale",
                    format!("scale must be at most {}", crate::services::MAX_SCALE),
                ));
            }
            Ok(())
        }
        "launchConfig" => crate::services::check_launch_config(value)
            .map_err(|(name, message)| ApiError::invalid("InvalidType", &name, message)),
        _ => Ok(()),
    }
}

/// The most external handlers (not removed) one project, or the global scope, may have.
const MAX_HANDLERS: i64 = 100;

/// An external handler's name: what follows `;handler=` in the events it receives.
fn check_handler_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "InvalidFormat",
            "name",
            "an external handler's name is 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
        ))
    }
}

/// Checks and normalizes an external handler's `processConfigs` (objects `{name, onError}`;
/// plain names and the older clients' `processNames` are taken too), `priority`, `retries` and
/// `timeoutMillis` into `data`. Every process named must exist (`pre.`/`post.` before it
/// attach a listener) and `onError` must name a process of the same resource type.
fn external_handler_fields(
    body: &Map<String, Value>,
    data: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    use drover_engine::external::{MAX_RETRIES, MAX_TIMEOUT_MILLIS, Phase};
    let invalid = |field: &str, message: String| ApiError::invalid("InvalidOption", field, message);
    let configs = match (body.get("processConfigs"), body.get("processNames")) {
        (Some(Value::Array(items)), _) => Some(items.clone()),
        (Some(Value::Null) | None, Some(Value::Array(names))) => Some(names.clone()),
        (Some(Value::Null) | None, None | Some(Value::Null)) => None,
        (None | Some(Value::Null), Some(_)) => {
            return Err(invalid(
                "processNames",
                "processNames must be an array of process names".into(),
            ));
        }
        (Some(_), _) => {
            return Err(invalid(
                "processConfigs",
                "processConfigs must be an array".into(),
            ));
        }
    };
    if let Some(configs) = configs {
        if configs.is_empty() || configs.len() > 100 {
            return Err(invalid(
                "processConfigs",
                "processConfigs must name 1 to 100 processes".into(),
            ));
        }
        let mut normalized = Vec::with_capacity(configs.len());
        for config in &configs {
            let (name, on_error) = match config {
                Value::String(name) => (name.as_str(), None),
                Value::Object(fields) => (
                    fields.get("name").and_then(Value::as_str).unwrap_or(""),
                    match fields.get("onError") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(next)) if next.is_empty() => None,
                        Some(Value::String(next)) => Some(next.as_str()),
                        Some(_) => {
                            return Err(invalid(
                                "processConfigs",
                                "onError must be a process name".into(),
                            ));
                        }
                    },
                ),
                _ => {
                    return Err(invalid(
                        "processConfigs",
                        "each process config is {\"name\": \"<process>\", \"onError\": \"<process>\"}".into(),
                    ));
                }
            };
            let (_, process) = Phase::parse(name);
            let def = defs::find(process)
                .filter(|def| def.kind != ResourceKind::ExternalHandler)
                .ok_or_else(|| {
                    invalid(
                        "processConfigs",
                        format!("{name:?} is not a process an external handler can take part in (e.g. instance.start, pre.instance.start, post.instance.start)"),
                    )
                })?;
            if let Some(next) = on_error {
                let Some(next_def) = defs::find(next).filter(|next| next.kind == def.kind) else {
                    return Err(invalid(
                        "processConfigs",
                        format!(
                            "onError {next:?} is not a process of a {}",
                            def.kind.api_type()
                        ),
                    ));
                };
                // An error chains into a process that undoes or settles: never back into the
                // same process, never from a remove (which always goes through), never into a
                // create or a purge.
                if next_def.name == def.name
                    || def.cancels_pending
                    || next_def.name.ends_with(".purge")
                    || next_def.name.ends_with(".create")
                {
                    return Err(invalid(
                        "processConfigs",
                        format!(
                            "onError {next:?} cannot follow a failed {}: it must be another process of the resource, not its create, remove or purge",
                            def.name
                        ),
                    ));
                }
            }
            normalized.push(json!({"name": name, "onError": on_error}));
        }
        data.remove("processNames");
        data.insert("processConfigs".into(), Value::Array(normalized));
    }
    for (field, range) in [
        ("priority", 0..=1_000_000),
        ("retries", 0..=MAX_RETRIES),
        ("timeoutMillis", 1..=MAX_TIMEOUT_MILLIS),
    ] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(value) => match value.as_i64().filter(|v| range.contains(v)) {
                Some(number) => {
                    data.insert(field.into(), json!(number));
                }
                None => {
                    return Err(invalid(
                        field,
                        format!(
                            "{field} must be a whole number from {} to {}",
                            range.start(),
                            range.end()
                        ),
                    ));
                }
            },
        }
    }
    Ok(())
}

/// Resolves every reference a request body carries (`requestedHostId`, `agentId`, `stackId`,
/// `serviceId`, `instanceId`, … and those inside a service's `launchConfig`) within the
/// project the request acts in: each must name a resource of that project that is not
/// removed. Create, update and every action go through here, so no body can point a resource
/// at another project's host, stack or agent. A reference to what the caller cannot see reads
/// as not found, exactly as a `GET` of it would.
pub(crate) async fn resolve_references(
    state: &AppState,
    project: i64,
    schema: &TypeSchema,
    body: &Map<String, Value>,
) -> Result<(), ApiError> {
    for (key, value) in body {
        if key == "launchConfig"
            && let Value::Object(config) = value
        {
            let containers = schema::of_kind(ResourceKind::Instance);
            Box::pin(resolve_references(state, project, containers, config)).await?;
            continue;
        }
        let Some(field) = schema::field(schema, key) else {
            continue;
        };
        let Some(target) = field
            .kind
            .strip_prefix("reference[")
            .and_then(|rest| rest.strip_suffix(']'))
        else {
            continue;
        };
        let Some(id) = reference(field, value)? else {
            continue;
        };
        let Some(kind) = schema::RESOURCE_TYPES
            .iter()
            .find(|candidate| candidate.id == target)
            .and_then(|candidate| candidate.kind)
        else {
            // accountId and the like are never taken from a body.
            continue;
        };
        let text = value.as_str().unwrap_or_default();
        let resource = state.store.get_resource(kind, id).await?;
        match resource {
            Some(resource) if resource.account_id == Some(project) => {
                if matches!(resource.state.as_str(), "removed" | "purging" | "purged") {
                    return Err(ApiError::invalid(
                        "InvalidReference",
                        field.name,
                        format!("{target} {text} is {}", resource.state),
                    ));
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    "InvalidReference",
                    field.name,
                    format!("no {target} {text:?} in this project"),
                ));
            }
        }
    }
    Ok(())
}

fn reference(field: &schema::Field, value: &Value) -> Result<Option<i64>, ApiError> {
    let Some(text) = value.as_str() else {
        return Ok(None);
    };
    let target = field
        .kind
        .trim_start_matches("reference[")
        .trim_end_matches(']');
    ids::parse(target, text).map(Some).ok_or_else(|| {
        ApiError::invalid(
            "InvalidReference",
            field.name,
            format!("{text:?} is not a {target} id"),
        )
    })
}

async fn create(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    headers: HeaderMap,
    base: Base,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let schema = schema_of(&params)?;
    if !schema.collection_methods.contains(&"POST") {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{} cannot be created through the API", schema.plural),
        ));
    }
    if principal.account.kind == drover_store::AccountKind::Agent
        && schema.id != "container"
        && schema.id != "volume"
    {
        return Err(ApiError::forbidden(format!(
            "agent keys cannot create {}",
            schema.plural
        )));
    }
    let kind = schema.kind.expect("resource type");
    let project = scope(&state, &principal, &params).await?;
    let once = super::idempotency::key(&state, &headers, &principal, schema.id, project, &body)?;
    if let Some(key) = &once
        && let Some(found) = state.store.idempotent_create(kind, &key.store()).await?
    {
        return super::idempotency::answer(&state, &base, found);
    }
    resolve_references(&state, project, schema, &body).await?;
    let mut new = NewResource {
        sub_kind: schema.id.to_owned(),
        account_id: Some(project),
        ..NewResource::default()
    };
    for field in schema::fields_of(schema).filter(|field| field.create) {
        let Some(value) = body.get(field.name) else {
            if field.required {
                return Err(ApiError::invalid(
                    "MissingRequired",
                    field.name,
                    format!("{} is required", field.name),
                ));
            }
            continue;
        };
        check_type(schema, field, value)?;
        if field.in_data {
            if field.kind.starts_with("reference[") {
                reference(field, value)?;
            }
            new.data.insert(field.name.into(), value.clone());
            continue;
        }
        match field.name {
            "name" => new.name = value.as_str().map(str::to_owned),
            "description" => new.description = value.as_str().map(str::to_owned),
            "agentId" => new.agent_id = reference(field, value)?,
            "stackId" => new.stack_id = reference(field, value)?,
            _ => {}
        }
    }
    if kind == ResourceKind::ExternalHandler {
        let name = new.name.clone().unwrap_or_default();
        check_handler_name(&name)?;
        external_handler_fields(&body, &mut new.data)?;
        if !new.data.contains_key("processConfigs") {
            return Err(ApiError::invalid(
                "MissingRequired",
                "processConfigs",
                "an external handler needs processConfigs: [{\"name\": \"<process>\", \"onError\": \"<process>\"}]",
            ));
        }
        // Outside a project (an admin or service key at /v1/externalhandlers) a handler is
        // global: called by its raw name for every project's processes. It belongs to no
        // project, so no project's key can see or change it.
        let global = principal.is_privileged() && !params.contains_key("project");
        new.data.insert("global".into(), Value::Bool(global));
        if global {
            new.account_id = None;
        }
        let existing = state
            .store
            .list_resources(
                ResourceKind::ExternalHandler,
                &ListQuery {
                    account_id: new.account_id,
                    filters: vec![
                        Filter {
                            column: "state",
                            op: FilterOp::Ne,
                            value: FilterValue::Text("removed".into()),
                        },
                        Filter {
                            column: "account_id",
                            op: if global {
                                FilterOp::Null
                            } else {
                                FilterOp::NotNull
                            },
                            value: FilterValue::Int(0),
                        },
                    ],
                    marker: None,
                    limit: MAX_HANDLERS + 1,
                },
            )
            .await?;
        if existing.data.len() as i64 >= MAX_HANDLERS {
            return Err(ApiError::invalid(
                "MaxLimitExceeded",
                "name",
                format!(
                    "a project (and the global scope) may have at most {MAX_HANDLERS} external handlers that are not removed"
                ),
            ));
        }
    }
    if kind == ResourceKind::Service {
        // The original's default: a service runs one container unless told otherwise.
        new.data
            .entry("scale")
            .or_insert(json!(crate::services::DEFAULT_SCALE));
    }
    if kind == ResourceKind::Instance {
        let command_ok = new
            .data
            .get("command")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty())
            || new.data.get("imageUuid").is_some_and(Value::is_string);
        if !command_ok {
            return Err(ApiError::invalid(
                "MissingRequired",
                "command",
                "a container needs a command (or an imageUuid for drivers that use images)",
            ));
        }
    }
    let create = NewCreate {
        kind,
        steps: defs::create_plan_with(kind, &new.data, &state.external, new.account_id),
        resource: new,
        node: state.engine.node().to_owned(),
    };
    let store = &state.store;
    let scheduled = match &once {
        None => store.create_and_schedule(create).await?,
        Some(key) => match store.create_and_schedule_once(create, &key.store()).await? {
            drover_store::Idempotent::Created(scheduled) => *scheduled,
            found => return super::idempotency::answer(&state, &base, found),
        },
    };
    state.engine.stats().scheduled(&scheduled.process);
    // The change is announced before the engine is woken, so its own later changes follow it.
    state.changes.changed(&scheduled.resource, None);
    state.engine.wake();
    Ok((
        StatusCode::CREATED,
        Json(render(&base, &scheduled.resource)),
    ))
}

/// Schedules the process behind `action` and answers 202 with the resource.
async fn schedule(
    state: &AppState,
    resource: &Resource,
    action: &str,
    data: Map<String, Value>,
) -> Result<Resource, ApiError> {
    let schema = schema::of_kind(resource.kind);
    let def = defs::action(resource.kind, action)
        .ok_or_else(|| ApiError::not_found(format!("{} has no action {action:?}", schema.id)))?;
    // An update's states depend on the state it starts from: it must still be that one.
    let start_states: Vec<String> = if def.transitioning == UPDATING {
        vec![resource.state.clone()]
    } else {
        def.start.iter().map(|state| (*state).to_owned()).collect()
    };
    let new = NewProcess {
        kind: resource.kind,
        resource_id: resource.id,
        start_states,
        cancel_pending: def.cancels_pending,
        steps: defs::plan_with(
            def,
            &resource.state,
            &resource.data,
            &state.external,
            resource.account_id,
        ),
        data,
        node: state.engine.node().to_owned(),
    };
    let id = ids::format(schema.id, resource.id);
    let scheduled = state.store.schedule(new).await.map_err(|error| match error {
        ScheduleError::NotFound => ApiError::not_found(format!("no {} {id}", schema.id)),
        ScheduleError::InvalidState { state: current } => ApiError::new(
            StatusCode::CONFLICT,
            "InvalidState",
            format!("{id} is {current}: {action} needs one of {}", def.start.join(", ")),
        ),
        ScheduleError::Busy { process_id, process_name } => ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "{id} is locked by process {} ({process_name}) until it ends; remove is always allowed",
                ids::format("processInstance", process_id)
            ),
        )
        .with_detail(ids::format("processInstance", process_id)),
        ScheduleError::Store(error) => error.into(),
    })?;
    state.engine.stats().scheduled(&scheduled.process);
    state
        .changes
        .changed(&scheduled.resource, Some(&scheduled.previous_state));
    state.engine.wake();
    Ok(scheduled.resource)
}

async fn action(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    RawQuery(raw): RawQuery,
    base: Base,
    super::ApiBytes(body): super::ApiBytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let action = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "action")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| {
            ApiError::invalid(
                "MissingRequired",
                "action",
                "POST to a resource needs ?action=<name>",
            )
        })?;
    super::text::check_json(&state, &body)?;
    let data = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice(&body) {
            Ok(Value::Object(map)) => map,
            Ok(Value::Null) => Map::new(),
            _ => return Err(ApiError::bad_request("action input must be a JSON object")),
        }
    };
    let resource = target(&state, &principal, &params, "POST").await?;
    if resource.kind == ResourceKind::Instance && action == crate::logs::ACTION {
        // Not a process: a URL and token for the log socket.
        let access = crate::logs::action(&state, &principal, &resource, &base, &data).await?;
        return Ok((StatusCode::OK, Json(access)));
    }
    let project = resource.account_id.unwrap_or(state.default_project.id);
    resolve_references(&state, project, schema::of_kind(resource.kind), &data).await?;
    let resource = schedule(&state, &resource, &action, data).await?;
    Ok((StatusCode::ACCEPTED, Json(render(&base, &resource))))
}

/// The resource a request names: the collection must allow `method`, the caller must see the
/// resource, and for anything but `GET` the caller must be allowed to change it.
async fn target(
    state: &AppState,
    principal: &Principal,
    params: &HashMap<String, String>,
    method: &str,
) -> Result<Resource, ApiError> {
    let schema = schema_of(params)?;
    if !schema.resource_methods.contains(&method) && method != "POST" {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not allowed on {}", schema.plural),
        ));
    }
    let project = scope(state, principal, params).await?;
    let id = params.get("id").map(String::as_str).unwrap_or("");
    let resource = find(state, principal, schema, project, id).await?;
    if method != "GET" {
        check_write(principal, schema)?;
    }
    Ok(resource)
}

fn check_write(principal: &Principal, schema: &TypeSchema) -> Result<(), ApiError> {
    if principal.account.kind == drover_store::AccountKind::Agent
        && schema.id != "container"
        && schema.id != "volume"
    {
        return Err(ApiError::forbidden(format!(
            "agent keys cannot change {}",
            schema.plural
        )));
    }
    Ok(())
}

async fn remove(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    base: Base,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let resource = target(&state, &principal, &params, "DELETE").await?;
    let resource = schedule(&state, &resource, "remove", Map::new()).await?;
    Ok((StatusCode::ACCEPTED, Json(render(&base, &resource))))
}

async fn update(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(params): Params,
    base: Base,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let schema = schema_of(&params)?;
    let resource = target(&state, &principal, &params, "PUT").await?;
    let project = resource.account_id.unwrap_or(state.default_project.id);
    resolve_references(&state, project, schema, &body).await?;
    let mut data = resource.data.clone();
    if resource.kind == ResourceKind::ExternalHandler {
        if let Some(name) = body.get("name") {
            check_handler_name(name.as_str().unwrap_or_default())?;
        }
        external_handler_fields(&body, &mut data)?;
    }
    let (mut name, mut description) = (None, None);
    for (key, value) in &body {
        let Some(field) = schema::field(schema, key).filter(|field| field.update) else {
            continue;
        };
        check_type(schema, field, value)?;
        match field.name {
            "name" => name = value.as_str().map(str::to_owned),
            "description" => description = value.as_str().map(str::to_owned),
            // Normalized above.
            "processConfigs" | "priority" | "retries" | "timeoutMillis"
                if resource.kind == ResourceKind::ExternalHandler => {}
            _ => {
                data.insert(key.clone(), value.clone());
            }
        }
    }
    let scheduled = schedule(&state, &resource, "update", Map::new()).await?;
    // Only what this request changes is written: fields others wrote meanwhile (a service's
    // reconciler status) stay.
    let changed: Map<String, Value> = data
        .into_iter()
        .filter(|(key, value)| resource.data.get(key) != Some(value))
        .collect();
    let updated = state
        .store
        .update_resource_fields(
            resource.kind,
            resource.id,
            name.as_deref(),
            description.as_deref(),
            &changed,
        )
        .await?
        .unwrap_or(scheduled);
    // The fields were written after the update's state change was announced: announce them
    // too (a new scale is what the service reconciler acts on).
    state.changes.touched(&updated);
    Ok((StatusCode::ACCEPTED, Json(render(&base, &updated))))
}
