//! Waiting with a deadline: on events where the server publishes them, by polling where it
//! does not. Every wait fails the test with what it last saw instead of hanging.

use std::future::Future;
use std::time::Duration;

use drover_client::{Client, Event, EventStream, Subscribe};
use serde_json::Value;
use tokio::time::Instant;

/// The bound on every wait in this crate.
pub const WAIT: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test after [`WAIT`] with `what` it was waiting for.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// The next event that is not a keep-alive ping, failing the test after 10 s or if the
/// stream ends.
pub async fn next_event(stream: &mut EventStream) -> Event {
    tokio::time::timeout(Duration::from_secs(10), stream.next_non_ping())
        .await
        .expect("an event within 10 s")
        .expect("a readable stream")
        .expect("an open stream")
}

/// Calls `check` every 20 ms until it returns `Some`, for at most [`WAIT`]. For conditions
/// the server announces no event for; prefer [`wait_state`]/[`wait_change`] for resources.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `GET path` until `done` holds, for at most [`WAIT`], and returns the body; the
/// failure shows the last body (or error) seen. For what changes without an event (a list of
/// container events, `lastPing`, host facts, the clean-up status).
pub async fn poll(client: &Client, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = client.get(path).await;
        if let Ok(value) = &last
            && done(value)
        {
            return value.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what} on {path}; last seen: {}",
            describe(&last)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits the resource at `path` being in `state` and not transitioning; returns it.
/// See [`wait_change`].
pub async fn wait_state(client: &Client, path: &str, state: &str) -> Value {
    wait_change(client, path, &format!("state {state}"), |resource| {
        resource["state"] == state && resource["transitioning"] == "no"
    })
    .await
}

/// Awaits `done` holding for the resource (or collection) at `path`, for at most [`WAIT`]:
/// subscribes to `state.change` and `resource.change` first, then reads the resource, and
/// reads it again on each event about it (any event, for a collection), with no polling. The
/// failure shows the last state seen. `client` must be able to see the changes: an admin key
/// (raw `state.change`) or a project key (its project's `resource.change`). The wait's own
/// subscription counts in `drover_connections` until the server sees it close.
pub async fn wait_change(
    client: &Client,
    path: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    wait_change_until(Instant::now() + WAIT, client, path, what, done).await
}

async fn wait_change_until(
    deadline: Instant,
    client: &Client,
    path: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let last_segment = path
        .split('?')
        .next()
        .unwrap_or(path)
        .rsplit('/')
        .next()
        .unwrap_or(path);
    let id = last_segment
        .starts_with(|c: char| c.is_ascii_digit())
        .then_some(last_segment);
    let timed_out = |last: &Result<Value, drover_client::Error>| -> ! {
        panic!(
            "timed out waiting for {what} on {path}; last seen: {}",
            describe(last)
        )
    };
    let mut stream = None;
    let mut last = Err(drover_client::Error::Invalid("not read yet".into()));
    loop {
        if stream.is_none() {
            // Subscribed (the server's first ping says so) before reading: no change is missed.
            let subscribe = async {
                let mut s = client
                    .subscribe(Subscribe::names(["state.change", "resource.change"]))
                    .await
                    .ok()?;
                match s.next_event().await {
                    Ok(Some(first)) if first.name() == "ping" => Some(s),
                    _ => None,
                }
            };
            match tokio::time::timeout_at(deadline, subscribe).await {
                Ok(Some(s)) => stream = Some(s),
                Ok(None) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(_) => timed_out(&last),
            }
            last = client.get(path).await;
        }
        if let Ok(value) = &last
            && done(value)
        {
            return value.clone();
        }
        let events = stream.as_mut().expect("subscribed");
        let relevant = async {
            loop {
                match events.next_non_ping().await {
                    Ok(Some(event)) => {
                        if id.is_none() || event.resource_id.as_deref() == id {
                            return true;
                        }
                    }
                    _ => return false,
                }
            }
        };
        match tokio::time::timeout_at(deadline, relevant).await {
            Ok(true) => last = client.get(path).await,
            // The subscription ended (its lifetime of pings, a restart): subscribe again.
            Ok(false) => stream = None,
            Err(_) => timed_out(&last),
        }
    }
}

/// A short description of a resource for failure messages: its state and transitioning,
/// then the whole body.
fn describe(last: &Result<Value, drover_client::Error>) -> String {
    match last {
        Ok(value) if value.get("state").is_some() => format!(
            "state={} transitioning={} in {value:#}",
            value["state"], value["transitioning"]
        ),
        Ok(value) => format!("{value:#}"),
        Err(error) => format!("an error: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestServer;

    async fn active_host(server: &TestServer) -> String {
        let host = server
            .admin
            .post("hosts", &serde_json::json!({"name": "h"}))
            .await
            .unwrap();
        let path = format!("hosts/{}", host["id"].as_str().unwrap());
        wait_state(&server.admin, &path, "active").await;
        path
    }

    #[tokio::test]
    async fn wait_state_wakes_on_the_change_and_wait_change_sees_collections() {
        let server = TestServer::start().await;
        let path = active_host(&server).await;
        server.admin.delete(&path).await.unwrap();
        let removed = wait_state(&server.admin, &path, "removed").await;
        assert_eq!(removed["transitioning"], "no");
        let hosts = wait_change(&server.admin, "hosts", "a removed host", |hosts| {
            hosts["data"][0]["state"] == "removed"
        })
        .await;
        assert_eq!(hosts["data"].as_array().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_wait_that_times_out_says_what_it_last_saw() {
        let server = TestServer::start().await;
        let path = active_host(&server).await;
        let deadline = Instant::now() + Duration::from_millis(300);
        let admin = server.admin.clone();
        let waited = tokio::spawn(async move {
            wait_change_until(deadline, &admin, &path, "state purged", |resource| {
                resource["state"] == "purged"
            })
            .await
        })
        .await;
        let panic = waited.unwrap_err().into_panic();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(
            message.contains("timed out waiting for state purged on hosts/")
                && message.contains(r#"last seen: state="active" transitioning="no""#),
            "{message}"
        );
    }
}
