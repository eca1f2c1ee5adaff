//! A `resource.change` subscriber built on the drover client library: the Rust counterpart of
//! the original's "scale-subscriber" walk-through.
//!
//! It listens to `resource.change`, and whenever a service or one of its containers changes it
//! makes the number of live containers labelled `io.drover.service=<service id>` equal the
//! service's `scale`, creating containers from the service's `launchConfig` or removing the
//! newest extras. A health-check port answers `GET /healthz` while it is subscribed.

use std::sync::Arc;

use drover_client::{Client, ResourceChange, RouterBuilder};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// The label tying a container to its service.
pub const SERVICE_LABEL: &str = "io.drover.service";

/// Runs the subscriber until `shutdown`; `health` receives the router's connection count.
pub async fn run(
    client: Client,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::sync::watch::Receiver<u64>> {
    // Changes of one service arrive both as service and as container events, which the router
    // may handle concurrently: one reconcile at a time keeps the count exact.
    let lock = Arc::new(Mutex::new(()));
    let handler_client = client.clone();
    let router = RouterBuilder::new(client)
        .on_resource_change(move |change: ResourceChange| {
            let client = handler_client.clone();
            let lock = lock.clone();
            async move {
                let _guard = lock.lock().await;
                if let Err(error) = on_change(&client, &change).await {
                    tracing::warn!(%error, resource = %change.resource_id, "reconcile failed");
                }
            }
        })
        .build();
    let connections = router.connections();
    tokio::spawn(async move {
        if let Err(error) = router.run(shutdown).await {
            tracing::error!(%error, "subscriber stopped");
        }
    });
    Ok(connections)
}

async fn on_change(client: &Client, change: &ResourceChange) -> anyhow::Result<()> {
    let service_id = match change.resource_type.as_str() {
        "service" => change.resource_id.clone(),
        "container" => match change.resource["labels"][SERVICE_LABEL].as_str() {
            Some(service) => service.to_owned(),
            None => return Ok(()),
        },
        _ => return Ok(()),
    };
    reconcile(client, &service_id).await
}

/// Makes the service's live container count equal its scale.
pub async fn reconcile(client: &Client, service_id: &str) -> anyhow::Result<()> {
    let service = client.get(&format!("services/{service_id}")).await?;
    let wanted = if service["state"] == "active" {
        service["scale"].as_i64().unwrap_or(0).max(0) as usize
    } else {
        0
    };
    let containers = client.get("containers?state_ne=removed&limit=1000").await?;
    let mut live: Vec<&Value> = containers["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|container| container["labels"][SERVICE_LABEL] == service_id)
        .filter(|container| {
            !matches!(
                container["state"].as_str(),
                Some("removing" | "removed" | "purging" | "purged")
            )
        })
        .collect();
    if live.len() < wanted {
        let launch = &service["launchConfig"];
        for n in live.len()..wanted {
            let mut labels = launch["labels"].as_object().cloned().unwrap_or_default();
            labels.insert(SERVICE_LABEL.into(), json!(service_id));
            let body = json!({
                "name": format!("{}-{}", service["name"].as_str().unwrap_or("service"), n + 1),
                "command": launch["command"],
                "environment": launch["environment"].as_object().cloned().unwrap_or_default(),
                "labels": labels,
            });
            let created = client.post("containers", &body).await?;
            tracing::info!(service = service_id, container = %created["id"], "scaled up");
        }
    } else if live.len() > wanted {
        live.sort_by_key(|container| {
            std::cmp::Reverse(container["createdTS"].as_i64().unwrap_or(0))
        });
        for container in &live[..live.len() - wanted] {
            if let Some(link) = container["links"]["self"].as_str() {
                // A container that is already being removed answers 409; that is fine.
                let _ = client.delete(link).await;
                tracing::info!(service = service_id, container = %container["id"], "scaled down");
            }
        }
    }
    Ok(())
}
