//! Run with `CATTLE_URL`, `CATTLE_ACCESS_KEY` and `CATTLE_SECRET_KEY` set (an admin key makes
//! a global handler; a project key one for that project's containers only):
//! `cargo run -p label-gate -- owner-gate`. Then a container without `labels.owner` ends
//! `stopped` with the gate's message in its start process, and one with it runs.

use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "owner-gate".to_owned());
    let client = drover_client::Client::from_env()?;
    let handler = label_gate::register(&client, &name).await?;
    eprintln!(
        "external handler {} ({}) active for {}; answering",
        name,
        handler["id"].as_str().unwrap_or("?"),
        label_gate::PROCESS
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    label_gate::run(client, &name, shutdown).await
}
