//! An external handler on the client library: the pattern for extensions that take part in a
//! process rather than watch it (compare `examples/scale-subscriber`, which watches).
//!
//! [`register`] does what the original's Go `EventRouter.Start` did before subscribing: it
//! removes an older handler of the same name and creates the `externalHandler` resource —
//! here a pre-listener of `instance.start` whose error reply runs `instance.stop`. [`run`]
//! then answers `pre.instance.start;handler=<name>`: a container with an `owner` label is
//! approved (the reply's data lands on the container as `approvedBy`); one without is refused
//! with an error reply, and the server stops it instead of starting it.

use drover_client::{Client, Event, HandlerError, RouterBuilder};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The process this handler takes part in, as a pre-listener.
pub const PROCESS: &str = "pre.instance.start";

/// Registers the handler `name` (replacing an older one of that name): active at once.
pub async fn register(client: &Client, name: &str) -> anyhow::Result<Value> {
    let found = client
        .get(&format!("externalhandlers?name={name}&state_ne=removed"))
        .await?;
    for old in found["data"].as_array().into_iter().flatten() {
        if let Some(id) = old["id"].as_str() {
            client.delete(&format!("externalhandlers/{id}")).await?;
        }
    }
    let created = client
        .post(
            "externalhandlers",
            &json!({
                "name": name,
                "priority": 100,
                "timeoutMillis": 10_000,
                "processConfigs": [{"name": PROCESS, "onError": "instance.stop"}],
            }),
        )
        .await?;
    Ok(created)
}

/// What the gate answers for one request.
pub fn decide(request: &Event, name: &str) -> Result<Value, HandlerError> {
    let instance = request
        .data
        .as_ref()
        .and_then(|data| data.get("instance"))
        .cloned()
        .unwrap_or_default();
    match instance["labels"]["owner"].as_str() {
        Some(owner) if !owner.is_empty() => {
            Ok(json!({"instance": {"approvedBy": name, "owner": owner}}))
        }
        _ => Err(HandlerError::retryable(format!(
            "{} has no owner label: refused by {name}",
            instance["name"].as_str().unwrap_or("the container")
        ))),
    }
}

/// Answers the handler's events until `shutdown`.
pub async fn run(client: Client, name: &str, shutdown: CancellationToken) -> anyhow::Result<()> {
    let gate = name.to_owned();
    let router = RouterBuilder::new(client)
        .on(&format!("{PROCESS};handler={name}"), move |event, _| {
            let gate = gate.clone();
            async move { decide(&event, &gate).map(Some) }
        })
        .build();
    router.run(shutdown).await?;
    Ok(())
}
