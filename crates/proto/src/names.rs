//! Event names: validation, qualification by the server, and stripping on delivery.
//!
//! A subscriber never chooses its own scope. The server rewrites each requested name to
//! `<name>;agent=<agent id>` for agent accounts and `<name>;account=<project id>` for every other
//! ordinary account; whatever `;…` suffix the client sent is discarded first. Admin and service
//! accounts may subscribe raw. Routing is by exact name, and a qualified subscriber receives the
//! name without the suffix.

use std::fmt;

/// Separates a name from its qualifier.
pub const SEPARATOR: char = ';';
/// The longest name accepted.
pub const MAX_NAME_LEN: usize = 256;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    TooLong,
    /// The name holds a character outside `*._-0-9a-zA-Z;=`.
    BadCharacter(char),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("event name is empty"),
            NameError::TooLong => write!(f, "event name is longer than {MAX_NAME_LEN} characters"),
            NameError::BadCharacter(c) => {
                write!(
                    f,
                    "event name holds {c:?}; allowed are letters, digits and * . _ - ; ="
                )
            }
        }
    }
}

impl std::error::Error for NameError {}

/// Checks a name against the original's character set (plus `-`, which UUIDs need).
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '*' | '.' | '_' | '-' | ';' | '=')))
    {
        Some(c) => Err(NameError::BadCharacter(c)),
        None => Ok(()),
    }
}

/// The name without any `;…` qualifier.
pub fn base(name: &str) -> &str {
    match name.find(SEPARATOR) {
        Some(idx) => &name[..idx],
        None => name,
    }
}

/// The scope the server gives a subscriber's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qualifier {
    /// Names as given: admin and service accounts.
    Raw,
    /// `;agent=<id>`: agent accounts (and raw accounts that pass `agentId`).
    Agent(i64),
    /// `;account=<id>`: every other account, scoped to one project.
    Account(i64),
}

impl Qualifier {
    /// The name as this qualifier routes it: raw names stay as they are; otherwise any
    /// client-supplied suffix is discarded and the server's is appended.
    pub fn qualify(self, name: &str) -> String {
        match self {
            Qualifier::Raw => name.to_owned(),
            Qualifier::Agent(id) => format!("{};agent={id}", base(name)),
            Qualifier::Account(id) => format!("{};account={id}", base(name)),
        }
    }

    /// Whether a subscriber with this qualifier receives names with the suffix stripped.
    pub fn strips(self) -> bool {
        !matches!(self, Qualifier::Raw)
    }
}

/// `<name>;agent=<id>`: how the server addresses one agent.
pub fn for_agent(name: &str, agent_id: i64) -> String {
    Qualifier::Agent(agent_id).qualify(name)
}

/// `<name>;account=<id>`: how the server addresses one project's subscribers.
pub fn for_account(name: &str, account_id: i64) -> String {
    Qualifier::Account(account_id).qualify(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualification_discards_client_suffixes() {
        let agent = Qualifier::Agent(5);
        assert_eq!(
            agent.qualify("compute.instance.activate"),
            "compute.instance.activate;agent=5"
        );
        // A forged suffix does not widen (or move) the scope.
        assert_eq!(
            agent.qualify("compute.instance.activate;agent=6"),
            "compute.instance.activate;agent=5"
        );
        assert_eq!(
            Qualifier::Account(3).qualify("resource.change;account=9"),
            "resource.change;account=3"
        );
        assert_eq!(
            Qualifier::Raw.qualify("resource.change;handler=x"),
            "resource.change;handler=x"
        );
        assert!(agent.strips());
        assert!(!Qualifier::Raw.strips());
    }

    #[test]
    fn names_are_validated() {
        assert!(validate("compute.instance.activate;agent=5").is_ok());
        assert!(validate("reply.123-abc_*").is_ok());
        assert_eq!(validate(""), Err(NameError::Empty));
        assert_eq!(validate("a b"), Err(NameError::BadCharacter(' ')));
        assert_eq!(validate(&"a".repeat(300)), Err(NameError::TooLong));
        assert_eq!(base("ping;agent=1"), "ping");
        assert_eq!(base("ping"), "ping");
    }
}
