//! The drover client library: what agents and extensions build on.
//!
//! - [`Client`]: a REST client for the Rancher v1 style API, with HTTP Basic auth.
//! - [`Client::subscribe`]: a WebSocket subscription that yields [`Event`]s, with a handshake
//!   timeout, a small read buffer and a bounded write buffer.
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

mod client;
mod subscribe;

pub use client::Client;
pub use drover_proto::{Event, Transitioning};
pub use subscribe::{EventStream, Subscribe};

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

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(error: tokio_tungstenite::tungstenite::Error) -> Self {
        Error::WebSocket(Box::new(error))
    }
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
