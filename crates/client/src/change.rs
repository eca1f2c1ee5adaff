//! [`ResourceChange`]: a `resource.change` event, unpacked.

use drover_proto::Event;
use serde_json::Value;

use crate::{Error, Result};

/// A `resource.change` event: which resource changed and the resource itself, as the API
/// renders it to the subscriber (`data.resource`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceChange {
    /// The API type, e.g. `container`.
    pub resource_type: String,
    /// The API id, e.g. `1i42`.
    pub resource_id: String,
    /// The full resource (`data.resource`).
    pub resource: Value,
    /// The change's stream position (`data.position`): increasing, cluster-wide; what a
    /// subscription resumes from (`Subscribe::resume_from`).
    pub position: Option<i64>,
}

impl ResourceChange {
    /// Unpacks a `resource.change` event. `None` when it carries no `data.resource` (the
    /// server always sends one; the original dropped the event for subscribers that could not
    /// see the resource). The type and id come from the event, or else from the resource's own
    /// `type` and `id` fields.
    pub fn from_event(event: &Event) -> Option<ResourceChange> {
        let resource = event.data.as_ref()?.get("resource")?;
        if !resource.is_object() {
            return None;
        }
        let field = |own: &Option<String>, key: &str| {
            own.as_deref()
                .filter(|text| !text.is_empty())
                .map(str::to_owned)
                .or_else(|| resource.get(key).and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_default()
        };
        Some(ResourceChange {
            resource_type: field(&event.resource_type, "type"),
            resource_id: field(&event.resource_id, "id"),
            resource: resource.clone(),
            position: position(event),
        })
    }

    /// The resource as a typed value.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.resource).map_err(|error| {
            Error::Invalid(format!(
                "{} {} does not parse: {error}",
                self.resource_type, self.resource_id
            ))
        })
    }
}

/// The stream position of a `resource.change` event (`data.position`).
pub fn position(event: &Event) -> Option<i64> {
    event.data.as_ref()?.get("position")?.as_i64()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unpacks_and_parses() {
        let event = Event::new("resource.change")
            .with_resource("container", "1i5")
            .with_data(json!({"resource": {"id": "1i5", "type": "container", "state": "running"}, "position": 42}));
        let change = ResourceChange::from_event(&event).unwrap();
        assert_eq!(change.position, Some(42));
        assert_eq!(change.resource_type, "container");
        assert_eq!(change.resource_id, "1i5");
        #[derive(serde::Deserialize)]
        struct Container {
            state: String,
        }
        assert_eq!(change.parse::<Container>().unwrap().state, "running");
        assert!(change.parse::<Vec<i64>>().is_err());
    }

    #[test]
    fn falls_back_to_the_resources_own_type_and_id() {
        let event = Event::new("resource.change")
            .with_data(json!({"resource": {"id": "1h2", "type": "host"}}));
        let change = ResourceChange::from_event(&event).unwrap();
        assert_eq!(
            (change.resource_type.as_str(), change.resource_id.as_str()),
            ("host", "1h2")
        );
        assert!(ResourceChange::from_event(&Event::new("resource.change")).is_none());
        assert!(
            ResourceChange::from_event(
                &Event::new("resource.change").with_data(json!({"resource": 5}))
            )
            .is_none()
        );
    }
}
