//! Text every store can keep. PostgreSQL's `text` cannot hold NUL (U+0000); every other Unicode
//! scalar value is storable in a UTF-8 database (and lone surrogates never get past the JSON
//! parser). So NUL is refused at the two doors text comes in by, on every backend alike: JSON
//! bodies ([`super::ApiJson`], any string or map key, however deep) and the URL (path and query,
//! so every filter), with `422 InvalidCharacters` naming the field.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::ApiError;
use crate::state::AppState;

/// The error for text holding NUL, naming the field (a JSON path such as `data.labels.x` or
/// `command[1]`, or a query parameter).
pub(crate) fn nul_error(field: &str) -> ApiError {
    ApiError::invalid(
        "InvalidCharacters",
        field,
        format!("{field} contains a NUL character (U+0000), which cannot be stored"),
    )
    .with_detail("NUL is refused in every string, map key and query parameter")
}

/// Whether JSON text holds an escaped NUL: `\u0000` whose backslash is not itself escaped.
/// (A raw NUL byte is not valid JSON; the parser refuses it.)
pub(crate) fn json_has_nul(bytes: &[u8]) -> bool {
    bytes.windows(6).enumerate().any(|(at, window)| {
        window == b"\\u0000" && {
            let backslashes = bytes[..at]
                .iter()
                .rev()
                .take_while(|b| **b == b'\\')
                .count();
            backslashes % 2 == 0
        }
    })
}

/// The path of the first string or key holding NUL in `value`.
pub(crate) fn nul_field(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(text) if text.contains('\0') => Some(if path.is_empty() {
            "body".to_owned()
        } else {
            path.to_owned()
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| nul_field(item, &format!("{path}[{index}]"))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let shown = key.replace('\0', "\\u0000");
            let here = if path.is_empty() {
                shown
            } else {
                format!("{path}.{shown}")
            };
            if key.contains('\0') {
                Some(here)
            } else {
                nul_field(item, &here)
            }
        }),
        _ => None,
    }
}

/// Refuses a JSON body with NUL in any string or key (cheap when there is none: one scan of
/// the bytes; the body is parsed for the field's name only when there is one).
pub(crate) fn check_json(state: &AppState, bytes: &[u8]) -> Result<(), ApiError> {
    if !json_has_nul(bytes) {
        return Ok(());
    }
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
        // Not JSON: the caller's parser says what is wrong with it.
        return Ok(());
    };
    match nul_field(&value, "") {
        Some(field) => {
            state.metrics.bad_input.increment(1);
            Err(nul_error(&field))
        }
        None => Ok(()),
    }
}

/// Middleware: refuses a request whose path or query string decodes to NUL (`%00`), before
/// any handler sees it.
pub(crate) async fn reject_nul_in_url(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(field) = url_nul_field(request.uri()) {
        state.metrics.bad_input.increment(1);
        return nul_error(&field).into_response();
    }
    next.run(request).await
}

/// The query parameter (or `path`) of a URI that decodes to NUL.
fn url_nul_field(uri: &axum::http::Uri) -> Option<String> {
    if uri.path().contains("%00") {
        return Some("path".to_owned());
    }
    let query = uri.query().filter(|query| query.contains("%00"))?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, value)| key.contains('\0') || value.contains('\0'))
        .map(|(key, _)| key.replace('\0', "\\u0000"))
}

/// The longest name a resource, project, key or host may have, in characters.
pub(crate) const NAME_MAX: usize = 255;
/// The longest description, in characters.
pub(crate) const DESCRIPTION_MAX: usize = 1024;

/// Whether a character breaks a line or a terminal when printed: control characters (C0, DEL,
/// C1) and the Unicode line and paragraph separators.
fn breaks_layout(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Checks a name: 1 to [`NAME_MAX`] characters, none of them a control character, so that one
/// name can neither break a table in the UI nor a line of `drover ps`. `null` (no name) is
/// the caller's to allow.
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::invalid(
            "MinLengthExceeded",
            field,
            format!("{field} must not be empty or blank (leave it out for no name)"),
        ));
    }
    let length = name.chars().count();
    if length > NAME_MAX {
        return Err(ApiError::invalid(
            "MaxLengthExceeded",
            field,
            format!("{field} is {length} characters long; at most {NAME_MAX} are allowed"),
        ));
    }
    if let Some(at) = name.chars().position(breaks_layout) {
        return Err(ApiError::invalid(
            "InvalidCharacters",
            field,
            format!(
                "{field} contains a control character (at character {at}); names are one line of printable text"
            ),
        ));
    }
    Ok(())
}

/// Checks a description: at most [`DESCRIPTION_MAX`] characters; line breaks and tabs are
/// allowed, other control characters are not.
pub(crate) fn check_description(field: &str, text: &str) -> Result<(), ApiError> {
    let length = text.chars().count();
    if length > DESCRIPTION_MAX {
        return Err(ApiError::invalid(
            "MaxLengthExceeded",
            field,
            format!("{field} is {length} characters long; at most {DESCRIPTION_MAX} are allowed"),
        ));
    }
    if let Some(at) = text
        .chars()
        .position(|c| breaks_layout(c) && !matches!(c, '\n' | '\t'))
    {
        return Err(ApiError::invalid(
            "InvalidCharacters",
            field,
            format!("{field} contains a control character (at character {at})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_one_line_of_printable_text_of_bounded_length() {
        assert!(check_name("name", "web-1").is_ok());
        assert!(check_name("name", "ünïcödé ✓ name").is_ok());
        assert!(check_name("name", &"é".repeat(NAME_MAX)).is_ok());
        assert!(check_name("name", &"é".repeat(NAME_MAX + 1)).is_err());
        for bad in [
            "",
            "  ",
            "a\nb",
            "a\tb",
            "a\rb",
            "a\u{1b}[31mred",
            "a\u{7f}",
            "a\u{85}b",
            "a\u{2028}b",
        ] {
            assert!(check_name("name", bad).is_err(), "{bad:?} was accepted");
        }
        assert!(check_description("description", "two\nlines\tand a tab").is_ok());
        assert!(check_description("description", "bell\u{7}").is_err());
        assert!(check_description("description", &"x".repeat(DESCRIPTION_MAX + 1)).is_err());
    }

    #[test]
    fn escaped_nul_is_found_and_an_escaped_backslash_is_not_one() {
        assert!(json_has_nul(br#"{"name":"a\u0000b"}"#));
        assert!(json_has_nul(br#"{"name":"\\\u0000"}"#));
        assert!(!json_has_nul(br#"{"name":"\\u0000"}"#));
        assert!(!json_has_nul(br#"{"name":"u0000 \u0001"}"#));
    }

    #[test]
    fn the_field_is_named_however_deep() {
        assert_eq!(
            nul_field(&json!({"name": "a\u{0}"}), ""),
            Some("name".into())
        );
        assert_eq!(
            nul_field(&json!({"data": {"labels": {"a": "x\u{0}"}}}), ""),
            Some("data.labels.a".into())
        );
        assert_eq!(
            nul_field(&json!({"command": ["sh", "-c\u{0}"]}), ""),
            Some("command[1]".into())
        );
        assert_eq!(
            nul_field(&json!({"labels": {"k\u{0}": "v"}}), ""),
            Some("labels.k\\u0000".into())
        );
        assert_eq!(nul_field(&json!({"name": "fine"}), ""), None);
    }

    #[test]
    fn url_parameters_and_paths_with_nul_are_named() {
        let uri: axum::http::Uri = "/v1/containers?state=running&name=a%00b".parse().unwrap();
        assert_eq!(url_nul_field(&uri), Some("name".into()));
        let uri: axum::http::Uri = "/v1/containers/1i%00".parse().unwrap();
        assert_eq!(url_nul_field(&uri), Some("path".into()));
        let uri: axum::http::Uri = "/v1/containers?name=a%2500".parse().unwrap();
        assert_eq!(url_nul_field(&uri), None);
    }
}
