//! Run with `cargo run -p scale-subscriber -- --health-port 8081`, with `CATTLE_URL`,
//! `CATTLE_ACCESS_KEY` and `CATTLE_SECRET_KEY` set (an admin or project key).
//!
//! Then create a service, change its scale, and watch the server follow it:
//! `curl -u "$CATTLE_ACCESS_KEY:$CATTLE_SECRET_KEY" -X POST "$CATTLE_URL/v1/services"
//!  -d '{"name":"web","scale":2,"launchConfig":{"command":["sleep","600"]}}'`, then
//! `curl localhost:8081/drift` (and the log) shows each service's wanted and running containers.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Serve `GET /healthz` (200 while subscribed) and `GET /drift` here.
    #[arg(long, env = "HEALTH_PORT", default_value_t = 8081)]
    health_port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let client = drover_client::Client::from_env()?;
    let shutdown = CancellationToken::new();
    let (watch, connections) = scale_subscriber::run(client, shutdown.clone()).await?;
    let health = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(move || {
                let connections = connections.clone();
                async move {
                    if *connections.borrow() > 0 {
                        (axum::http::StatusCode::OK, "ok\n")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "not subscribed\n",
                        )
                    }
                }
            }),
        )
        .route(
            "/drift",
            axum::routing::get(move || {
                let watch = watch.clone();
                async move {
                    let all: Vec<_> = watch.all().iter().map(|d| d.to_json()).collect();
                    axum::Json(serde_json::Value::Array(all))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", args.health_port)).await?;
    eprintln!(
        "scale-subscriber running; health check on :{}",
        args.health_port
    );
    let stop = shutdown.clone();
    axum::serve(listener, health)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        })
        .await?;
    Ok(())
}
