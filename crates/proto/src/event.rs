//! The event: the one message type of the bus.
//!
//! The JSON is the original's, field by field: camelCase, empty fields omitted, unknown fields
//! ignored, `null` accepted for any field, `time` in epoch milliseconds. Old clients send a few
//! fields in looser shapes and those are accepted too: the Go library's `time` is a float, and
//! one of its versions typed `previousIds` as a single string; ids may arrive as numbers.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The reply-name prefix of server-originated calls (`reply.<n>`).
pub const REPLY_PREFIX: &str = "reply.";
/// The suffix of the "friendly" reply names (`<request name>.reply`).
pub const REPLY_SUFFIX: &str = ".reply";
/// The key in an error reply's `data` that marks the error permanent: `"permanent": true`
/// means the request can never succeed (e.g. the executable does not exist), so the caller
/// must not send it again. An error reply without it (every older client's) is retryable.
pub const PERMANENT: &str = "permanent";

/// The state an agent reports in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transitioning {
    /// Progress: the work goes on, and the reply keeps the call alive.
    Yes,
    /// Done.
    No,
    /// Failed: the attempt ends with the reply's message.
    Error,
}

/// One event on the bus, as it travels over the WebSocket and through `POST /v1/publish`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Event {
    /// A random UUID, set when the event is built.
    #[serde(deserialize_with = "lenient_string")]
    pub id: Option<String>,
    /// The event name, e.g. `compute.instance.activate` or `reply.123`. Required to publish.
    #[serde(deserialize_with = "lenient_string")]
    pub name: Option<String>,
    /// Where the reply goes; set only on requests that expect one.
    #[serde(deserialize_with = "lenient_string")]
    pub reply_to: Option<String>,
    /// The API id of the resource the event is about, e.g. `1i42`.
    #[serde(deserialize_with = "lenient_string")]
    pub resource_id: Option<String>,
    /// The API type of that resource, e.g. `container`.
    #[serde(deserialize_with = "lenient_string")]
    pub resource_type: Option<String>,
    /// The payload: any JSON.
    pub data: Option<Value>,
    /// On a reply, element 0 is the request's `id`.
    #[serde(deserialize_with = "lenient_string_list")]
    pub previous_ids: Vec<String>,
    /// On a reply, element 0 is the request's `name`.
    #[serde(deserialize_with = "lenient_string_list")]
    pub previous_names: Vec<String>,
    /// Who sent it, free text.
    #[serde(deserialize_with = "lenient_string")]
    pub publisher: Option<String>,
    /// `yes` (progress), `no` (done) or `error` (failed).
    pub transitioning: Option<Transitioning>,
    /// A human-readable progress or error message.
    #[serde(deserialize_with = "lenient_string")]
    pub transitioning_message: Option<String>,
    /// Internal error detail, e.g. `class:<exception>`.
    #[serde(deserialize_with = "lenient_string")]
    pub transitioning_internal_message: Option<String>,
    /// Progress in percent.
    #[serde(deserialize_with = "lenient_int")]
    pub transitioning_progress: Option<i64>,
    /// When the event was built, epoch milliseconds.
    #[serde(deserialize_with = "lenient_int")]
    pub time: Option<i64>,
    /// The caller's effective timeout for this request.
    #[serde(deserialize_with = "lenient_int")]
    pub timeout_millis: Option<i64>,
    /// A copy of the sender's logging context.
    pub context: Option<Value>,
}

impl Event {
    /// A new event with a fresh id, the given name and the current time.
    pub fn new(name: impl Into<String>) -> Self {
        Event {
            id: Some(uuid::Uuid::new_v4().to_string()),
            name: Some(name.into()),
            time: Some(now_millis()),
            ..Event::default()
        }
    }

    /// Sets `data`.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// Sets `resourceType` and `resourceId`.
    pub fn with_resource(
        mut self,
        resource_type: impl Into<String>,
        resource_id: impl Into<String>,
    ) -> Self {
        self.resource_type = Some(resource_type.into());
        self.resource_id = Some(resource_id.into());
        self
    }

    /// The name, or `""` when there is none.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// The id of the request this event replies to (`previousIds[0]`), the only key replies are
    /// matched on.
    pub fn reply_key(&self) -> Option<&str> {
        self.previous_ids.first().map(String::as_str)
    }

    /// Builds the reply to this request: `name` = `replyTo`, `previousIds`/`previousNames` with
    /// the request prepended, the resource copied, a fresh id and time, no data.
    /// Returns `None` when the request has no `replyTo` (nobody waits for an answer).
    pub fn reply(&self) -> Option<Event> {
        let reply_to = self.reply_to.as_deref().filter(|name| !name.is_empty())?;
        let mut previous_ids = Vec::with_capacity(self.previous_ids.len() + 1);
        previous_ids.extend(self.id.iter().cloned());
        previous_ids.extend(self.previous_ids.iter().cloned());
        let mut previous_names = Vec::with_capacity(self.previous_names.len() + 1);
        previous_names.extend(self.name.iter().cloned());
        previous_names.extend(self.previous_names.iter().cloned());
        Some(Event {
            id: Some(uuid::Uuid::new_v4().to_string()),
            name: Some(reply_to.to_owned()),
            resource_id: self.resource_id.clone(),
            resource_type: self.resource_type.clone(),
            previous_ids,
            previous_names,
            time: Some(now_millis()),
            ..Event::default()
        })
    }

    /// Turns a reply into an error reply: `transitioning: error` with `message` as
    /// `transitioningMessage`; a `permanent` one also gets `data.permanent: true` (see
    /// [`PERMANENT`]), keeping what `data` holds otherwise.
    pub fn into_error(mut self, message: impl Into<String>, permanent: bool) -> Event {
        self.transitioning = Some(Transitioning::Error);
        self.transitioning_message = Some(message.into());
        if permanent {
            match &mut self.data {
                Some(Value::Object(data)) => {
                    data.insert(PERMANENT.to_owned(), Value::Bool(true));
                }
                data => {
                    let mut object = serde_json::Map::new();
                    object.insert(PERMANENT.to_owned(), Value::Bool(true));
                    *data = Some(Value::Object(object));
                }
            }
        }
        self
    }

    /// Whether this is an error reply marked permanent: `transitioning: error` and
    /// `data.permanent` exactly `true` (see [`PERMANENT`]).
    pub fn is_permanent_error(&self) -> bool {
        self.transitioning == Some(Transitioning::Error)
            && self
                .data
                .as_ref()
                .and_then(|data| data.get(PERMANENT))
                .is_some_and(|flag| flag == &Value::Bool(true))
    }

    /// Serializes the event with another name in place of its own: how a qualified name's
    /// `;agent=` suffix is stripped on delivery without copying the event.
    pub fn to_json_with_name(&self, name: &str) -> String {
        serde_json::to_string(&Named { event: self, name }).expect("an event always serializes")
    }

    /// Serializes the event as it is.
    pub fn to_json(&self) -> String {
        self.to_json_with_name(self.name())
    }
}

/// The current time in epoch milliseconds.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Named {
            event: self,
            name: self.name(),
        }
        .serialize(serializer)
    }
}

/// An event seen under another name: the serialization of [`Event`] with `name` replaced.
struct Named<'a> {
    event: &'a Event,
    name: &'a str,
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|text| !text.is_empty())
}

impl Serialize for Named<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let event = self.event;
        let mut out = serializer.serialize_struct("Event", 16)?;
        macro_rules! text {
            ($key:literal, $field:expr) => {
                if let Some(text) = non_empty($field) {
                    out.serialize_field($key, text)?;
                }
            };
        }
        text!("id", &event.id);
        if !self.name.is_empty() {
            out.serialize_field("name", self.name)?;
        }
        text!("replyTo", &event.reply_to);
        text!("resourceId", &event.resource_id);
        text!("resourceType", &event.resource_type);
        if let Some(data) = event.data.as_ref().filter(|data| !data.is_null()) {
            out.serialize_field("data", data)?;
        }
        if !event.previous_ids.is_empty() {
            out.serialize_field("previousIds", &event.previous_ids)?;
        }
        if !event.previous_names.is_empty() {
            out.serialize_field("previousNames", &event.previous_names)?;
        }
        text!("publisher", &event.publisher);
        if let Some(transitioning) = event.transitioning {
            out.serialize_field("transitioning", &transitioning)?;
        }
        text!("transitioningMessage", &event.transitioning_message);
        text!(
            "transitioningInternalMessage",
            &event.transitioning_internal_message
        );
        if let Some(progress) = event.transitioning_progress {
            out.serialize_field("transitioningProgress", &progress)?;
        }
        if let Some(time) = event.time {
            out.serialize_field("time", &time)?;
        }
        if let Some(timeout) = event.timeout_millis {
            out.serialize_field("timeoutMillis", &timeout)?;
        }
        if let Some(context) = event.context.as_ref().filter(|context| !context.is_null()) {
            out.serialize_field("context", context)?;
        }
        out.end()
    }
}

/// A string, or a number written as one (`"resourceId": 2`), or null.
fn lenient_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string, a number or null")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(V)
        }
    }
    deserializer.deserialize_option(V)
}

/// An integer, or a float with a whole value (the Go library's `time` is a float64), or null.
fn lenient_int<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number or null")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            i64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom("number out of range"))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if v.is_finite() && v.abs() < 9.0e18 {
                Ok(Some(v.round() as i64))
            } else {
                Err(E::custom("number out of range"))
            }
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(V)
        }
    }
    deserializer.deserialize_option(V)
}

/// A list of strings, a single string (one version of the Go library), or null.
fn lenient_string_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<Option<String>>),
    }
    Ok(match Option::<OneOrMany>::deserialize(deserializer)? {
        None => Vec::new(),
        Some(OneOrMany::One(id)) if id.is_empty() => Vec::new(),
        Some(OneOrMany::One(id)) => vec![id],
        Some(OneOrMany::Many(ids)) => ids.into_iter().flatten().collect(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn python_agent_ping_fixture_parses() {
        // The shape of python-agent's tests/docker/ping, with its `"context": null`.
        let text = r#"{"id":"1ed2b2d8-2f6c-4a11-a4ef-000000000001","name":"ping","replyTo":"ping.reply",
            "resourceId":"2","resourceType":"agent","previousIds":null,"previousNames":null,
            "data":{"resources":[],"options":{"resources":true,"instances":true,"stats":true}},
            "publisher":null,"transitioning":null,"transitioningMessage":null,
            "transitioningProgress":null,"time":1470000000000,"context":null,"somethingNew":1}"#;
        let event: Event = serde_json::from_str(text).unwrap();
        assert_eq!(event.name(), "ping");
        assert_eq!(event.reply_to.as_deref(), Some("ping.reply"));
        assert_eq!(event.resource_id.as_deref(), Some("2"));
        assert_eq!(event.time, Some(1_470_000_000_000));
        assert!(event.previous_ids.is_empty());
        assert!(event.context.is_none());
        assert_eq!(
            event.data.as_ref().unwrap()["options"]["instances"],
            json!(true)
        );
    }

    #[test]
    fn go_subscriber_reply_parses() {
        // events.NewReplyEvent plus a float64 time, as the Go library sends it.
        let text = r#"{"name":"reply.8812","id":"a","previousIds":["req-1"],"data":{"x":1},
            "time":1.47e12,"transitioning":"error","transitioningMessage":"boom"}"#;
        let event: Event = serde_json::from_str(text).unwrap();
        assert_eq!(event.reply_key(), Some("req-1"));
        assert_eq!(event.time, Some(1_470_000_000_000));
        assert_eq!(event.transitioning, Some(Transitioning::Error));
        // One Go version typed previousIds as a string.
        let event: Event =
            serde_json::from_str(r#"{"name":"reply.1","previousIds":"req-2"}"#).unwrap();
        assert_eq!(event.previous_ids, vec!["req-2".to_owned()]);
        let event: Event = serde_json::from_str(r#"{"name":"reply.1","resourceId":7}"#).unwrap();
        assert_eq!(event.resource_id.as_deref(), Some("7"));
    }

    #[test]
    fn empty_fields_are_omitted() {
        let event = Event {
            id: Some("e1".into()),
            name: Some("ping".into()),
            reply_to: Some(String::new()),
            time: Some(5),
            ..Event::default()
        };
        assert_eq!(event.to_json(), r#"{"id":"e1","name":"ping","time":5}"#);
    }

    #[test]
    fn reply_is_built_as_the_original_builds_it() {
        let request = Event {
            id: Some("req".into()),
            name: Some("compute.instance.activate".into()),
            reply_to: Some("reply.77".into()),
            resource_id: Some("1i4".into()),
            resource_type: Some("container".into()),
            previous_ids: vec!["older".into()],
            data: Some(json!({"instance": {}})),
            ..Event::default()
        };
        let reply = request.reply().unwrap();
        assert_eq!(reply.name(), "reply.77");
        assert_eq!(
            reply.previous_ids,
            vec!["req".to_owned(), "older".to_owned()]
        );
        assert_eq!(
            reply.previous_names,
            vec!["compute.instance.activate".to_owned()]
        );
        assert_eq!(reply.resource_id.as_deref(), Some("1i4"));
        assert!(reply.data.is_none());
        assert_ne!(reply.id, request.id);
        assert!(Event::new("x").reply().is_none());
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let event = Event {
            id: Some("i".into()),
            name: Some("n".into()),
            reply_to: Some("r".into()),
            resource_id: Some("1i1".into()),
            resource_type: Some("container".into()),
            data: Some(json!({"a": [1, 2]})),
            previous_ids: vec!["p".into()],
            previous_names: vec!["q".into()],
            publisher: Some("me".into()),
            transitioning: Some(Transitioning::Yes),
            transitioning_message: Some("half".into()),
            transitioning_internal_message: Some("class:X".into()),
            transitioning_progress: Some(50),
            time: Some(1),
            timeout_millis: Some(2),
            context: Some(json!({"k": "v"})),
        };
        let back: Event = serde_json::from_str(&event.to_json()).unwrap();
        assert_eq!(back, event);
        let renamed: Event = serde_json::from_str(&event.to_json_with_name("m")).unwrap();
        assert_eq!(renamed.name(), "m");
    }

    #[test]
    fn numbers_in_data_round_trip_exactly() {
        // Found by fuzzing: serde_json's default float parsing is off by an ulp for some inputs.
        let text = r#"{"name":"a","data":{"i":2e-34,"f":0.30000000000000004,"g":-8.623157e307}}"#;
        let event: Event = serde_json::from_str(text).unwrap();
        assert_eq!(event.data.as_ref().unwrap()["i"].as_f64(), Some(2e-34));
        let back: Event = serde_json::from_str(&event.to_json()).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.to_json(), event.to_json());
    }

    #[test]
    fn an_error_reply_is_permanent_only_when_marked() {
        let request = Event {
            id: Some("req".into()),
            reply_to: Some("reply.1".into()),
            ..Event::default()
        };
        let permanent = request.reply().unwrap().into_error("no such file", true);
        assert_eq!(permanent.transitioning, Some(Transitioning::Error));
        assert_eq!(
            permanent.transitioning_message.as_deref(),
            Some("no such file")
        );
        assert!(permanent.is_permanent_error());
        let text = permanent.to_json();
        assert!(text.contains(r#""data":{"permanent":true}"#), "{text}");
        let back: Event = serde_json::from_str(&text).unwrap();
        assert!(back.is_permanent_error());
        // Other data is kept.
        let kept = request
            .reply()
            .unwrap()
            .with_data(json!({"x": 1}))
            .into_error("bad", true);
        assert_eq!(kept.data, Some(json!({"x": 1, "permanent": true})));
        // Old clients' error replies, and anything but `true`, stay retryable.
        let retryable = request.reply().unwrap().into_error("disk full", false);
        assert!(!retryable.is_permanent_error());
        assert!(retryable.data.is_none());
        let old: Event = serde_json::from_str(
            r#"{"name":"reply.1","transitioning":"error","transitioningMessage":"boom","data":{"permanent":"true"}}"#,
        )
        .unwrap();
        assert!(!old.is_permanent_error());
        let not_an_error: Event =
            serde_json::from_str(r#"{"name":"reply.1","data":{"permanent":true}}"#).unwrap();
        assert!(!not_an_error.is_permanent_error());
    }

    #[test]
    fn bad_transitioning_value_is_an_error() {
        assert!(
            serde_json::from_str::<Event>(r#"{"name":"reply.1","transitioning":"maybe"}"#).is_err()
        );
        assert!(serde_json::from_str::<Event>(r#"{"name":"reply.1","time":"soon"}"#).is_err());
    }
}
