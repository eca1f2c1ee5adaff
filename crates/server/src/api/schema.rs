//! The API's types: their fields, methods, filters and actions, from which `/v1/schemas` is
//! rendered and create/update bodies are checked. Actions come from the engine's process
//! definitions, so the schema, a resource's `actions` and the engine agree.

use drover_store::ResourceKind;
use serde_json::{Map, Value, json};

/// A field of an API type.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The JSON name.
    pub name: &'static str,
    /// The GDAPI type: `string`, `int`, `boolean`, `date`, `json`, `map[string]`,
    /// `array[string]`, `reference[<type>]`, `enum`.
    pub kind: &'static str,
    /// Settable on create.
    pub create: bool,
    /// Settable on update.
    pub update: bool,
    /// Required on create.
    pub required: bool,
    /// The column a collection filter on this field compares, if it is filterable.
    pub column: Option<&'static str>,
    /// Whether the value lives in the resource's `data` (as opposed to a column).
    pub in_data: bool,
}

const fn f(name: &'static str, kind: &'static str) -> Field {
    Field {
        name,
        kind,
        create: false,
        update: false,
        required: false,
        column: None,
        in_data: false,
    }
}

const fn input(name: &'static str, kind: &'static str) -> Field {
    Field {
        name,
        kind,
        create: true,
        update: false,
        required: false,
        column: None,
        in_data: true,
    }
}

const fn filter(mut field: Field, column: &'static str) -> Field {
    field.column = Some(column);
    field
}

const fn updatable(mut field: Field) -> Field {
    field.update = true;
    field
}

const fn column_input(mut field: Field) -> Field {
    field.create = true;
    field.in_data = false;
    field
}

/// One API type.
#[derive(Debug, Clone, Copy)]
pub struct TypeSchema {
    /// The type's id, e.g. `container`.
    pub id: &'static str,
    /// The collection's path segment, e.g. `containers`.
    pub plural: &'static str,
    /// The resource table behind it, for engine-driven types.
    pub kind: Option<ResourceKind>,
    /// Its fields (the common ones are added by [`fields_of`]).
    pub fields: &'static [Field],
    /// `GET`, `POST`.
    pub collection_methods: &'static [&'static str],
    /// `GET`, `PUT`, `DELETE`.
    pub resource_methods: &'static [&'static str],
}

const COMMON: &[Field] = &[
    filter(f("id", "string"), "id"),
    filter(updatable(column_input(f("name", "string"))), "name"),
    updatable(column_input(f("description", "string"))),
    filter(f("state", "string"), "state"),
    filter(f("uuid", "string"), "uuid"),
    filter(f("kind", "string"), "kind"),
    f("accountId", "reference[project]"),
    f("created", "date"),
    f("createdTS", "int"),
    f("removed", "date"),
    filter(f("transitioning", "enum"), "transitioning"),
    f("transitioningMessage", "string"),
    f("transitioningProgress", "int"),
];

const CONTAINER: &[Field] = &[
    input("imageUuid", "string"),
    input("command", "array[string]"),
    input("environment", "map[string]"),
    input("labels", "map[string]"),
    input("workingDir", "string"),
    input("requestedHostId", "reference[host]"),
    input("dataVolumes", "array[string]"),
    input("startOnCreate", "boolean"),
    filter(f("hostId", "reference[host]"), "host_id"),
    f("agentId", "reference[agent]"),
    filter(f("serviceId", "reference[service]"), "service_id"),
    f("serviceIndex", "int"),
    f("externalId", "string"),
    // How it ended, from the agent's reports (null while it runs or before it ever ended).
    f("agentState", "string"),
    f("exitCode", "int"),
    f("finishedAt", "date"),
    f("agentMessage", "string"),
];

const VOLUME: &[Field] = &[
    input("driver", "string"),
    input("driverOpts", "map[string]"),
    input("requestedHostId", "reference[host]"),
    filter(f("hostId", "reference[host]"), "host_id"),
    filter(f("instanceId", "reference[container]"), "instance_id"),
];

const HOST: &[Field] = &[
    filter(column_input(f("agentId", "reference[agent]")), "agent_id"),
    input("hostname", "string"),
    input("info", "json"),
];

const AGENT: &[Field] = &[f("uri", "string"), f("info", "json")];

const STACK: &[Field] = &[
    input("environment", "map[string]"),
    input("dockerCompose", "string"),
];

const SERVICE: &[Field] = &[
    filter(column_input(f("stackId", "reference[stack]")), "stack_id"),
    updatable(input("scale", "int")),
    updatable(input("launchConfig", "json")),
    // What the service reconciler thinks (services.rs).
    f("currentScale", "int"),
    f("reconcileMessage", "string"),
    f("consecutiveRestarts", "int"),
    f("lastRestartAt", "date"),
    f("nextRetryAt", "date"),
];

const EXTERNAL_HANDLER: &[Field] = &[
    updatable(input(
        "processConfigs",
        "array[externalHandlerProcessConfig]",
    )),
    updatable(input("priority", "int")),
    updatable(input("retries", "int")),
    updatable(input("timeoutMillis", "int")),
    f("global", "boolean"),
];

/// The engine-driven types, with their collections.
pub const RESOURCE_TYPES: &[TypeSchema] = &[
    TypeSchema {
        id: "container",
        plural: "containers",
        kind: Some(ResourceKind::Instance),
        fields: CONTAINER,
        collection_methods: &["GET", "POST"],
        resource_methods: &["GET", "PUT", "DELETE"],
    },
    TypeSchema {
        id: "volume",
        plural: "volumes",
        kind: Some(ResourceKind::Volume),
        fields: VOLUME,
        collection_methods: &["GET", "POST"],
        resource_methods: &["GET", "PUT", "DELETE"],
    },
    TypeSchema {
        id: "host",
        plural: "hosts",
        kind: Some(ResourceKind::Host),
        fields: HOST,
        collection_methods: &["GET", "POST"],
        resource_methods: &["GET", "PUT", "DELETE"],
    },
    TypeSchema {
        id: "agent",
        plural: "agents",
        kind: Some(ResourceKind::Agent),
        fields: AGENT,
        collection_methods: &["GET"],
        resource_methods: &["GET", "DELETE"],
    },
    TypeSchema {
        id: "stack",
        plural: "stacks",
        kind: Some(ResourceKind::Stack),
        fields: STACK,
        collection_methods: &["GET", "POST"],
        resource_methods: &["GET", "PUT", "DELETE"],
    },
    TypeSchema {
        id: "service",
        plural: "services",
        kind: Some(ResourceKind::Service),
        fields: SERVICE,
        collection_methods: &["GET", "POST"],
        resource_methods: &["GET", "PUT", "DELETE"],
    },
    TypeSchema {
        id: "externalHandler",
        plural: "externalhandlers",
        kind: Some(ResourceKind::ExternalHandler),
        fields: EXTERNAL_HANDLER,
        collection_methods: &["GET", "POST"],
        resource_methods: &["GET", "PUT", "DELETE"],
    },
];

/// The type behind a collection path segment (`containers`, and the original's `instances`).
pub fn by_plural(plural: &str) -> Option<&'static TypeSchema> {
    let plural = if plural == "instances" {
        "containers"
    } else {
        plural
    };
    RESOURCE_TYPES.iter().find(|schema| schema.plural == plural)
}

/// The schema of a resource kind.
pub fn of_kind(kind: ResourceKind) -> &'static TypeSchema {
    RESOURCE_TYPES
        .iter()
        .find(|schema| schema.kind == Some(kind))
        .expect("every kind has a schema")
}

/// Every field of a type, the common ones first.
pub fn fields_of(schema: &TypeSchema) -> impl Iterator<Item = &'static Field> {
    COMMON.iter().chain(schema.fields.iter())
}

/// A field by name.
pub fn field(schema: &TypeSchema, name: &str) -> Option<&'static Field> {
    fields_of(schema).find(|field| field.name == name)
}

fn field_json(field: &Field) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), json!(field.kind));
    out.insert("nullable".into(), json!(!field.required));
    out.insert("create".into(), json!(field.create));
    out.insert("update".into(), json!(field.update));
    out.insert("required".into(), json!(field.required));
    if field.name == "transitioning" {
        out.insert("options".into(), json!(["yes", "no", "error"]));
    }
    if field.name == "name" {
        // GDAPI's length limits; `check_name` also refuses control characters.
        out.insert("minLength".into(), json!(1));
        out.insert("maxLength".into(), json!(super::text::NAME_MAX));
    }
    if field.name == "description" {
        out.insert("maxLength".into(), json!(super::text::DESCRIPTION_MAX));
    }
    if field.name == "startOnCreate" {
        out.insert("default".into(), json!(true));
    }
    if field.name == "scale" {
        out.insert("default".into(), json!(crate::services::DEFAULT_SCALE));
        out.insert("min".into(), json!(0));
        out.insert("max".into(), json!(crate::services::MAX_SCALE));
    }
    Value::Object(out)
}

/// A schema object as `/v1/schemas` shows it.
pub fn render(base: &str, schema: &TypeSchema) -> Value {
    let mut fields = Map::new();
    let mut filters = Map::new();
    for field in fields_of(schema) {
        fields.insert(field.name.into(), field_json(field));
        if field.column.is_some() {
            filters.insert(
                field.name.into(),
                json!({"modifiers": ["eq", "ne", "null", "notnull", "like"]}),
            );
        }
    }
    let mut actions = Map::new();
    if let Some(kind) = schema.kind {
        for action in drover_engine::defs::all_actions(kind) {
            actions.insert(action.into(), json!({"input": null, "output": schema.id}));
        }
    }
    if schema.kind == Some(ResourceKind::Instance) {
        // Not a process: answers a URL and token for the log socket (`crate::logs`).
        actions.insert(
            crate::logs::ACTION.into(),
            json!({"input": "containerLogs", "output": "hostAccess"}),
        );
    }
    schema_json(
        base,
        schema.id,
        schema.plural,
        schema.collection_methods,
        schema.resource_methods,
        fields,
        actions,
        filters,
    )
}

/// A schema object from its parts.
#[allow(clippy::too_many_arguments)]
pub fn schema_json(
    base: &str,
    id: &str,
    plural: &str,
    collection_methods: &[&str],
    resource_methods: &[&str],
    fields: Map<String, Value>,
    actions: Map<String, Value>,
    filters: Map<String, Value>,
) -> Value {
    let mut links = Map::new();
    links.insert(
        "self".into(),
        json!(format!("{base}/schemas/{}", id.to_lowercase())),
    );
    if !collection_methods.is_empty() {
        links.insert("collection".into(), json!(format!("{base}/{plural}")));
    }
    json!({
        "id": id,
        "type": "schema",
        "links": links,
        "pluralName": plural,
        "collectionMethods": collection_methods,
        "resourceMethods": resource_methods,
        "resourceFields": fields,
        "resourceActions": actions,
        "collectionFilters": filters,
        "collectionActions": {},
    })
}
