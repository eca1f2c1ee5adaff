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
    /// The server.
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
/// registration with the token (stored for next time).
pub async fn establish(args: &AgentArgs) -> anyhow::Result<Identity> {
    let path = args.state_dir.join(FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let identity: Identity = serde_json::from_str(&text).map_err(|error| {
            anyhow::anyhow!("{} is not a valid identity file: {error}", path.display())
        })?;
        return Ok(identity);
    }
    if let (Some(access_key), Some(secret_key)) = (&args.access_key, &args.secret_key) {
        // Existing agent keys: the server knows which agent they belong to.
        let client = Client::new(&args.url, access_key, secret_key)?;
        let agents = client.get("agents").await?;
        let agent_id = agents["data"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_default();
        return Ok(Identity {
            url: args.url.clone(),
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
    let registrar = Client::new(&args.url, token_key, token_secret)?;
    let registered = registrar
        .post(
            "register",
            &json!({"key": host_key, "name": name, "host": crate::handlers::host_facts()}),
        )
        .await
        .map_err(|error| anyhow::anyhow!("registration failed: {error}"))?;
    let field = |name: &str| {
        registered[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("registration answer lacks {name}"))
    };
    let identity = Identity {
        url: args.url.clone(),
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
