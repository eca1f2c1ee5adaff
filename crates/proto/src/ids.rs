//! API ids in the original's style: `1` + a per-type prefix + the database id (`1i42`).
//!
//! The database keeps plain integers; the API shows and accepts the prefixed form, and accepts
//! a plain number too, as the original did for some clients.

/// The prefix of each API type's ids.
pub fn prefix(api_type: &str) -> Option<&'static str> {
    Some(match api_type {
        "account" | "project" => "a",
        "agent" => "ag",
        "host" => "h",
        "container" | "instance" => "i",
        "volume" => "v",
        "stack" => "st",
        "service" => "s",
        "credential" | "apiKey" | "registrationToken" => "c",
        "processInstance" => "pi",
        "processExecution" => "pe",
        "containerEvent" => "ce",
        "serviceEvent" => "se",
        "externalHandler" => "eh",
        _ => return None,
    })
}

/// Formats a database id as an API id of the given type.
pub fn format(api_type: &str, id: i64) -> String {
    match prefix(api_type) {
        Some(prefix) => format!("1{prefix}{id}"),
        None => id.to_string(),
    }
}

/// Parses an API id of the given type (or a plain number) back to the database id.
pub fn parse(api_type: &str, text: &str) -> Option<i64> {
    if let Ok(id) = text.parse::<i64>() {
        return (id > 0).then_some(id);
    }
    let rest = text.strip_prefix('1')?.strip_prefix(prefix(api_type)?)?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok().filter(|id| *id > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        assert_eq!(format("container", 42), "1i42");
        assert_eq!(parse("container", "1i42"), Some(42));
        assert_eq!(parse("project", "1a5"), Some(5));
        assert_eq!(parse("agent", "1ag7"), Some(7));
        assert_eq!(parse("agent", "7"), Some(7));
        assert_eq!(parse("container", "1h42"), None);
        assert_eq!(parse("container", "1i"), None);
        assert_eq!(parse("container", "1i4x"), None);
        assert_eq!(parse("container", "-3"), None);
    }
}
