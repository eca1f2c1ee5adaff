//! [`Client::subscribe`]: a WebSocket subscription to named events.

use std::time::Duration;

use drover_proto::Event;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::{Client, Error, Result};

/// What to subscribe to.
#[derive(Debug, Clone, Default)]
pub struct Subscribe {
    /// Event names (the server qualifies them for the key's scope).
    pub event_names: Vec<String>,
    /// `agentId`, for agent keys and admins subscribing on an agent's behalf.
    pub agent_id: Option<String>,
    /// A project id, to use `/v1/projects/{id}/subscribe`.
    pub project_id: Option<String>,
    /// How long the handshake may take (the original had no limit, and hung).
    pub handshake_timeout: Option<Duration>,
    /// `resumeFrom`: the last `resource.change` position seen; the server first sends the
    /// changes after it that this key may see, then the live stream. A position it no longer
    /// retains is refused with [`Error::Relist`].
    pub resume_from: Option<i64>,
}

impl Subscribe {
    /// A subscription to these names.
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Subscribe {
        Subscribe {
            event_names: names.into_iter().map(Into::into).collect(),
            ..Subscribe::default()
        }
    }

    /// Adds `agentId`.
    pub fn agent(mut self, agent_id: impl Into<String>) -> Subscribe {
        self.agent_id = Some(agent_id.into());
        self
    }

    /// Subscribes through a project's URL.
    pub fn project(mut self, project_id: impl Into<String>) -> Subscribe {
        self.project_id = Some(project_id.into());
        self
    }

    /// Resumes `resource.change` after this stream position (see [`Subscribe::resume_from`]).
    pub fn resume_from(mut self, position: i64) -> Subscribe {
        self.resume_from = Some(position);
        self
    }
}

/// The header that carries the `resource.change` stream's head position: on collection lists,
/// on a subscription's handshake (when it includes `resource.change`) and on a `410`.
pub const STREAM_POSITION_HEADER: &str = "x-drover-stream-position";

fn stream_position(headers: &http::HeaderMap) -> Option<i64> {
    headers
        .get(STREAM_POSITION_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The payload of the client's control pings.
const PING_PAYLOAD: &[u8] = b"drover";

/// An open subscription.
#[derive(Debug)]
pub struct EventStream {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Which of the client's servers it is connected to.
    index: usize,
    /// That server's `http://host:port/v1`.
    server: String,
    /// The head of the change stream when it subscribed, from the handshake.
    position: Option<i64>,
}

impl Client {
    /// The `ws://` URL of a subscription on the current server.
    pub fn subscribe_url(&self, subscribe: &Subscribe) -> String {
        self.subscribe_url_at(self.current_index(), subscribe)
    }

    fn subscribe_url_at(&self, index: usize, subscribe: &Subscribe) -> String {
        let base = self.base_at(index).replacen("http", "ws", 1);
        let path = match &subscribe.project_id {
            Some(project) => format!("{base}/projects/{project}/subscribe"),
            None => format!("{base}/subscribe"),
        };
        let mut query = form_urlencoded::Serializer::new(String::new());
        for name in &subscribe.event_names {
            query.append_pair("eventNames", name);
        }
        if let Some(agent) = &subscribe.agent_id {
            query.append_pair("agentId", agent);
        }
        if let Some(position) = subscribe.resume_from {
            query.append_pair("resumeFrom", &position.to_string());
        }
        format!("{path}?{}", query.finish())
    }

    /// Opens a subscription on the current server; when that server fails (no connection, a
    /// reset, a `502`/`503`/`504`, a handshake timeout) on the next, each at most once. A
    /// refusal (a wrong key, an invalid name) is returned at once.
    pub async fn subscribe(&self, subscribe: Subscribe) -> Result<EventStream> {
        let count = self.base_urls().len();
        let first = self.current_index();
        let mut step = 0;
        loop {
            let index = (first + step) % count;
            let error = match self.subscribe_at(index, &subscribe).await {
                Ok(stream) => {
                    self.stay(index);
                    return Ok(stream);
                }
                Err(error) => error,
            };
            let failed = error.is_server_failure();
            if failed {
                self.leave(index);
            }
            step += 1;
            if !failed || step >= count {
                return Err(error);
            }
            tracing::debug!(server = self.base_at(index), %error, "subscribing on the next server");
        }
    }

    async fn subscribe_at(&self, index: usize, subscribe: &Subscribe) -> Result<EventStream> {
        let mut request = self
            .subscribe_url_at(index, subscribe)
            .into_client_request()?;
        request.headers_mut().insert(
            http::header::AUTHORIZATION,
            self.authorization()
                .parse()
                .map_err(|_| Error::Invalid("authorization header".into()))?,
        );
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0)
            .max_write_buffer_size(1 << 20);
        let timeout = subscribe
            .handshake_timeout
            .unwrap_or(Duration::from_secs(30));
        let connector = self.websocket_connector(request.uri().scheme_str())?;
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(connector),
        );
        match tokio::time::timeout(timeout, connect).await {
            Err(_) => Err(Error::Timeout("subscribe handshake")),
            Ok(Ok((socket, response))) => Ok(EventStream {
                socket,
                index,
                server: self.base_at(index).to_owned(),
                position: stream_position(response.headers()),
            }),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response)))
                if response.status().as_u16() == 410 =>
            {
                Err(Error::Relist {
                    head: stream_position(response.headers()).unwrap_or(0),
                    body: response
                        .body()
                        .as_deref()
                        .map(|body| String::from_utf8_lossy(body).into_owned())
                        .unwrap_or_default(),
                })
            }
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => Err(Error::Refused {
                status: response.status().as_u16(),
                body: response
                    .body()
                    .as_deref()
                    .map(|body| String::from_utf8_lossy(body).into_owned())
                    .unwrap_or_default(),
            }),
            Ok(Err(error)) => Err(match crate::tls::rustls_cause(&error) {
                Some(cause) => {
                    let server = self.base_at(index).replacen("http", "ws", 1);
                    Error::Tls(crate::tls::describe(&server, cause))
                }
                None => error.into(),
            }),
        }
    }

    /// The connector for a WebSocket to one of this client's servers, by its URL's scheme:
    /// plain for `ws`, for `wss` TLS with the roots REST calls trust ([`Client::tls`]).
    /// For other WebSockets than subscriptions, with
    /// `tokio_tungstenite::connect_async_tls_with_config`.
    pub fn websocket_connector(&self, scheme: Option<&str>) -> Result<Connector> {
        match scheme {
            Some("wss" | "https") => Ok(Connector::Rustls(self.tls().websocket_config()?)),
            _ => Ok(Connector::Plain),
        }
    }
}

/// One frame of a subscription, as [`EventStream::next_frame`] sees it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Frame {
    /// An event (a text frame), boxed: events are large, control frames small.
    Event(Box<Event>),
    /// A WebSocket control ping from the server (the pong is sent automatically).
    Ping,
    /// A WebSocket control pong: the answer to [`EventStream::ping`].
    Pong,
}

impl EventStream {
    /// The `http://host:port/v1` of the server it is connected to.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// Which of its client's servers it is connected to.
    pub(crate) fn server_index(&self) -> usize {
        self.index
    }

    /// The head of the `resource.change` stream when it subscribed (the handshake's
    /// `X-Drover-Stream-Position`; subscriptions that include `resource.change` have it): the
    /// server sends every change after it, so resuming from it later misses nothing.
    pub fn stream_position(&self) -> Option<i64> {
        self.position
    }

    /// The next frame: an event or a control ping or pong; `Ok(None)` when the server closed
    /// the socket normally without a reason, [`Error::Closed`] when it closed it with one.
    /// A text frame that is not an event is [`Error::Invalid`]; the socket stays usable.
    /// Cancel-safe: dropping the future loses no frame.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            match self.socket.next().await {
                None => return Ok(None),
                Some(Err(error)) => return Err(error.into()),
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str())
                        .map(|event| Some(Frame::Event(Box::new(event))))
                        .map_err(|error| {
                            Error::Invalid(format!("event is not valid JSON: {error}"))
                        });
                }
                Some(Ok(Message::Ping(_))) => return Ok(Some(Frame::Ping)),
                Some(Ok(Message::Pong(_))) => return Ok(Some(Frame::Pong)),
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(frame) => Err(Error::Closed {
                            code: frame.code.into(),
                            reason: frame.reason.to_string(),
                        }),
                        None => Ok(None),
                    };
                }
                Some(Ok(Message::Binary(_) | Message::Frame(_))) => {}
            }
        }
    }

    /// The next event; `Ok(None)` when the server closed the socket normally without a reason,
    /// [`Error::Closed`] when it closed it with one.
    pub async fn next_event(&mut self) -> Result<Option<Event>> {
        loop {
            match self.next_frame().await? {
                Some(Frame::Event(event)) => return Ok(Some(*event)),
                Some(Frame::Ping | Frame::Pong) => {}
                None => return Ok(None),
            }
        }
    }

    /// Sends a WebSocket control ping; the server answers with a pong, which
    /// [`next_frame`](EventStream::next_frame) returns as [`Frame::Pong`].
    pub async fn ping(&mut self) -> Result<()> {
        self.socket
            .send(Message::Ping(PING_PAYLOAD.into()))
            .await
            .map_err(Into::into)
    }

    /// The next event that is not a keep-alive `ping` without `replyTo`.
    pub async fn next_non_ping(&mut self) -> Result<Option<Event>> {
        loop {
            match self.next_event().await? {
                Some(event) if event.name() == "ping" && event.reply_to.is_none() => continue,
                other => return Ok(other),
            }
        }
    }

    /// Sends a raw text frame (for tests of the server's handling of bad input).
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        self.socket
            .send(Message::Text(text.into()))
            .await
            .map_err(Into::into)
    }

    /// Closes the subscription.
    pub async fn close(mut self) -> Result<()> {
        self.socket.close(None).await.map_err(Into::into)
    }
}
