//! Event JSON decoding and the round trip through the encoder.

use drover_proto::Event;

/// Decodes `data` as an event; whatever decodes must survive a round trip. Returns whether
/// `data` decoded.
pub fn event(data: &[u8]) -> bool {
    let Ok(event) = serde_json::from_slice::<Event>(data) else {
        return false;
    };
    let text = event.to_json();
    let back: Event = serde_json::from_str(&text).unwrap_or_else(|error| {
        panic!("the encoding of {event:?} does not decode: {error}\n{text}")
    });
    assert_eq!(
        back,
        normal_form(&event),
        "decode(encode(e)) is not e (modulo empty fields)\nencoded: {text}"
    );
    assert_eq!(back.to_json(), text, "encoding is not stable");

    // Delivery under the stripped name (the scope `;agent=…`/`;account=…` removed) changes the
    // name and nothing else.
    let stripped = drover_proto::names::strip_scope(event.name());
    let renamed: Event = serde_json::from_str(&event.to_json_with_name(stripped))
        .expect("an event renamed on delivery decodes");
    assert_eq!(
        renamed,
        Event {
            name: Some(stripped.to_owned()).filter(|name| !name.is_empty()),
            ..normal_form(&event)
        }
    );

    if let Some(reply) = event.reply() {
        assert_eq!(reply.name.as_deref(), event.reply_to.as_deref());
        assert_eq!(
            reply.reply_key(),
            event
                .id
                .as_deref()
                .or(event.previous_ids.first().map(String::as_str))
        );
        let decoded: Event = serde_json::from_str(&reply.to_json()).expect("a reply decodes");
        assert_eq!(decoded.previous_ids, reply.previous_ids);
    }
    true
}

/// The event as the encoder writes it: empty text fields are left out (the original's
/// `omitempty`), so they decode as absent.
fn normal_form(event: &Event) -> Event {
    let text = |value: &Option<String>| value.clone().filter(|text| !text.is_empty());
    Event {
        id: text(&event.id),
        name: text(&event.name),
        reply_to: text(&event.reply_to),
        resource_id: text(&event.resource_id),
        resource_type: text(&event.resource_type),
        publisher: text(&event.publisher),
        transitioning_message: text(&event.transitioning_message),
        transitioning_internal_message: text(&event.transitioning_internal_message),
        ..event.clone()
    }
}
