//! Rendering resources and collections in the GDAPI shape.

use serde_json::{Map, Value, json};

/// A collection: `{type:"collection", resourceType, links, data}`.
pub fn collection(resource_type: &str, self_link: String, data: Vec<Value>) -> Value {
    json!({
        "type": "collection",
        "resourceType": resource_type,
        "links": {"self": self_link},
        "createTypes": {},
        "actions": {},
        "data": data,
        "sortLinks": {},
        "pagination": null,
        "sort": null,
        "filters": {},
    })
}

/// Adds `type`, `links.self` and an empty `actions` to a resource's fields.
pub fn resource(
    resource_type: &str,
    id: &str,
    self_link: String,
    mut fields: Map<String, Value>,
) -> Value {
    fields.insert("id".into(), Value::String(id.to_owned()));
    fields.insert("type".into(), Value::String(resource_type.to_owned()));
    fields.insert("links".into(), json!({"self": self_link}));
    fields.entry("actions").or_insert_with(|| json!({}));
    Value::Object(fields)
}

/// An epoch-ms time as the API shows it: RFC 3339 in `created`, the number in `createdTS`.
pub fn rfc3339(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|time| time.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}
