//! The drover client library: what agents and extensions build on.
//!
//! - [`Client`]: a REST client for the Rancher v1 style API, with HTTP Basic auth, of one
//!   server or of several (`http://a:8080,http://b:8080`): it stays with one while it works
//!   and moves to the next when it fails (see [several servers](Client#several-servers)).
//! - [`Client::subscribe`]: a WebSocket subscription that yields [`Event`]s (or, with
//!   [`EventStream::next_frame`], control frames too), with a handshake timeout, a small read
//!   buffer and a bounded write buffer.
//! - [`RouterBuilder`] / [`Router`]: the event router, the counterpart of the original's Go
//!   `event-subscriber`: handlers by event name, replies and error replies published for you,
//!   events of one resource handled one at a time in order, a bounded queue that applies
//!   backpressure instead of dropping events, a separate lane for `ping`, WebSocket
//!   ping/pong liveness, and reconnection with jittered exponential backoff. See the
//!   [`router`] module for the details.
//! - [`Client::logs`]: a container's stdout and stderr lines ([`LogStream`]) through the
//!   server's log socket, the tail and, with `follow`, what is written afterwards.
//! - [`ResourceChange`]: a `resource.change` event unpacked, for
//!   [`RouterBuilder::on_resource_change`].
//!
//! # A router
//!
//! ```no_run
//! use drover_client::{Client, Context, Event, HandlerResult, RouterBuilder};
//! use serde_json::json;
//! use tokio_util::sync::CancellationToken;
//!
//! async fn activate(event: Event, context: Context) -> HandlerResult {
//!     context
//!         .progress("pulling the image", Some(50))
//!         .await
//!         .map_err(|error| error.to_string())?;
//!     let name = event
//!         .data
//!         .as_ref()
//!         .and_then(|data| data["instance"]["name"].as_str())
//!         .ok_or("the request names no instance")?;
//!     Ok(Some(json!({"instance": {"externalId": format!("ctr-{name}")}})))
//! }
//!
//! # async fn example() -> Result<(), drover_client::Error> {
//! let client = Client::from_env()?; // CATTLE_URL, CATTLE_ACCESS_KEY, CATTLE_SECRET_KEY
//! let router = RouterBuilder::new(client)
//!     .on("compute.instance.activate", activate)
//!     .on_resource_change(|change| async move {
//!         println!("{} {} is {}", change.resource_type, change.resource_id,
//!                  change.resource["state"]);
//!     })
//!     .build();
//! let shutdown = CancellationToken::new();
//! let stop = shutdown.clone();
//! tokio::spawn(async move {
//!     let _ = tokio::signal::ctrl_c().await;
//!     stop.cancel();
//! });
//! router.run(shutdown).await // reconnects until shut down
//! # }
//! ```
//!
//! # A raw subscription
//!
//! ```no_run
//! # async fn example() -> Result<(), drover_client::Error> {
//! use drover_client::{Client, Subscribe};
//! let client = Client::new("http://localhost:8080", "ACCESS", "SECRET")?;
//! let mut events = client.subscribe(Subscribe::names(["resource.change"])).await?;
//! while let Some(event) = events.next_event().await? {
//!     println!("{} {:?}", event.name(), event.resource_id);
//! }
//! # Ok(()) }
//! ```

mod backoff;
mod change;
mod client;
mod logs;
pub mod router;
mod subscribe;

pub use change::ResourceChange;
pub use client::{Client, IDEMPOTENCY_KEY};
pub use drover_proto::{Event, Transitioning};
pub use logs::{LogLine, LogOptions, LogStream};
pub use router::{Context, HandlerError, HandlerResult, Router, RouterBuilder};
pub use subscribe::{EventStream, Frame, STREAM_POSITION_HEADER, Subscribe};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with a GDAPI error.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// GDAPI code.
        code: String,
        /// Message.
        message: String,
    },
    /// The request could not be sent or its answer read.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    WebSocket(Box<tokio_tungstenite::tungstenite::Error>),
    /// The server refused the WebSocket handshake with an HTTP error.
    #[error("subscribe refused: {status} {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The response body (a GDAPI error).
        body: String,
    },
    /// `410 Gone`: the server no longer has every `resource.change` after the subscription's
    /// `resumeFrom` (it keeps `resource.change.retain.count` positions), or it never had that
    /// position. Re-list what you watch, then subscribe again with `resumeFrom` = `head` (or
    /// without it).
    #[error("resume refused, re-list: head position {head}: {body}")]
    Relist {
        /// The stream's head position when the server refused.
        head: i64,
        /// The response body (a GDAPI error: `ResumeTooOld` or `ResumeAhead`).
        body: String,
    },
    /// The server closed the subscription.
    #[error("closed by server: {code} {reason}")]
    Closed {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The server did not answer in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// A URL or a frame could not be understood.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl Error {
    /// Whether the error says the server, or the way to it, failed (the connection was
    /// refused, reset or timed out, or a `502`/`503`/`504` came back), rather than the server
    /// refused the request: what makes a client of several servers move to the next one.
    pub fn is_server_failure(&self) -> bool {
        use tokio_tungstenite::tungstenite::Error as Ws;
        match self {
            Error::Http(error) => {
                error.is_connect() || error.is_timeout() || error.is_request() || error.is_body()
            }
            Error::Api { status, .. } | Error::Refused { status, .. } => {
                matches!(status, 502..=504)
            }
            Error::Timeout(_) => true,
            Error::WebSocket(error) => matches!(
                **error,
                Ws::Io(_) | Ws::Tls(_) | Ws::Protocol(_) | Ws::ConnectionClosed | Ws::AlreadyClosed
            ),
            Error::Closed { .. } | Error::Invalid(_) | Error::Relist { .. } => false,
        }
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(error: tokio_tungstenite::tungstenite::Error) -> Self {
        Error::WebSocket(Box::new(error))
    }
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
