//! One line per error, saying what to do: an unreachable server, a refused key, a missing key,
//! the API's own message; never a chain of "Caused by".

use drover_client::Error;

/// The one line `drover` prints for an error (after `drover: `).
pub fn one_line(error: &anyhow::Error) -> String {
    for (depth, cause) in error.chain().enumerate() {
        if let Some(client) = cause.downcast_ref::<Error>() {
            let text = client_error(client);
            // A context the command added stays in front of the client's message.
            return if depth == 0 {
                text
            } else {
                format!("{}: {text}", flatten(&error.to_string()))
            };
        }
    }
    // Every cause on the one line, each once: "cannot open X: permission denied".
    let mut line = String::new();
    for cause in error.chain() {
        let text = flatten(&cause.to_string());
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// A client error as a sentence with what to do.
fn client_error(error: &Error) -> String {
    match error {
        Error::Http(http) if http.is_connect() || http.is_timeout() => {
            let url = http
                .url()
                .map(|url| {
                    let mut url = url.clone();
                    url.set_query(None);
                    url.to_string()
                })
                .unwrap_or_else(|| "the server".to_owned());
            let why = if http.is_timeout() {
                "timed out".to_owned()
            } else {
                root_cause(http)
            };
            format!(
                "cannot reach {url}: {why}; is the server running? set CATTLE_URL or pass --url"
            )
        }
        Error::Http(http) => {
            let url = http.url().map(|url| format!(" {url}")).unwrap_or_default();
            format!("request to{url} failed: {}", root_cause(http))
        }
        Error::Api {
            status: 401,
            message,
            ..
        } => format!(
            "the server refused the key ({}); check CATTLE_ACCESS_KEY and CATTLE_SECRET_KEY \
             (or --access-key/--secret-key)",
            flatten(message)
        ),
        Error::Api {
            status: 403,
            message,
            ..
        } => format!(
            "not allowed with this key: {} (an admin key can)",
            flatten(message)
        ),
        Error::Api {
            status,
            code,
            message,
        } => format!("{} ({status} {code})", flatten(message)),
        Error::Refused { status: 401, .. } => "the server refused the key; check \
             CATTLE_ACCESS_KEY and CATTLE_SECRET_KEY (or --access-key/--secret-key)"
            .to_owned(),
        Error::WebSocket(_) => format!(
            "{}; is the server running? set CATTLE_URL or pass --url",
            flatten(&error.to_string())
        ),
        other => flatten(&other.to_string()),
    }
}

/// The innermost cause's text, without the OS error number (`connection refused`).
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let text = cause.to_string();
    let text = match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// Newlines and other control characters as spaces: an error is one line.
fn flatten(text: &str) -> String {
    text.chars()
        .map(|ch| if ch.is_control() { ' ' } else { ch })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_share_one_line() {
        let error = anyhow::Error::new(std::io::Error::other("permission denied"))
            .context("cannot open the data directory")
            .context("cannot start");
        assert_eq!(
            one_line(&error),
            "cannot start: cannot open the data directory: permission denied"
        );
        let repeated = anyhow::anyhow!("bad\nthing: inner").context("bad\nthing: inner");
        assert_eq!(one_line(&repeated), "bad thing: inner");
    }
}
