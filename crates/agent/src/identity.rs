//! The agent's identity: its server, its keys, its agent id and its stable host key, kept in
//! `<state-dir>/identity.json` (mode 0600) so that a restart is the same host.

use std::path::Path;

use drover_client::Client;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::AgentArgs;

/// Who the agent is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The server, or a comma-separated list of a cluster's nodes: the one the agent
    /// registered with, or the `--url` it runs with (which wins over the stored one; the keys
    /// are valid on every node of the cluster, which share one database).
    pub url: String,
    /// The agent key.
    pub access_key: String,
    /// Its secret.
    pub secret_key: String,
    /// The agent's API id (`1ag3`).
    pub agent_id: String,
    /// The host's stable registration key.
    pub host_key: String,
}

const FILE: &str = "identity.json";

/// The identity to run with: the stored one, else keys from the environment, else a new
/// registration with the token (stored for next time). Its `url` is `--url` when given (the
/// stored file is not rewritten), else the stored one.
pub async fn establish(args: &AgentArgs) -> anyhow::Result<Identity> {
    let path = args.state_dir.join(FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let mut identity: Identity = serde_json::from_str(&text).map_err(|error| {
            anyhow::anyhow!("{} is not a valid identity file: {error}", path.display())
        })?;
        if let Some(url) = &args.url
            && *url != identity.url
        {
            tracing::info!(registered = %identity.url, url = %url, "using --url, not the URL the agent registered with");
            identity.url = url.clone();
        }
        return Ok(identity);
    }
    let url = args.url.as_deref().unwrap_or(crate::DEFAULT_URL);
    if let (Some(access_key), Some(secret_key)) = (&args.access_key, &args.secret_key) {
        // Existing agent keys: the server knows which agent they belong to.
        let client = Client::new(url, access_key, secret_key)?.with_tls(args.tls()?)?;
        let agents = client.get("agents").await?;
        let agent_id = agents["data"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_default();
        return Ok(Identity {
            url: url.to_owned(),
            access_key: access_key.clone(),
            secret_key: secret_key.clone(),
            agent_id,
            host_key: String::new(),
        });
    }
    let token = args.registration_token.as_deref().ok_or_else(|| {
        anyhow::anyhow!("no identity in {} and no keys: pass --registration-token (or CATTLE_ACCESS_KEY/CATTLE_SECRET_KEY)", args.state_dir.display())
    })?;
    let (token_key, token_secret) = token
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("a registration token looks like ACCESSKEY:SECRET"))?;
    let host_key = host_key(&args.state_dir)?;
    let name = args.name.clone().unwrap_or_else(crate::handlers::hostname);
    // Registering again with the same host key is harmless: the server answers with the same
    // agent and host and a fresh key (the key of an answer that was lost stops working). So a
    // registration whose server failed is sent to the next server, each at most once.
    let registrar = Client::new(url, token_key, token_secret)?.with_tls(args.tls()?)?;
    let request = json!({"key": host_key, "name": name, "host": crate::handlers::host_facts()});
    let mut attempts = registrar.base_urls().len();
    let registered = loop {
        attempts -= 1;
        match registrar.post("register", &request).await {
            Ok(registered) => break registered,
            Err(error) if attempts > 0 && error.is_server_failure() => {
                tracing::warn!(%error, next = registrar.base_url(), "registration failed; trying the next server");
            }
            Err(error) => return Err(anyhow::anyhow!("registration failed: {error}")),
        }
    };
    let field = |name: &str| {
        registered[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("registration answer lacks {name}"))
    };
    let identity = Identity {
        url: url.to_owned(),
        access_key: field("accessKey")?,
        secret_key: field("secretKey")?,
        agent_id: field("agentId")?,
        host_key,
    };
    write_private(&path, &serde_json::to_string_pretty(&identity)?)?;
    tracing::info!(agent = %identity.agent_id, "registered");
    Ok(identity)
}

/// A stable key for this host, made once.
fn host_key(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join("host-key");
    if let Ok(key) = std::fs::read_to_string(&path) {
        return Ok(key.trim().to_owned());
    }
    let key = uuid::Uuid::new_v4().to_string();
    write_private(&path, &key)?;
    Ok(key)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(path)?, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(state_dir: &Path, url: Option<&str>) -> AgentArgs {
        AgentArgs {
            url: url.map(str::to_owned),
            registration_token: None,
            access_key: None,
            secret_key: None,
            state_dir: state_dir.to_owned(),
            name: None,
            health_port: None,
            log_file: None,
            workers: 1,
            ca_cert: None,
        }
    }

    #[tokio::test]
    async fn a_given_url_list_wins_over_the_stored_one_and_the_keys_stay() {
        let dir = tempfile::tempdir().unwrap();
        let stored = Identity {
            url: "http://a:8080".into(),
            access_key: "ACCESS".into(),
            secret_key: "SECRET".into(),
            agent_id: "1ag3".into(),
            host_key: "host-key".into(),
        };
        let text = serde_json::to_string(&stored).unwrap();
        write_private(&dir.path().join(FILE), &text).unwrap();

        let kept = establish(&args(dir.path(), None)).await.unwrap();
        assert_eq!(kept.url, "http://a:8080", "no --url: the stored one");

        let list = "http://a:8080,http://b:8080";
        let moved = establish(&args(dir.path(), Some(list))).await.unwrap();
        assert_eq!(moved.url, list);
        assert_eq!(
            (moved.access_key, moved.agent_id, moved.host_key),
            ("ACCESS".into(), "1ag3".into(), "host-key".into()),
            "the same agent, keys and host"
        );
        let file = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(file, text, "the file is not rewritten");
    }
}
