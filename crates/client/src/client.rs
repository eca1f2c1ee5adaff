//! [`Client`]: REST calls with Basic auth, to one server or to the first that answers of
//! several.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use drover_proto::Event;
use reqwest::Method;
use serde_json::Value;

use crate::{Error, Result, Tls};

/// The header that makes a create safe to retry.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// A client of a drover server, or of the nodes of a cluster, authenticated with one key.
/// Cheap to clone; clones share which server they use.
///
/// # Several servers
/// Given several URLs (`http://a:8080,http://b:8080`, as `--url` and `CATTLE_URL` take
/// them), the client uses one at a time, the *current* one, and stays with it while it
/// works. When a server fails (the connection is refused, reset or times out, or it answers
/// `502`/`503`/`504`) the client moves to the next URL in the list, round, as it would
/// behind a load balancer. Whether the failed call itself is sent again depends on it:
/// - [`get`](Client::get) and [`subscribe`](Client::subscribe) try each URL at most once per
///   call;
/// - [`post`](Client::post), [`put`](Client::put), [`delete`](Client::delete) and
///   [`publish`](Client::publish) go to the next URL only when the request certainly reached
///   no server (the connection could not be made); after a request was sent they return the
///   error (the next call then starts at the next URL);
/// - [`create`](Client::create) carries an `Idempotency-Key`, so it is sent again to the next
///   URL on any of the failures above, pausing with jittered backoff each time it has tried
///   every URL.
///
/// Absolute links (`http://a:8080/v1/...` from a response) that start with one of the URLs
/// are sent to the current server instead; other absolute links are used as they are.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Each server's `http://host:port/v1`, without a trailing slash; never empty.
    bases: Arc<[String]>,
    /// Which of `bases` calls go to first; shared by clones.
    current: Arc<AtomicUsize>,
    authorization: String,
    /// Which `https://`/`wss://` servers it trusts.
    tls: Tls,
}

/// How much of a failed call may be sent again to the next server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Any failure of the server (a `GET`: sending it twice does no harm).
    Idempotent,
    /// Only when the request was certainly not sent (the connection could not be made).
    Unsent,
}

/// Where a call goes.
enum Target {
    /// To a server of the list: its base URL followed by this suffix.
    Node(String),
    /// An absolute link to a server not in the list.
    Foreign(String),
}

/// Parses one server URL into its base (`http://host:port/v1`); a URL that already names an
/// API version (`…/v1` or `…/v2-beta`, the same API under the original's two paths) keeps it.
fn base_of(url: &str) -> Result<String> {
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Error::Invalid(format!(
            "server url {url:?} must start with http:// or https://"
        )));
    }
    Ok(if url.ends_with("/v1") || url.ends_with("/v2-beta") {
        url.to_owned()
    } else {
        format!("{url}/v1")
    })
}

/// Parses server URLs, each of which may be a comma-separated list, into bases: in order,
/// without empty entries and without repeats. At least one is required.
fn bases_of<I, S>(urls: I) -> Result<Vec<String>>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut bases: Vec<String> = Vec::new();
    for list in urls {
        for url in list.as_ref().split(',') {
            if url.trim().is_empty() {
                continue;
            }
            let base = base_of(url)?;
            if !bases.contains(&base) {
                bases.push(base);
            }
        }
    }
    if bases.is_empty() {
        return Err(Error::Invalid("no server url given".into()));
    }
    Ok(bases)
}

/// A failed send: [`Error::Tls`] with what to do when the TLS handshake failed, else the
/// HTTP error as it is.
fn tls_or_http(error: reqwest::Error) -> Error {
    match crate::tls::rustls_cause(&error) {
        Some(cause) => {
            let server = error
                .url()
                .map(|url| format!("{}://{}", url.scheme(), url.authority()))
                .unwrap_or_else(|| "server".to_owned());
            Error::Tls(crate::tls::describe(&server, cause))
        }
        None => Error::Http(error),
    }
}

/// Whether an error says the request never left: the connection could not be made.
fn never_sent(error: &Error) -> bool {
    matches!(error, Error::Http(error) if error.is_connect())
}

impl Client {
    /// A client for the server at `url` (`http://host:port`, `http://host:port/v1` or
    /// `http://host:port/v2-beta`), or for several: `url` may be a comma-separated list
    /// (`http://a:8080,http://b:8080/v1`), tried in that order; see
    /// [several servers](Client#several-servers).
    pub fn new(url: &str, access_key: &str, secret_key: &str) -> Result<Client> {
        Client::with_urls([url], access_key, secret_key)
    }

    /// A client for several servers (each entry a URL or a comma-separated list of them):
    /// the nodes of one cluster, which share one database, so the key works on all of them.
    /// See [several servers](Client#several-servers).
    pub fn with_urls<I, S>(urls: I, access_key: &str, secret_key: &str) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let bases = bases_of(urls)?;
        let tls = Tls::system();
        let http = tls.http_client()?;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{access_key}:{secret_key}"));
        Ok(Client {
            http,
            bases: bases.into(),
            current: Arc::new(AtomicUsize::new(0)),
            authorization: format!("Basic {token}"),
            tls,
        })
    }

    /// This client trusting `tls` for `https://` and `wss://` servers (for example
    /// [`Tls::with_ca_file`], to reach a server with a self-signed certificate).
    pub fn with_tls(mut self, tls: Tls) -> Result<Client> {
        self.http = tls.http_client()?;
        self.tls = tls;
        Ok(self)
    }

    /// Which `https://`/`wss://` servers this client trusts.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// A client with this client's key for other server URLs (a URL or a comma-separated
    /// list, as [`Client::new`] takes): the same server under its other API path
    /// (`http://host:port/v2-beta`), or other nodes.
    pub fn with_key_at(&self, urls: &str) -> Result<Client> {
        Ok(Client {
            http: self.http.clone(),
            bases: bases_of([urls])?.into(),
            current: Arc::new(AtomicUsize::new(0)),
            authorization: self.authorization.clone(),
            tls: self.tls.clone(),
        })
    }

    /// A client from `CATTLE_URL` (one URL or a comma-separated list), `CATTLE_ACCESS_KEY` and
    /// `CATTLE_SECRET_KEY`, as the original's agents and agent containers are configured, and
    /// trusting the CA file in `DROVER_CA_CERT` (or `CATTLE_CA_CERT`) if one is set.
    pub fn from_env() -> Result<Client> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| Error::Invalid(format!("{name} is not set")))
        };
        Client::new(
            &var("CATTLE_URL")?,
            &var("CATTLE_ACCESS_KEY")?,
            &var("CATTLE_SECRET_KEY")?,
        )?
        .with_tls(Tls::from_env()?)
    }

    /// The current server's `http://host:port/v1`.
    pub fn base_url(&self) -> &str {
        &self.bases[self.current_index()]
    }

    /// Every server's `http://host:port/v1`, in the order they are tried.
    pub fn base_urls(&self) -> &[String] {
        &self.bases
    }

    /// The value of the `Authorization` header this client sends.
    pub fn authorization(&self) -> &str {
        &self.authorization
    }

    /// The index of the current server.
    pub(crate) fn current_index(&self) -> usize {
        self.current.load(Ordering::Acquire) % self.bases.len()
    }

    /// The base URL of server `index`.
    pub(crate) fn base_at(&self, index: usize) -> &str {
        &self.bases[index % self.bases.len()]
    }

    /// Server `index` failed: the next one becomes current, unless another call has already
    /// moved away from it.
    pub(crate) fn leave(&self, index: usize) {
        let count = self.bases.len();
        if count < 2 {
            return;
        }
        let next = (index + 1) % count;
        if self
            .current
            .compare_exchange(index, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(
                failed = %self.bases[index],
                next = %self.bases[next],
                "server failed; moving to the next"
            );
        }
    }

    /// Server `index` works: it is current.
    pub(crate) fn stay(&self, index: usize) {
        self.current.store(index, Ordering::Release);
    }

    fn target(&self, path: &str) -> Target {
        if path.starts_with("http://") || path.starts_with("https://") {
            for base in self.bases.iter() {
                if let Some(rest) = path.strip_prefix(base.as_str())
                    && (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
                {
                    return Target::Node(rest.to_owned());
                }
            }
            return Target::Foreign(path.to_owned());
        }
        Target::Node(format!("/{}", path.trim_start_matches('/')))
    }

    fn request(&self, method: Method, url: &str, body: Option<&Value>) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match body {
            Some(body) => request.json(body),
            None => request,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .send()
            .await
            .map_err(tls_or_http)?;
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

    /// Sends a call to the current server, and to the next ones as far as `resend` allows.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        resend: Resend,
    ) -> Result<Value> {
        let suffix = match self.target(path) {
            Target::Node(suffix) => suffix,
            Target::Foreign(url) => return self.send(self.request(method, &url, body)).await,
        };
        let count = self.bases.len();
        let first = self.current_index();
        let mut step = 0;
        loop {
            let index = (first + step) % count;
            let url = format!("{}{suffix}", self.bases[index]);
            let error = match self.send(self.request(method.clone(), &url, body)).await {
                Ok(value) => {
                    self.stay(index);
                    return Ok(value);
                }
                Err(error) => error,
            };
            let failed = error.is_server_failure();
            if failed {
                self.leave(index);
            }
            let again = match resend {
                Resend::Idempotent => failed,
                Resend::Unsent => never_sent(&error),
            };
            step += 1;
            if !again || step >= count {
                return Err(error);
            }
            tracing::debug!(%method, %url, %error, "sending the call to the next server");
        }
    }

    /// `GET` a path under `/v1` (or an absolute link); tried on each server at most once.
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(Method::GET, path, None, Resend::Idempotent).await
    }

    /// `POST` JSON to a path under `/v1` (or an absolute link); sent to the next server only
    /// when it could not be sent to the current one.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(Method::POST, path, Some(body), Resend::Unsent)
            .await
    }

    /// Creates a resource (`POST` to a collection) safely under retries: the request carries an
    /// `Idempotency-Key` the client makes up, and a connection error or a `502`/`503`/`504` is
    /// retried with the same key, on the next server when there are several (up to 5 sends,
    /// or one per server if there are more; with jittered backoff each time every server has
    /// been tried). The server answers a repeated key with the resource the first send
    /// created (the nodes of a cluster share the keys), so a create that committed although
    /// its answer was lost never makes a second resource.
    pub async fn create(&self, path: &str, body: &Value) -> Result<Value> {
        const SENDS: usize = 5;
        let key = uuid::Uuid::new_v4().simple().to_string();
        let target = self.target(path);
        let count = match target {
            Target::Node(_) => self.bases.len(),
            Target::Foreign(_) => 1,
        };
        let mut tried = vec![false; count];
        let mut pauses = 0;
        for attempt in 1..=SENDS.max(count) {
            let (index, url) = match &target {
                Target::Node(suffix) => {
                    let index = self.current_index();
                    (index, format!("{}{suffix}", self.bases[index]))
                }
                Target::Foreign(url) => (0, url.clone()),
            };
            if tried[index] {
                // Every server was tried since the last pause.
                let delay = crate::backoff::jittered(
                    Duration::from_millis(400),
                    Duration::from_millis(6_400),
                    pauses,
                );
                tokio::time::sleep(delay).await;
                pauses += 1;
                tried.fill(false);
            }
            tried[index] = true;
            let request = self
                .request(Method::POST, &url, Some(body))
                .header(IDEMPOTENCY_KEY, &key);
            let error = match self.send(request).await {
                Ok(value) => {
                    if matches!(target, Target::Node(_)) {
                        self.stay(index);
                    }
                    return Ok(value);
                }
                Err(error) if error.is_server_failure() => error,
                Err(error) => return Err(error),
            };
            if matches!(target, Target::Node(_)) {
                self.leave(index);
            }
            if attempt >= SENDS.max(count) {
                return Err(error);
            }
            tracing::debug!(%url, %error, attempt, "create failed; sending it again");
        }
        unreachable!("the last attempt returns")
    }

    /// `PUT` JSON to a path under `/v1` (or an absolute link); sent to the next server only
    /// when it could not be sent to the current one.
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(Method::PUT, path, Some(body), Resend::Unsent)
            .await
    }

    /// `DELETE` a path under `/v1` (or an absolute link); sent to the next server only when it
    /// could not be sent to the current one.
    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.call(Method::DELETE, path, None, Resend::Unsent).await
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

#[cfg(test)]
mod tests {
    use super::*;

    fn make(url: &str) -> Result<Client> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Client::new(url, "a", "b")
    }

    #[test]
    fn one_url_works_as_before() {
        let client = make("http://a:8080/").unwrap();
        assert_eq!(client.base_url(), "http://a:8080/v1");
        assert_eq!(client.base_urls(), ["http://a:8080/v1"]);
        assert_eq!(make("https://a/v1").unwrap().base_url(), "https://a/v1");
        assert_eq!(
            make("http://a:8080/v2-beta/").unwrap().base_url(),
            "http://a:8080/v2-beta",
            "the original's other API path is kept"
        );
    }

    #[test]
    fn a_comma_list_is_several_servers_in_order() {
        let client = make(" http://a:8080 , http://b:8080/v1/,,http://a:8080/v1,").unwrap();
        assert_eq!(
            client.base_urls(),
            ["http://a:8080/v1", "http://b:8080/v1"],
            "trimmed, /v1 added once, empty entries and repeats dropped"
        );
        assert_eq!(client.base_url(), "http://a:8080/v1");
        let listed = Client::with_urls(["http://a", "http://b,http://c"], "a", "b").unwrap();
        assert_eq!(
            listed.base_urls(),
            ["http://a/v1", "http://b/v1", "http://c/v1"]
        );
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(matches!(make(""), Err(Error::Invalid(_))));
        assert!(matches!(make(" , "), Err(Error::Invalid(_))));
        assert!(matches!(
            make("http://a,ftp://b"),
            Err(Error::Invalid(message)) if message.contains("ftp://b")
        ));
    }

    #[test]
    fn leaving_moves_round_once_and_staying_sticks() {
        let client = make("http://a,http://b,http://c").unwrap();
        let clone = client.clone();
        client.leave(0);
        assert_eq!(
            clone.base_url(),
            "http://b/v1",
            "clones share the current server"
        );
        // A second failure report for the server already left moves nothing.
        clone.leave(0);
        assert_eq!(client.base_url(), "http://b/v1");
        client.leave(1);
        client.leave(2);
        assert_eq!(client.base_url(), "http://a/v1", "round the list");
        client.stay(2);
        assert_eq!(client.base_url(), "http://c/v1");
        let single = make("http://a").unwrap();
        single.leave(0);
        assert_eq!(single.base_url(), "http://a/v1");
    }

    #[test]
    fn links_to_a_listed_server_follow_the_current_one() {
        let client = make("http://a:1,http://b:2").unwrap();
        let node = |path: &str| match client.target(path) {
            Target::Node(suffix) => suffix,
            Target::Foreign(url) => panic!("{path} is foreign: {url}"),
        };
        assert_eq!(node("containers"), "/containers");
        assert_eq!(node("/containers?limit=1"), "/containers?limit=1");
        assert_eq!(node("http://b:2/v1/containers/1i1"), "/containers/1i1");
        assert_eq!(node("http://a:1/v1?x=1"), "?x=1");
        for foreign in ["http://c:3/v1/containers", "http://a:1/v10/x"] {
            assert!(matches!(client.target(foreign), Target::Foreign(url) if url == foreign));
        }
    }
}
