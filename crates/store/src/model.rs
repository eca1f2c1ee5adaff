//! The rows the store reads and writes.

use std::fmt;
use std::str::FromStr;

/// What an account is, which decides how it may subscribe and publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountKind {
    /// The super-administrator: sees everything, subscribes raw.
    Admin,
    /// A project (the original's "environment"): owns resources; its keys act within it.
    Project,
    /// A user: acts within its project.
    User,
    /// A host agent (or an agent container): receives only its own `;agent=<id>` events.
    Agent,
    /// A system service: subscribes raw, publishes any name.
    Service,
}

impl AccountKind {
    /// The name stored in `account.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Admin => "admin",
            AccountKind::Project => "project",
            AccountKind::User => "user",
            AccountKind::Agent => "agent",
            AccountKind::Service => "service",
        }
    }

    /// Whether the account subscribes and publishes raw names (the original's RAW style).
    pub fn is_privileged(self) -> bool {
        matches!(self, AccountKind::Admin | AccountKind::Service)
    }
}

impl fmt::Display for AccountKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AccountKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "admin" | "superadmin" => AccountKind::Admin,
            "project" => AccountKind::Project,
            "user" => AccountKind::User,
            "agent" => AccountKind::Agent,
            "service" => AccountKind::Service,
            other => return Err(format!("unknown account kind {other:?}")),
        })
    }
}

/// What a credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    /// A user or project API key.
    ApiKey,
    /// The key of an agent account.
    AgentApiKey,
    /// A project's registration token, which may only register agents.
    RegistrationToken,
}

impl CredentialKind {
    /// The name stored in `credential.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "apiKey",
            CredentialKind::AgentApiKey => "agentApiKey",
            CredentialKind::RegistrationToken => "registrationToken",
        }
    }
}

impl FromStr for CredentialKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "apiKey" => CredentialKind::ApiKey,
            "agentApiKey" => CredentialKind::AgentApiKey,
            "registrationToken" => CredentialKind::RegistrationToken,
            other => return Err(format!("unknown credential kind {other:?}")),
        })
    }
}

/// An account row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Database id.
    pub id: i64,
    /// Display name.
    pub name: Option<String>,
    /// What the account is.
    pub kind: AccountKind,
    /// Stable external identity.
    pub uuid: String,
    /// `active` or `removed` (and the generic states in between).
    pub state: String,
    /// Creation time, epoch ms.
    pub created: i64,
    /// For user and agent accounts: the project they act in. A project's is its own id.
    pub project_id: Option<i64>,
    /// For agent accounts: the agent they are.
    pub agent_id: Option<i64>,
    /// For agent accounts of containers: the role they were given
    /// (`io.rancher.container.agent.role`), e.g. `environment`.
    pub role: Option<String>,
}

impl Account {
    /// The project this account acts in by default, if any.
    pub fn default_project(&self) -> Option<i64> {
        match self.kind {
            AccountKind::Project => Some(self.id),
            _ => self.project_id,
        }
    }
}

/// A credential row, without its secret digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Database id.
    pub id: i64,
    /// Display name.
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// What the credential is.
    pub kind: CredentialKind,
    /// `active`, `inactive` or `removed`.
    pub state: String,
    /// Creation time, epoch ms.
    pub created: i64,
    /// The account it authenticates as.
    pub account_id: i64,
    /// The access key (public part).
    pub public_value: String,
}

/// A credential just created: the only time its secret is known in plain text.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The stored row.
    pub credential: Credential,
    /// The secret key, to hand to the caller once.
    pub secret_value: String,
}

/// The kinds of resources the process engine drives, one table each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// A host that runs instances.
    Host,
    /// The agent on a host.
    Agent,
    /// An instance (the API's `container`).
    Instance,
    /// A volume.
    Volume,
    /// A stack of services.
    Stack,
    /// A service.
    Service,
    /// An external handler: an extension that takes part in processes.
    ExternalHandler,
}

impl ResourceKind {
    /// Every kind.
    pub const ALL: [ResourceKind; 7] = [
        ResourceKind::Host,
        ResourceKind::Agent,
        ResourceKind::Instance,
        ResourceKind::Volume,
        ResourceKind::Stack,
        ResourceKind::Service,
        ResourceKind::ExternalHandler,
    ];

    /// The table, and the prefix of its process names (`instance.start`).
    pub fn table(self) -> &'static str {
        match self {
            ResourceKind::Host => "host",
            ResourceKind::Agent => "agent",
            ResourceKind::Instance => "instance",
            ResourceKind::Volume => "volume",
            ResourceKind::Stack => "stack",
            ResourceKind::Service => "service",
            ResourceKind::ExternalHandler => "external_handler",
        }
    }

    /// The API type (`container` for instances).
    pub fn api_type(self) -> &'static str {
        match self {
            ResourceKind::Instance => "container",
            ResourceKind::ExternalHandler => "externalHandler",
            other => other.table(),
        }
    }

    /// The kind of a table name or API type.
    pub fn parse(text: &str) -> Option<ResourceKind> {
        ResourceKind::ALL
            .into_iter()
            .find(|kind| kind.table() == text || kind.api_type() == text)
    }

    /// The reference columns this table has, of `host_id`, `agent_id`, `stack_id`,
    /// `service_id`, `instance_id`.
    pub fn has_column(self, column: &str) -> bool {
        matches!(
            (self, column),
            (ResourceKind::Host, "agent_id")
                | (
                    ResourceKind::Instance,
                    "host_id" | "agent_id" | "service_id"
                )
                | (ResourceKind::Volume, "host_id" | "instance_id")
                | (ResourceKind::Service, "stack_id")
        )
    }
}

/// A resource row of any kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// Its kind (table).
    pub kind: ResourceKind,
    /// Database id.
    pub id: i64,
    /// Name.
    pub name: Option<String>,
    /// The project it belongs to.
    pub account_id: Option<i64>,
    /// The `kind` column (e.g. `container`, `volume`).
    pub sub_kind: String,
    /// Stable identity.
    pub uuid: String,
    /// Description.
    pub description: Option<String>,
    /// The current state.
    pub state: String,
    /// `yes`, `no` or `error`.
    pub transitioning: String,
    /// Progress or error message.
    pub transitioning_message: Option<String>,
    /// Progress in percent.
    pub transitioning_progress: Option<i64>,
    /// Creation time, epoch ms.
    pub created: i64,
    /// When it was removed, epoch ms.
    pub removed: Option<i64>,
    /// Type-specific fields.
    pub data: serde_json::Map<String, serde_json::Value>,
    /// The host it is on (instances, volumes).
    pub host_id: Option<i64>,
    /// Its agent (hosts; instances with their own agent).
    pub agent_id: Option<i64>,
    /// Its stack (services).
    pub stack_id: Option<i64>,
    /// Its service (instances).
    pub service_id: Option<i64>,
    /// Its instance (volumes).
    pub instance_id: Option<i64>,
    /// Agents: when the ping monitor last recorded an answer (written when the agent's state
    /// changes and at most about once a minute otherwise).
    pub last_ping: Option<i64>,
}

/// A resource to create.
#[derive(Debug, Clone, Default)]
pub struct NewResource {
    /// Name.
    pub name: Option<String>,
    /// The `kind` column.
    pub sub_kind: String,
    /// Description.
    pub description: Option<String>,
    /// The project.
    pub account_id: Option<i64>,
    /// Type-specific fields.
    pub data: serde_json::Map<String, serde_json::Value>,
    /// The host.
    pub host_id: Option<i64>,
    /// The agent.
    pub agent_id: Option<i64>,
    /// The stack.
    pub stack_id: Option<i64>,
    /// The service.
    pub service_id: Option<i64>,
    /// The instance.
    pub instance_id: Option<i64>,
    /// For a service's container: its slot (1 to the service's scale); at most one live
    /// container of a service holds a slot.
    pub service_index: Option<i64>,
    /// An identity outside drover (an agent's registration key, a process id).
    pub external_id: Option<String>,
}
