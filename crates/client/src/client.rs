//! [`Client`]: REST calls with Basic auth.

use base64::Engine;
use drover_proto::Event;
use serde_json::Value;

use crate::{Error, Result};

/// The header that makes a create safe to retry.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// A client of one drover server, authenticated with one key. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `http://host:port/v1`, without a trailing slash.
    base: String,
    authorization: String,
}

impl Client {
    /// A client for the server at `url` (`http://host:port` or `http://host:port/v1`).
    pub fn new(url: &str, access_key: &str, secret_key: &str) -> Result<Client> {
        let url = url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "server url {url:?} must start with http:// or https://"
            )));
        }
        let base = if url.ends_with("/v1") {
            url.to_owned()
        } else {
            format!("{url}/v1")
        };
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{access_key}:{secret_key}"));
        Ok(Client {
            http,
            base,
            authorization: format!("Basic {token}"),
        })
    }

    /// A client from `CATTLE_URL`, `CATTLE_ACCESS_KEY` and `CATTLE_SECRET_KEY`, as the
    /// original's agents and agent containers are configured.
    pub fn from_env() -> Result<Client> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| Error::Invalid(format!("{name} is not set")))
        };
        Client::new(
            &var("CATTLE_URL")?,
            &var("CATTLE_ACCESS_KEY")?,
            &var("CATTLE_SECRET_KEY")?,
        )
    }

    /// `http://host:port/v1`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The value of the `Authorization` header this client sends.
    pub fn authorization(&self) -> &str {
        &self.authorization
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}/{}", self.base, path.trim_start_matches('/'))
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        if status.is_success() {
            if body.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&body)
                .map_err(|error| Error::Invalid(format!("response is not JSON: {error}")));
        }
        let error: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Err(Error::Api {
            status: status.as_u16(),
            code: error["code"].as_str().unwrap_or("Unknown").to_owned(),
            message: error["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
        })
    }

    /// `GET` a path under `/v1` (or an absolute link).
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(self.url(path))).await
    }

    /// `POST` JSON to a path under `/v1` (or an absolute link).
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    /// Creates a resource (`POST` to a collection) safely under retries: the request carries an
    /// `Idempotency-Key` the client makes up, and a connection error or a `502`/`503`/`504` is
    /// retried with the same key (up to 5 sends, with jittered backoff). The server answers a
    /// repeated key with the resource the first send created, so a create that committed
    /// although its answer was lost never makes a second resource.
    pub async fn create(&self, path: &str, body: &Value) -> Result<Value> {
        const SENDS: u32 = 5;
        let key = uuid::Uuid::new_v4().simple().to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = self
                .http
                .post(self.url(path))
                .header(IDEMPOTENCY_KEY, &key)
                .json(body);
            let retryable = match self.send(request).await {
                Err(Error::Http(error))
                    if error.is_connect() || error.is_timeout() || error.is_request() =>
                {
                    Error::Http(error)
                }
                Err(
                    error @ Error::Api {
                        status: 502..=504, ..
                    },
                ) => error,
                other => return other,
            };
            if attempt >= SENDS {
                return Err(retryable);
            }
            let backoff = 100u64 << attempt.min(5);
            let jitter = (uuid::Uuid::new_v4().as_u128() % u128::from(backoff)) as u64;
            tokio::time::sleep(std::time::Duration::from_millis(backoff + jitter)).await;
        }
    }

    /// `PUT` JSON to a path under `/v1` (or an absolute link).
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    /// `DELETE` a path under `/v1` (or an absolute link).
    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.send(self.http.delete(self.url(path))).await
    }

    /// Publishes an event (`POST /v1/publish`).
    pub async fn publish(&self, event: &Event) -> Result<()> {
        let body =
            serde_json::to_value(event).map_err(|error| Error::Invalid(error.to_string()))?;
        self.post("publish", &body).await.map(drop)
    }

    /// Publishes the reply to a request, with `data`; does nothing if the request wants none.
    pub async fn reply(&self, request: &Event, data: Value) -> Result<()> {
        match request.reply() {
            Some(reply) => self.publish(&reply.with_data(data)).await,
            None => Ok(()),
        }
    }
}
