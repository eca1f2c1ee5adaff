//! [`Client::logs`]: a container's stdout and stderr, through the server's log socket.
//!
//! `POST <container>?action=logs` with `{"follow", "lines"}` answers a `hostAccess`
//! (`url`, `token`); the socket at `url?token=<token>` sends one text frame per line, `"01 "`
//! and the line for stdout, `"02 "` for stderr, and closes with 1000 and a reason (`end of
//! log`, `container removed`) when the log ends, or with another code and a reason when it
//! cannot go on (1011: the agent went away; 1008: the reader was too slow).

use futures_util::StreamExt;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Client, Error, Result};

/// What to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep streaming what is written after the tail.
    pub follow: bool,
    /// How many of the last lines of each stream to send first.
    pub lines: u32,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            follow: true,
            lines: 100,
        }
    }
}

/// One line of a container's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLine {
    /// A line it wrote to stdout.
    Stdout(String),
    /// A line it wrote to stderr.
    Stderr(String),
}

/// An open log socket.
#[derive(Debug)]
pub struct LogStream {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    end: Option<String>,
}

impl Client {
    /// Opens a container's log: `container` is its link or a path such as `containers/1i5`.
    pub async fn logs(&self, container: &str, options: LogOptions) -> Result<LogStream> {
        let access = self
            .post(
                &format!("{container}?action=logs"),
                &json!({"follow": options.follow, "lines": options.lines}),
            )
            .await?;
        let (Some(url), Some(token)) = (access["url"].as_str(), access["token"].as_str()) else {
            return Err(Error::Invalid(format!(
                "?action=logs answered no url and token: {access}"
            )));
        };
        LogStream::connect(url, token).await
    }
}

impl LogStream {
    /// Connects to a log socket given its `url` and `token` (a `hostAccess`).
    pub async fn connect(url: &str, token: &str) -> Result<LogStream> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .finish();
        let request = format!("{url}?{query}").into_client_request()?;
        let config = WebSocketConfig::default()
            .read_buffer_size(64 * 1024)
            .write_buffer_size(0)
            .max_write_buffer_size(1 << 20);
        match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
            Ok((socket, _)) => Ok(LogStream { socket, end: None }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(Error::Refused {
                status: response.status().as_u16(),
                body: response
                    .body()
                    .as_deref()
                    .map(|body| String::from_utf8_lossy(body).into_owned())
                    .unwrap_or_default(),
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// The next line; `Ok(None)` once the log ended normally (close 1000; its reason is
    /// [`LogStream::end_reason`]), [`Error::Closed`] when the server closed it with another
    /// code. Cancel-safe.
    pub async fn next_line(&mut self) -> Result<Option<LogLine>> {
        loop {
            match self.socket.next().await {
                None => return Ok(None),
                Some(Err(error)) => return Err(error.into()),
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    if let Some(line) = text.strip_prefix(drover_proto::logs::STDOUT) {
                        return Ok(Some(LogLine::Stdout(line.to_owned())));
                    }
                    if let Some(line) = text.strip_prefix(drover_proto::logs::STDERR) {
                        return Ok(Some(LogLine::Stderr(line.to_owned())));
                    }
                    return Err(Error::Invalid(format!(
                        "a log frame without a stream prefix: {text:?}"
                    )));
                }
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(frame) if u16::from(frame.code) != 1000 => Err(Error::Closed {
                            code: frame.code.into(),
                            reason: frame.reason.to_string(),
                        }),
                        Some(frame) => {
                            self.end = Some(frame.reason.to_string());
                            Ok(None)
                        }
                        None => Ok(None),
                    };
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Why the log ended (the close reason), once [`LogStream::next_line`] returned `None`.
    pub fn end_reason(&self) -> Option<&str> {
        self.end.as_deref()
    }

    /// Closes the socket (the server stops the agent's follower).
    pub async fn close(mut self) -> Result<()> {
        self.socket.close(None).await.map_err(Into::into)
    }
}
