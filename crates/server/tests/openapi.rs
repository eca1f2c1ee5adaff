//! `/v1/openapi.json` against `/v1/schemas` of the same server: every type, collection,
//! method, filter and action the schemas list is in the document, every `$ref` resolves, and
//! every path it describes is one the server routes. So the document cannot drift from the
//! API (CI also runs a validator on it: `.ci/openapi`).

use drover_test_support::TestServer;
use serde_json::Value;

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every `$ref` in `value`.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(target)) => out.push(target.clone()),
                    _ => refs(value, out),
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|item| refs(item, out)),
        _ => {}
    }
}

/// The names of an operation's query parameters (and its path's).
fn query_params(path_item: &Value, operation: &Value) -> Vec<String> {
    [&path_item["parameters"], &operation["parameters"]]
        .into_iter()
        .flat_map(|list| list.as_array().cloned().unwrap_or_default())
        .filter(|param| param["in"] == "query")
        .filter_map(|param| param["name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn the_openapi_document_covers_every_type_collection_method_filter_and_action_of_the_schemas()
{
    let server = TestServer::start().await;
    let schemas = server.admin.get("schemas").await.unwrap();
    let doc = server.admin.get("openapi.json").await.unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    let base = format!("{}/v1", server.url);
    assert_eq!(doc["servers"][0]["url"], base.as_str());
    assert_eq!(
        doc["components"]["securitySchemes"]["apiKey"]["scheme"],
        "basic"
    );
    let components = &doc["components"]["schemas"];
    let paths = &doc["paths"];
    let list = schemas["data"].as_array().unwrap();
    assert!(list.len() > 10, "{schemas:#}");
    let mut checked_actions = 0;
    let mut checked_filters = 0;
    for schema in list {
        let id = schema["id"].as_str().unwrap();
        let component = &components[id];
        assert!(component.is_object(), "no component for {id}");
        let fields = schema["resourceFields"].as_object().unwrap();
        for (name, field) in fields {
            let property = &component["properties"][name];
            assert!(property.is_object(), "{id}.{name} is not in its component");
            assert_eq!(
                property["nullable"].as_bool().unwrap_or(false),
                field["nullable"].as_bool().unwrap_or(true),
                "{id}.{name}: nullable"
            );
            if let Some(options) = field["options"].as_array() {
                for option in options {
                    assert!(
                        strings(&property["enum"]).contains(&option.as_str().unwrap().to_owned()),
                        "{id}.{name}: option {option} not in the enum"
                    );
                }
            }
        }
        let collection_methods = strings(&schema["collectionMethods"]);
        let resource_methods = strings(&schema["resourceMethods"]);
        if collection_methods.contains(&"POST".to_owned()) && id != "publish" {
            let create = &components[format!("{id}Create")];
            let mut required: Vec<String> = fields
                .iter()
                .filter(|(_, field)| field["create"] == true && field["required"] == true)
                .map(|(name, _)| name.clone())
                .collect();
            required.sort();
            let mut listed = strings(&create["required"]);
            listed.sort();
            assert_eq!(listed, required, "{id}: required on create");
            for (name, field) in fields {
                assert_eq!(
                    create["properties"][name].is_object(),
                    field["create"] == true,
                    "{id}.{name}: in the create body if and only if settable on create"
                );
            }
        }
        let Some(collection) = schema["links"]["collection"].as_str() else {
            assert!(collection_methods.is_empty(), "{id} has methods, no link");
            continue;
        };
        let collection = collection
            .strip_prefix(&base)
            .unwrap_or_else(|| panic!("{id}: {collection} is not under {base}"));
        let path_item = &paths[collection];
        for method in &collection_methods {
            assert!(
                path_item[method.to_lowercase()].is_object(),
                "{id}: {method} {collection} is not in the document"
            );
        }
        if collection_methods.contains(&"GET".to_owned()) {
            let params = query_params(path_item, &path_item["get"]);
            for (filter, spec) in schema["collectionFilters"].as_object().unwrap() {
                for modifier in strings(&spec["modifiers"]) {
                    let param = if modifier == "eq" {
                        filter.clone()
                    } else {
                        format!("{filter}_{modifier}")
                    };
                    assert!(
                        params.contains(&param),
                        "{id}: filter {param} is not a parameter of GET {collection}"
                    );
                    checked_filters += 1;
                }
            }
        }
        let item_path = format!("{collection}/{{id}}");
        let item = &paths[&item_path];
        for method in &resource_methods {
            assert!(
                item[method.to_lowercase()].is_object(),
                "{id}: {method} {item_path} is not in the document"
            );
        }
        let actions = schema["resourceActions"].as_object().unwrap();
        let collection_actions = schema["collectionActions"].as_object().unwrap();
        let on_item = !resource_methods.is_empty();
        let mut every_action: Vec<(&String, &Value, bool)> = actions
            .iter()
            .map(|(name, io)| (name, io, on_item))
            .collect();
        every_action.extend(
            collection_actions
                .iter()
                .map(|(name, io)| (name, io, false)),
        );
        for (name, io, on_item) in every_action {
            let operation = if on_item {
                &item["post"]
            } else {
                &path_item["post"]
            };
            let param = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|param| param["name"] == "action")
                .unwrap_or_else(|| panic!("{id}: no action parameter for {name}"));
            assert!(
                strings(&param["schema"]["enum"]).contains(name),
                "{id}: action {name} is not in the document"
            );
            assert_eq!(
                &operation["x-drover-actions"][name], io,
                "{id}: action {name}'s input and output"
            );
            checked_actions += 1;
        }
    }
    assert!(checked_actions >= 5 && checked_filters >= 20);
    // The bus's endpoints.
    for (path, method) in [
        ("/subscribe", "get"),
        ("/projects/{projectId}/subscribe", "get"),
        ("/publish", "post"),
        ("/projects/{projectId}/publish", "post"),
        ("/projects/{projectId}/containers/{id}", "post"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path}");
    }
    // Every reference resolves.
    let mut targets = Vec::new();
    refs(&doc, &mut targets);
    assert!(!targets.is_empty());
    for target in targets {
        let pointer = target
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{target} is not a reference within the document"));
        assert!(
            doc.pointer(pointer).is_some_and(Value::is_object),
            "{target} does not resolve"
        );
    }

    // Every path the document describes is routed by the server (whatever the answer for a
    // made-up id, it is not the router's "no such resource").
    let project = server.server.state.default_project.id;
    for (path, item) in paths.as_object().unwrap() {
        let concrete = path
            .replace("{projectId}", &format!("1a{project}"))
            .replace("{id}", "1zz999");
        for method in ["get", "post", "put", "delete"] {
            if item[method].is_null() {
                continue;
            }
            let result = match method {
                "get" => server.admin.get(&concrete).await,
                "post" => server.admin.post(&concrete, &serde_json::json!({})).await,
                "put" => server.admin.put(&concrete, &serde_json::json!({})).await,
                _ => server.admin.delete(&concrete).await,
            };
            if let Err(drover_client::Error::Api {
                status, message, ..
            }) = &result
            {
                assert!(
                    !(*status == 404 && message.starts_with("no such resource")) && *status != 405,
                    "{method} {path} is not routed: {status} {message}"
                );
            }
        }
    }
}

#[tokio::test]
async fn the_document_is_also_at_v2_beta_and_needs_a_key() {
    let server = TestServer::start().await;
    let v2 = server
        .admin
        .with_key_at(&format!("{}/v2-beta", server.url))
        .unwrap();
    let doc = v2.get("openapi.json").await.unwrap();
    assert_eq!(
        doc["servers"][0]["url"],
        format!("{}/v2-beta", server.url).as_str()
    );
    let v1 = server.admin.get("openapi.json").await.unwrap();
    assert_eq!(doc["paths"], v1["paths"]);
    let anonymous = drover_client::Client::new(&server.url, "nobody", "nothing").unwrap();
    assert!(matches!(
        anonymous.get("openapi.json").await,
        Err(drover_client::Error::Api { status: 401, .. })
    ));
}
