//! `/v1/openapi.json`: an OpenAPI 3.0.3 description of the API, generated from the very schema
//! objects `/v1/schemas` renders ([`super::schemas::all`]), so the two cannot disagree: every
//! type becomes a component (its fields with their types, `nullable`, `options` as `enum`,
//! create and update bodies with what is required on create), every collection a path (list
//! with its filters as query parameters, create), every resource a path (get, update,
//! delete, and its actions as `POST …?action=<name>`), plus the event bus's publish and
//! subscribe endpoints and HTTP Basic auth with an API key.

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use super::Base;
use super::schemas::all;
use crate::auth::Auth;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/openapi.json", get(serve))
}

/// Any key may read it, as `/v1/schemas`.
async fn serve(_auth: Auth, base: Base) -> Json<Value> {
    Json(document(&base))
}

/// The component name of a type id (component names allow `[A-Za-z0-9._-]` only).
fn component(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect()
}

fn reference(id: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{}", component(id))})
}

/// A GDAPI field type as a JSON schema; `types` are the ids of the document's types.
fn type_schema(kind: &str, types: &[String]) -> Value {
    if let Some(inner) = kind
        .strip_prefix("array[")
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return json!({"type": "array", "items": type_schema(inner, types)});
    }
    if let Some(inner) = kind
        .strip_prefix("map[")
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return json!({"type": "object", "additionalProperties": type_schema(inner, types)});
    }
    if let Some(target) = kind
        .strip_prefix("reference[")
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return json!({
            "type": "string",
            "description": format!("The id of a {target}."),
            "x-drover-reference": target,
        });
    }
    match kind {
        "string" | "enum" => json!({"type": "string"}),
        "password" => json!({"type": "string", "format": "password"}),
        "int" => json!({"type": "integer", "format": "int64"}),
        "float" => json!({"type": "number"}),
        "boolean" => json!({"type": "boolean"}),
        "date" => json!({"type": "string", "format": "date-time"}),
        // Any JSON value.
        "json" => json!({}),
        other if types.iter().any(|id| id == other) => reference(other),
        other => json!({"description": format!("A {other}.")}),
    }
}

/// One field of a type: its schema with `nullable`, `enum` (from `options`), limits and
/// default; read-only when it can be neither created nor updated.
fn field_schema(field: &Value, types: &[String], read_only: bool) -> Value {
    let kind = field["type"].as_str().unwrap_or("json");
    let mut schema = type_schema(kind, types);
    let nullable = field["nullable"].as_bool().unwrap_or(true);
    if schema.get("$ref").is_some() {
        // In 3.0 a `$ref` has no siblings: wrap it to say more.
        schema = json!({"allOf": [schema]});
    }
    let object = schema.as_object_mut().expect("a schema is an object");
    if nullable {
        object.insert("nullable".into(), json!(true));
    }
    if let Some(options) = field["options"].as_array() {
        let mut options = options.clone();
        if nullable {
            // With `nullable`, `null` must be one of the values an enum lists.
            options.push(Value::Null);
        }
        object.insert("enum".into(), Value::Array(options));
    }
    for (gdapi, openapi) in [
        ("min", "minimum"),
        ("max", "maximum"),
        ("minLength", "minLength"),
        ("maxLength", "maxLength"),
        ("default", "default"),
    ] {
        if let Some(value) = field.get(gdapi).filter(|value| !value.is_null()) {
            object.insert(openapi.into(), value.clone());
        }
    }
    if let Some(description) = field["description"].as_str() {
        object.insert("description".into(), json!(description));
    }
    if read_only {
        object.insert("readOnly".into(), json!(true));
    }
    schema
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The components of one type: the resource, its create and update bodies, its collection.
fn type_components(schema: &Value, types: &[String], out: &mut Map<String, Value>) {
    let id = schema["id"].as_str().unwrap_or_default();
    let fields = schema["resourceFields"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut properties = Map::new();
    for (name, field) in &fields {
        let settable =
            field["create"].as_bool() == Some(true) || field["update"].as_bool() == Some(true);
        properties.insert(name.clone(), field_schema(field, types, !settable));
    }
    for (name, schema) in [
        (
            "type",
            json!({"type": "string", "example": id, "readOnly": true}),
        ),
        (
            "links",
            json!({"type": "object", "additionalProperties": {"type": "string"}, "readOnly": true}),
        ),
        (
            "actions",
            json!({
                "type": "object",
                "additionalProperties": {"type": "string"},
                "readOnly": true,
                "description": "The actions the resource has in its current state, by name: \
                                the URL to POST to.",
            }),
        ),
    ] {
        properties.entry(name).or_insert(schema);
    }
    out.insert(
        component(id),
        json!({"type": "object", "title": id, "properties": properties}),
    );
    let body = |flag: &str, required_too: bool| {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for (name, field) in &fields {
            if field[flag].as_bool() == Some(true) {
                properties.insert(name.clone(), field_schema(field, types, false));
                if required_too && field["required"].as_bool() == Some(true) {
                    required.push(json!(name));
                }
            }
        }
        let mut object = json!({"type": "object", "properties": properties});
        if !required.is_empty() {
            object["required"] = Value::Array(required);
        }
        object
    };
    let collection_methods = strings(&schema["collectionMethods"]);
    let resource_methods = strings(&schema["resourceMethods"]);
    if collection_methods.contains(&"POST") {
        out.insert(format!("{}Create", component(id)), body("create", true));
    }
    if resource_methods.contains(&"PUT") {
        out.insert(format!("{}Update", component(id)), body("update", false));
    }
    if collection_methods.contains(&"GET") {
        out.insert(
            format!("{}Collection", component(id)),
            json!({
                "type": "object",
                "properties": {
                    "type": {"type": "string", "example": "collection"},
                    "resourceType": {"type": "string", "example": id},
                    "links": {"type": "object", "additionalProperties": {"type": "string"}},
                    "pagination": {"allOf": [{"$ref": "#/components/schemas/Pagination"}], "nullable": true},
                    "data": {"type": "array", "items": reference(id)},
                },
            }),
        );
    }
}

fn json_body(schema: Value) -> Value {
    json!({"content": {"application/json": {"schema": schema}}})
}

fn response(description: &str, schema: Option<Value>) -> Value {
    let mut out = json!({"description": description});
    if let Some(schema) = schema {
        out["content"] = json!({"application/json": {"schema": schema}});
    }
    out
}

/// The answers every operation may give besides its success, each a GDAPI error: status,
/// name in `components/responses`, description.
const ERRORS: [(&str, &str, &str); 5] = [
    ("400", "BadRequest", "The request is malformed."),
    (
        "401",
        "Unauthorized",
        "No key, or a key the server does not know.",
    ),
    ("403", "Forbidden", "The key may not do this."),
    (
        "404",
        "NotFound",
        "No such resource, or the key may not see it.",
    ),
    (
        "422",
        "Invalid",
        "A field is invalid; the error names it (`fieldName`).",
    ),
];

/// An operation's responses: its own and the [`ERRORS`].
fn errors(mut responses: Map<String, Value>) -> Value {
    for (status, name, _) in ERRORS {
        responses.insert(
            status.into(),
            json!({"$ref": format!("#/components/responses/{name}")}),
        );
    }
    Value::Object(responses)
}

fn one(status: &str, value: Value) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert(status.into(), value);
    map
}

/// Whether changes of a type run as processes (answered `202 Accepted` while they do).
fn engine_driven(id: &str) -> bool {
    super::schema::RESOURCE_TYPES
        .iter()
        .any(|schema| schema.id == id)
}

/// Whether a type's collections are also served under `/projects/{projectId}`.
fn project_scoped(id: &str) -> bool {
    engine_driven(id)
        || matches!(
            id,
            "apiKey" | "containerEvent" | "serviceEvent" | "publish" | "subscribe"
        )
}

fn path_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"},
           "description": description})
}

fn query_param(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": schema,
           "description": description})
}

/// The operations of one type, by path (relative to the version's base).
fn type_paths(schema: &Value, base: &str, types: &[String], paths: &mut Map<String, Value>) {
    let id = schema["id"].as_str().unwrap_or_default();
    let Some(collection) = schema["links"]["collection"]
        .as_str()
        .and_then(|link| link.strip_prefix(base))
    else {
        return;
    };
    match id {
        "subscribe" => return subscribe_paths(schema, collection, types, paths),
        "publish" => return publish_paths(collection, paths),
        _ => {}
    }
    let name = component(id);
    let collection_methods = strings(&schema["collectionMethods"]);
    let resource_methods = strings(&schema["resourceMethods"]);
    let actions = schema["resourceActions"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let collection_actions = schema["collectionActions"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let changed = if engine_driven(id) { "202" } else { "200" };

    let mut list_ops = Map::new();
    if collection_methods.contains(&"GET") {
        let mut parameters = Vec::new();
        let fields = &schema["resourceFields"];
        for (filter, spec) in schema["collectionFilters"]
            .as_object()
            .cloned()
            .unwrap_or_default()
        {
            let kind = fields[&filter]["type"].as_str().unwrap_or("string");
            let value = match type_schema(kind, types) {
                schema if schema.get("$ref").is_some() => json!({"type": "string"}),
                schema => schema,
            };
            for modifier in strings(&spec["modifiers"]) {
                let (param, description, schema) = match modifier {
                    "eq" => (filter.clone(), format!("{filter} equals"), value.clone()),
                    "ne" => (
                        format!("{filter}_ne"),
                        format!("{filter} differs from"),
                        value.clone(),
                    ),
                    "like" => (
                        format!("{filter}_like"),
                        format!("{filter} matches (SQL LIKE: % and _)"),
                        json!({"type": "string"}),
                    ),
                    "null" => (
                        format!("{filter}_null"),
                        format!("{filter} is not set (no value needed)"),
                        json!({"type": "string"}),
                    ),
                    "notnull" => (
                        format!("{filter}_notnull"),
                        format!("{filter} is set (no value needed)"),
                        json!({"type": "string"}),
                    ),
                    other => (
                        format!("{filter}_{other}"),
                        format!("{filter}, modifier {other}"),
                        value.clone(),
                    ),
                };
                parameters.push(query_param(&param, &description, schema));
            }
        }
        parameters.push(query_param(
            "limit",
            "The page size.",
            json!({"type": "integer", "minimum": 1}),
        ));
        parameters.push(query_param(
            "marker",
            "Where the page starts: the `pagination.next` link carries it.",
            json!({"type": "string"}),
        ));
        list_ops.insert(
            "get".into(),
            json!({
                "operationId": format!("list_{name}"),
                "summary": format!("List {id}"),
                "tags": [id],
                "parameters": parameters,
                "responses": errors(one("200", response(
                    &format!("A page of {id}"),
                    Some(reference(&format!("{name}Collection"))),
                ))),
            }),
        );
    }
    if collection_methods.contains(&"POST") {
        let mut operation = json!({
            "operationId": format!("create_{name}"),
            "summary": format!("Create a {id}"),
            "tags": [id],
            "requestBody": {"required": true,
                            "content": {"application/json": {"schema": reference(&format!("{name}Create"))}}},
            "responses": errors(one("201", response(
                &format!("The new {id}"),
                Some(reference(id)),
            ))),
        });
        if engine_driven(id) {
            operation["parameters"] = json!([{
                "name": "Idempotency-Key", "in": "header", "required": false,
                "schema": {"type": "string"},
                "description": "Makes the create safe to retry: a repeated key answers with \
                                the resource the first request created.",
            }]);
        }
        list_ops.insert("post".into(), operation);
    }
    // Actions on a type that has no resource path (`cleanup`) and collection actions are
    // posted to the collection.
    let mut on_collection = collection_actions;
    if resource_methods.is_empty() {
        on_collection.extend(actions.clone());
    }
    if !on_collection.is_empty() && !list_ops.contains_key("post") {
        list_ops.insert(
            "post".into(),
            action_operation(
                &format!("{name}_collection"),
                id,
                &on_collection,
                types,
                "200",
            ),
        );
    }
    if !list_ops.is_empty() {
        insert_scoped(paths, id, collection, list_ops);
    }

    let mut item_ops = Map::new();
    let item = format!("{collection}/{{id}}");
    for method in &resource_methods {
        let operation = match *method {
            "GET" => json!({
                "operationId": format!("get_{name}"),
                "summary": format!("Get a {id}"),
                "tags": [id],
                "responses": errors(one("200", response(&format!("The {id}"), Some(reference(id))))),
            }),
            "PUT" => json!({
                "operationId": format!("update_{name}"),
                "summary": format!("Change a {id}'s fields"),
                "tags": [id],
                "requestBody": {"required": true,
                                "content": {"application/json": {"schema": reference(&format!("{name}Update"))}}},
                "responses": errors(one(changed, response(&format!("The {id}"), Some(reference(id))))),
            }),
            "DELETE" => json!({
                "operationId": format!("delete_{name}"),
                "summary": format!("Remove a {id}"),
                "tags": [id],
                "responses": errors(one(changed, response(&format!("The {id}, on its way out"), Some(reference(id))))),
            }),
            _ => continue,
        };
        item_ops.insert(method.to_lowercase(), operation);
    }
    if !actions.is_empty() && !resource_methods.is_empty() {
        let status = if engine_driven(id) || id == "processInstance" {
            "202"
        } else {
            "200"
        };
        item_ops.insert(
            "post".into(),
            action_operation(&name, id, &actions, types, status),
        );
    }
    if !item_ops.is_empty() {
        item_ops.insert(
            "parameters".into(),
            json!([path_param("id", &format!("The {id}'s id"))]),
        );
        insert_scoped(paths, id, &item, item_ops);
    }
}

/// `POST …?action=<name>`: one operation for all of a type's actions (a path cannot hold a
/// query string), the action an enum parameter; each action's input and output are listed
/// in its description and in `x-drover-actions`.
fn action_operation(
    name: &str,
    id: &str,
    actions: &Map<String, Value>,
    types: &[String],
    status: &str,
) -> Value {
    let names: Vec<&String> = actions.keys().collect();
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut lines = Vec::new();
    for (action, spec) in actions {
        let input = spec["input"].as_str();
        let output = spec["output"].as_str();
        lines.push(format!(
            "- `{action}`: input {}, output {}",
            input.unwrap_or("none"),
            output.unwrap_or("none")
        ));
        if let Some(input) = input {
            let schema = type_schema(input, types);
            if !inputs.contains(&schema) {
                inputs.push(schema);
            }
        }
        if let Some(output) = output {
            let schema = type_schema(output, types);
            if !outputs.contains(&schema) {
                outputs.push(schema);
            }
        }
    }
    let one_of = |mut list: Vec<Value>| match list.len() {
        0 => None,
        1 => list.pop(),
        _ => Some(json!({"oneOf": list})),
    };
    let mut operation = json!({
        "operationId": format!("action_{name}"),
        "summary": format!("Run an action on a {id}"),
        "description": format!("The actions, with their input and output types:\n\n{}", lines.join("\n")),
        "tags": [id],
        "parameters": [{
            "name": "action", "in": "query", "required": true,
            "schema": {"type": "string", "enum": names},
            "description": "The action to run.",
        }],
        "x-drover-actions": actions,
        "responses": errors(one(status, response(
            "The action's output",
            one_of(outputs),
        ))),
    });
    if let Some(input) = one_of(inputs) {
        operation["requestBody"] = json_body(input);
    }
    operation
}

/// Inserts a path's operations, and a copy under `/projects/{projectId}` for the types
/// served there too.
fn insert_scoped(paths: &mut Map<String, Value>, id: &str, path: &str, ops: Map<String, Value>) {
    if project_scoped(id) {
        let mut scoped = ops.clone();
        let mut parameters = scoped
            .get("parameters")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        parameters.insert(
            0,
            path_param("projectId", "The project to act in (else the key's own)"),
        );
        scoped.insert("parameters".into(), Value::Array(parameters));
        for (method, operation) in scoped.iter_mut() {
            if method != "parameters"
                && let Some(id) = operation["operationId"].as_str()
            {
                operation["operationId"] = json!(format!("{id}_in_project"));
            }
        }
        paths.insert(
            format!("/projects/{{projectId}}{path}"),
            Value::Object(scoped),
        );
    }
    paths.insert(path.to_owned(), Value::Object(ops));
}

fn subscribe_paths(
    schema: &Value,
    collection: &str,
    types: &[String],
    paths: &mut Map<String, Value>,
) {
    let fields = &schema["resourceFields"];
    let mut parameters = Vec::new();
    for (name, field) in fields.as_object().cloned().unwrap_or_default() {
        let mut param = query_param(
            &name,
            match name.as_str() {
                "eventNames" => "An event name to receive (repeat the parameter for more).",
                "agentId" => "The agent to subscribe as (agent keys and admins).",
                _ => "",
            },
            field_schema(&field, types, false),
        );
        if name == "eventNames" {
            param["style"] = json!("form");
            param["explode"] = json!(true);
        }
        parameters.push(param);
    }
    parameters.push(query_param(
        "resumeFrom",
        "The last `resource.change` position seen: the changes after it are sent first.",
        json!({"type": "integer", "format": "int64"}),
    ));
    parameters.push(json!({
        "name": "Upgrade", "in": "header", "required": true,
        "schema": {"type": "string", "enum": ["websocket"]},
    }));
    let mut ops = Map::new();
    ops.insert(
        "get".into(),
        json!({
            "operationId": "subscribe",
            "summary": "Receive events over a WebSocket",
            "description": "A WebSocket (`ws://`, or `wss://` when the server serves TLS): \
                            one text frame per event, as `POST /publish` takes them. Browsers \
                            may send the key as the subprotocol `drover.basic.<base64url>` \
                            with `drover.v1`.",
            "tags": ["subscribe"],
            "parameters": parameters,
            "responses": errors({
                let mut responses = one("101", response("Switched to the WebSocket protocol", None));
                responses.insert("410".into(), response(
                    "`resumeFrom` is older than the server retains: re-list, then resume from \
                     the head in `X-Drover-Stream-Position`",
                    Some(json!({"$ref": "#/components/schemas/Error"})),
                ));
                responses.insert("503".into(), response(
                    "The server holds as many subscriptions as it may",
                    Some(json!({"$ref": "#/components/schemas/Error"})),
                ));
                responses
            }),
        }),
    );
    insert_scoped(paths, "subscribe", collection, ops);
}

fn publish_paths(collection: &str, paths: &mut Map<String, Value>) {
    let mut ops = Map::new();
    ops.insert(
        "post".into(),
        json!({
            "operationId": "publish",
            "summary": "Publish an event",
            "description": "The event goes to the subscribers of its name in the key's scope; \
                            a reply (`previousIds`) completes the call it answers.",
            "tags": ["publish"],
            "requestBody": {"required": true,
                            "content": {"application/json": {"schema": reference("publish")}}},
            "responses": errors(one("201", response("The event as published", Some(reference("publish"))))),
        }),
    );
    insert_scoped(paths, "publish", collection, ops);
}

/// The OpenAPI document for the API under `base` (`http://host/v1` or `…/v2-beta`).
pub fn document(base: &Base) -> Value {
    let schemas = all(base.as_str());
    let types: Vec<String> = schemas
        .iter()
        .filter_map(|schema| schema["id"].as_str().map(str::to_owned))
        .collect();
    let mut components = Map::new();
    let mut paths = Map::new();
    for schema in &schemas {
        type_components(schema, &types, &mut components);
        type_paths(schema, base.as_str(), &types, &mut paths);
    }
    components.insert(
        "Error".into(),
        json!({
            "type": "object",
            "description": "A GDAPI error.",
            "properties": {
                "type": {"type": "string", "example": "error"},
                "status": {"type": "integer"},
                "code": {"type": "string"},
                "message": {"type": "string"},
                "detail": {"type": "string", "nullable": true},
                "fieldName": {"type": "string", "nullable": true},
            },
            "required": ["type", "status", "code"],
        }),
    );
    components.insert(
        "Pagination".into(),
        json!({
            "type": "object",
            "properties": {
                "limit": {"type": "integer"},
                "marker": {"type": "string", "nullable": true},
                "next": {"type": "string", "nullable": true,
                         "description": "The next page's URL, if there is one."},
                "partial": {"type": "boolean"},
            },
        }),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "drover API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "Generated from the types at {base}/schemas. Every link in an answer is \
                 absolute; follow it rather than building URLs."
            ),
        },
        "servers": [{"url": base.as_str()}],
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "An API key: its access key as the user name, its secret \
                                    key as the password.",
                },
            },
            "responses": ERRORS
                .iter()
                .map(|(_, name, description)| {
                    (
                        (*name).to_owned(),
                        response(description, Some(json!({"$ref": "#/components/schemas/Error"}))),
                    )
                })
                .collect::<Map<String, Value>>(),
            "schemas": components,
        },
    })
}
