//! The plain JSON of a resource: its fields and data, with API ids. Agents receive this in
//! requests (`data.instance`); the server's API adds `type`, `links` and `actions`.

use drover_proto::ids;
use drover_store::{Resource, ResourceKind};
use serde_json::{Map, Value, json};

/// Fields a client may not set through `data` because they are the resource's own.
pub const RESERVED: &[&str] = &[
    "id",
    "type",
    "state",
    "uuid",
    "kind",
    "accountId",
    "created",
    "createdTS",
    "removed",
    "lastPing",
    "lastPingTS",
    "transitioning",
    "transitioningMessage",
    "transitioningProgress",
    "links",
    "actions",
    "hostId",
    "agentId",
    "stackId",
    "serviceId",
    "instanceId",
    "name",
    "description",
];

/// The resource as a JSON object with camelCase fields and API ids.
pub fn resource_json(resource: &Resource) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in &resource.data {
        if !RESERVED.contains(&key.as_str()) {
            out.insert(key.clone(), value.clone());
        }
    }
    out.insert(
        "id".into(),
        json!(ids::format(resource.kind.api_type(), resource.id)),
    );
    out.insert("name".into(), json!(resource.name));
    out.insert("description".into(), json!(resource.description));
    out.insert("kind".into(), json!(resource.sub_kind));
    out.insert("uuid".into(), json!(resource.uuid));
    out.insert("state".into(), json!(resource.state));
    out.insert(
        "accountId".into(),
        json!(resource.account_id.map(|id| ids::format("project", id))),
    );
    out.insert("created".into(), json!(rfc3339(resource.created)));
    out.insert("createdTS".into(), json!(resource.created));
    out.insert("removed".into(), json!(resource.removed.map(rfc3339)));
    if resource.kind == ResourceKind::Agent {
        out.insert("lastPing".into(), json!(resource.last_ping.map(rfc3339)));
        out.insert("lastPingTS".into(), json!(resource.last_ping));
    }
    out.insert("transitioning".into(), json!(resource.transitioning));
    out.insert(
        "transitioningMessage".into(),
        json!(resource.transitioning_message),
    );
    out.insert(
        "transitioningProgress".into(),
        json!(resource.transitioning_progress),
    );
    for (field, api_type, value) in [
        ("hostId", "host", resource.host_id),
        ("agentId", "agent", resource.agent_id),
        ("stackId", "stack", resource.stack_id),
        ("serviceId", "service", resource.service_id),
        ("instanceId", "container", resource.instance_id),
    ] {
        let column = match field {
            "hostId" => "host_id",
            "agentId" => "agent_id",
            "stackId" => "stack_id",
            "serviceId" => "service_id",
            _ => "instance_id",
        };
        if resource.kind.has_column(column) {
            out.insert(
                field.into(),
                json!(value.map(|id| ids::format(api_type, id))),
            );
        }
    }
    if resource.kind == ResourceKind::Instance {
        out.entry("command").or_insert(Value::Null);
        out.entry("environment").or_insert_with(|| json!({}));
        out.entry("labels").or_insert_with(|| json!({}));
        // How it ended (set from the agent's reports; null until it has ended once).
        for field in ["exitCode", "finishedAt", "agentMessage", "agentState"] {
            out.entry(field).or_insert(Value::Null);
        }
    }
    out
}

/// Epoch milliseconds as RFC 3339 (UTC, seconds).
pub fn rfc3339(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|time| time.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_627_500_112), "2026-11-25T17:25:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
