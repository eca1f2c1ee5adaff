//! `/v1/schemas`: every API type, so a generic client can drive the API from it alone.

use axum::extract::Path;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use super::Base;
use super::render::collection;
use super::schema::{RESOURCE_TYPES, render, schema_json};
use crate::auth::Auth;
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/schemas", get(list))
        .route("/v1/schemas/{id}", get(get_one))
}

fn fields(list: &[(&str, &str, bool)]) -> Map<String, Value> {
    list.iter()
        .map(|(name, kind, create)| {
            let mut field = json!({"type": kind, "nullable": true, "create": create, "update": false, "required": false});
            if *name == "name" && *create {
                field["minLength"] = json!(1);
                field["maxLength"] = json!(super::text::NAME_MAX);
            }
            ((*name).to_owned(), field)
        })
        .collect()
}

fn all(base: &str) -> Vec<Value> {
    let mut out: Vec<Value> = RESOURCE_TYPES
        .iter()
        .map(|schema| render(base, schema))
        .collect();
    let none = Map::new;
    out.push(schema_json(
        base,
        "apiKey",
        "apikeys",
        &["GET", "POST"],
        &["GET", "DELETE"],
        fields(&[
            ("id", "string", false),
            ("name", "string", true),
            ("description", "string", true),
            ("accountId", "reference[account]", true),
            ("publicValue", "string", false),
            ("secretValue", "password", false),
            ("state", "string", false),
            ("created", "date", false),
        ]),
        none(),
        none(),
    ));
    // The input and output of a container's `logs` action (crate::logs).
    let mut logs_input = fields(&[("follow", "boolean", true), ("lines", "int", true)]);
    logs_input["follow"]["default"] = json!(true);
    logs_input["lines"]["default"] = json!(drover_proto::logs::DEFAULT_LINES);
    logs_input["lines"]["min"] = json!(0);
    logs_input["lines"]["max"] = json!(drover_proto::logs::MAX_LINES);
    out.push(schema_json(
        base,
        "containerLogs",
        "containerLogs",
        &[],
        &[],
        logs_input,
        none(),
        none(),
    ));
    out.push(schema_json(
        base,
        "hostAccess",
        "hostAccesses",
        &[],
        &[],
        fields(&[("url", "string", false), ("token", "string", false)]),
        none(),
        none(),
    ));
    out.push(schema_json(
        base,
        "externalHandlerProcessConfig",
        "externalHandlerProcessConfigs",
        &[],
        &[],
        fields(&[("name", "string", true), ("onError", "string", true)]),
        none(),
        none(),
    ));
    out.push(schema_json(
        base,
        "project",
        "projects",
        &["GET", "POST"],
        &["GET"],
        fields(&[
            ("id", "string", false),
            ("name", "string", true),
            ("state", "string", false),
            ("uuid", "string", false),
        ]),
        none(),
        none(),
    ));
    out.push(schema_json(
        base,
        "account",
        "accounts",
        &["GET", "POST"],
        &[],
        fields(&[
            ("id", "string", false),
            ("name", "string", true),
            ("kind", "enum", true),
            ("projectId", "reference[project]", true),
            ("state", "string", false),
        ]),
        none(),
        none(),
    ));
    let process_filters: Map<String, Value> = [
        "processName",
        "resourceType",
        "resourceId",
        "state",
        "result",
    ]
    .iter()
    .map(|name| ((*name).to_owned(), json!({"modifiers": ["eq"]})))
    .collect();
    let mut process_actions = Map::new();
    process_actions.insert(
        "replay".into(),
        json!({"input": null, "output": "processInstance"}),
    );
    process_actions.insert(
        "cancel".into(),
        json!({"input": null, "output": "processInstance"}),
    );
    out.push(schema_json(
        base,
        "processInstance",
        "processinstances",
        &["GET"],
        &["GET"],
        fields(&[
            ("id", "string", false),
            ("processName", "string", false),
            ("resourceType", "string", false),
            ("resourceId", "string", false),
            ("state", "enum", false),
            ("startTime", "date", false),
            ("endTime", "date", false),
            ("runAfter", "date", false),
            ("executionCount", "int", false),
            ("waitCount", "int", false),
            ("exitReason", "string", false),
            ("result", "string", false),
            ("phase", "string", false),
            ("lastError", "string", false),
            ("runningProcessServerId", "string", false),
        ]),
        process_actions,
        process_filters,
    ));
    let mut execution_filters = Map::new();
    execution_filters.insert("processInstanceId".into(), json!({"modifiers": ["eq"]}));
    out.push(schema_json(
        base,
        "processExecution",
        "processexecutions",
        &["GET"],
        &["GET"],
        fields(&[
            ("id", "string", false),
            ("processInstanceId", "reference[processInstance]", false),
            ("startTime", "date", false),
            ("endTime", "date", false),
            ("exitReason", "string", false),
            ("message", "string", false),
            ("log", "json", false),
        ]),
        none(),
        execution_filters,
    ));
    out.push(schema_json(
        base,
        "processSummary",
        "processsummary",
        &["GET"],
        &[],
        fields(&[
            ("processName", "string", false),
            ("running", "int", false),
            ("ready", "int", false),
            ("delay", "int", false),
            ("done", "int", false),
        ]),
        none(),
        none(),
    ));
    out.push(schema_json(
        base,
        "publish",
        "publish",
        &["POST"],
        &[],
        fields(&[
            ("id", "string", true),
            ("name", "string", true),
            ("resourceId", "string", true),
            ("resourceType", "string", true),
            ("previousIds", "array[string]", true),
            ("data", "json", true),
            ("time", "int", true),
            ("publisher", "string", true),
            ("transitioning", "enum", true),
            ("transitioningMessage", "string", true),
            ("transitioningInternalMessage", "string", true),
            ("transitioningProgress", "int", true),
        ]),
        none(),
        none(),
    ));
    let eq = |names: &[&str]| -> Map<String, Value> {
        names
            .iter()
            .map(|name| ((*name).to_owned(), json!({"modifiers": ["eq"]})))
            .collect()
    };
    out.push(schema_json(
        base,
        "containerEvent",
        "containerevents",
        &["GET", "POST"],
        &["GET"],
        fields(&[
            ("id", "string", false),
            ("state", "enum", false),
            ("created", "date", false),
            ("hostId", "reference[host]", true),
            ("externalId", "string", true),
            ("externalStatus", "string", true),
            ("externalFrom", "string", true),
            ("externalTimestamp", "int", true),
            ("reportedHostUuid", "string", true),
            ("dockerInspect", "json", true),
            ("instanceId", "reference[container]", false),
            ("data", "json", true),
        ]),
        none(),
        eq(&[
            "state",
            "hostId",
            "externalId",
            "externalStatus",
            "reportedHostUuid",
        ]),
    ));
    out.push(schema_json(
        base,
        "serviceEvent",
        "serviceevents",
        &["GET", "POST"],
        &["GET"],
        fields(&[
            ("id", "string", false),
            ("state", "enum", false),
            ("created", "date", false),
            ("hostId", "reference[host]", true),
            ("instanceId", "reference[container]", true),
            ("healthcheckUuid", "string", true),
            ("reportedHealth", "string", true),
            ("externalTimestamp", "int", true),
            ("reportedHostUuid", "string", true),
            ("description", "string", true),
            ("data", "json", true),
        ]),
        none(),
        eq(&[
            "state",
            "hostId",
            "instanceId",
            "healthcheckUuid",
            "reportedHealth",
        ]),
    ));
    out.push(schema_json(
        base,
        "setting",
        "settings",
        &["GET"],
        &["GET", "PUT", "DELETE"],
        fields(&[
            ("id", "string", false),
            ("name", "string", false),
            ("value", "string", false),
            ("activeValue", "string", false),
            ("defaultValue", "string", false),
            ("inDb", "boolean", false),
            ("source", "string", false),
            ("description", "string", false),
        ]),
        none(),
        none(),
    ));
    let mut cleanup_actions = Map::new();
    cleanup_actions.insert(
        "run".into(),
        json!({"input": null, "output": "cleanupReport"}),
    );
    out.push(schema_json(
        base,
        "cleanup",
        "cleanup",
        &["GET"],
        &[],
        fields(&[
            ("id", "string", false),
            ("nextRun", "date", false),
            ("lastRun", "json", false),
            ("settings", "json", false),
        ]),
        cleanup_actions,
        none(),
    ));
    out.push(schema_json(
        base,
        "subscribe",
        "subscribe",
        &["GET"],
        &[],
        fields(&[
            ("eventNames", "array[string]", true),
            ("agentId", "reference[agent]", true),
        ]),
        none(),
        none(),
    ));
    out
}

async fn list(_auth: Auth, base: Base) -> Json<Value> {
    Json(collection("schema", format!("{base}/schemas"), all(&base)))
}

async fn get_one(_auth: Auth, Path(id): Path<String>, base: Base) -> Result<Json<Value>, ApiError> {
    all(&base)
        .into_iter()
        .find(|schema| {
            schema["id"]
                .as_str()
                .is_some_and(|name| name.eq_ignore_ascii_case(&id))
        })
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no schema {id:?}")))
}
