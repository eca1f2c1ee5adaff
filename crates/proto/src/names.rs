//! Event names: validation, qualification by the server, and stripping on delivery.
//!
//! A subscriber never chooses its own scope. The server rewrites each requested name to
//! `<name>;agent=<agent id>` for agent accounts and `<name>;account=<project id>` for every other
//! ordinary account; whatever `;…` suffix the client sent is discarded first, except one:
//! `;handler=<h>` right after the name, which names an external handler (`<process>;handler=<h>`)
//! and stays part of the name, with the scope appended after it
//! (`instance.start;handler=foo;account=5`). Admin and service accounts may subscribe raw.
//! Routing is by exact name, and a qualified subscriber receives the name without the scope
//! suffix (`instance.start;handler=foo`), as the original's Go router expects.

use std::fmt;

/// Separates a name from its qualifier.
pub const SEPARATOR: char = ';';
/// The longest name accepted.
pub const MAX_NAME_LEN: usize = 256;
/// The suffix that names an external handler: `<process>;handler=<h>`.
pub const HANDLER_SUFFIX: &str = ";handler=";
/// The longest external handler name accepted.
pub const MAX_HANDLER_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    TooLong,
    /// The name holds a character outside `*._-0-9a-zA-Z;=`.
    BadCharacter(char),
    /// A `;handler=<h>` part whose handler name is empty, longer than [`MAX_HANDLER_LEN`] or
    /// holds a character outside `._-0-9a-zA-Z`.
    BadHandler,
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
            NameError::BadHandler => write!(
                f,
                "a ;handler= name must be 1 to {MAX_HANDLER_LEN} letters, digits, '.', '_' or '-'"
            ),
        }
    }
}

impl std::error::Error for NameError {}

/// Checks a name against the original's character set (plus `-`, which UUIDs need), and every
/// `;handler=<h>` part of it with [`validate_handler`].
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '*' | '.' | '_' | '-' | ';' | '=')))
    {
        return Err(NameError::BadCharacter(c));
    }
    for part in name.split(SEPARATOR).skip(1) {
        if let Some(handler) = part.strip_prefix("handler=") {
            validate_handler(handler)?;
        }
    }
    Ok(())
}

/// Checks an external handler's name: 1 to [`MAX_HANDLER_LEN`] of `A-Za-z0-9._-`.
pub fn validate_handler(handler: &str) -> Result<(), NameError> {
    let valid = !handler.is_empty()
        && handler.len() <= MAX_HANDLER_LEN
        && handler
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(NameError::BadHandler)
    }
}

/// The name without any `;…` qualifier.
pub fn base(name: &str) -> &str {
    match name.find(SEPARATOR) {
        Some(idx) => &name[..idx],
        None => name,
    }
}

/// The part of a name that routes, before the server's scope: the base, and a valid
/// `;handler=<h>` right after it if there is one (`instance.start;handler=foo`). Anything else
/// after a `;` is dropped.
pub fn routable(name: &str) -> &str {
    let base = base(name);
    let rest = &name[base.len()..];
    let Some(handler) = rest.strip_prefix(HANDLER_SUFFIX) else {
        return base;
    };
    let handler = self::base(handler);
    if validate_handler(handler).is_ok() {
        &name[..base.len() + HANDLER_SUFFIX.len() + handler.len()]
    } else {
        base
    }
}

/// The name a qualified subscriber receives: without the trailing scope (`;agent=<id>` or
/// `;account=<id>`) the server appended; everything before it, a `;handler=` part included,
/// stays.
pub fn strip_scope(name: &str) -> &str {
    match name.rsplit_once(SEPARATOR) {
        Some((rest, scope)) if scope_of_suffix(scope).is_some() => rest,
        _ => name,
    }
}

/// Whom a name addresses, read off its trailing scope: `;agent=<id>`, `;account=<id>`, or
/// (neither) [`Qualifier::Raw`].
pub fn scope(name: &str) -> Qualifier {
    name.rsplit_once(SEPARATOR)
        .and_then(|(_, suffix)| scope_of_suffix(suffix))
        .unwrap_or(Qualifier::Raw)
}

fn scope_of_suffix(suffix: &str) -> Option<Qualifier> {
    if let Some(id) = suffix.strip_prefix("agent=") {
        id.parse().ok().map(Qualifier::Agent)
    } else if let Some(id) = suffix.strip_prefix("account=") {
        id.parse().ok().map(Qualifier::Account)
    } else {
        None
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
    /// The name as this qualifier routes it: raw names stay as they are; otherwise the name's
    /// [`routable`] part is kept (its base and a `;handler=<h>`), any other client-supplied
    /// suffix is discarded, and the server's is appended.
    pub fn qualify(self, name: &str) -> String {
        match self {
            Qualifier::Raw => name.to_owned(),
            Qualifier::Agent(id) => format!("{};agent={id}", routable(name)),
            Qualifier::Account(id) => format!("{};account={id}", routable(name)),
        }
    }

    /// Whether a subscriber with this qualifier receives names with the scope stripped
    /// ([`strip_scope`]).
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

/// The name of a call to external handler `handler` during `process`:
/// `<process>;handler=<handler>` for a handler of the whole system (raw: admin and service
/// keys subscribe to it and answer it), `<process>;handler=<handler>;account=<project>` for one
/// registered in a project (that project's keys subscribe to `<process>;handler=<handler>` and
/// receive it under that name; they, and admin and service keys, answer it).
///
/// `handler` must pass [`validate_handler`] and `process` must have no `;`; a name built from
/// anything else routes nowhere anyone can subscribe.
pub fn for_handler(process: &str, handler: &str, project: Option<i64>) -> String {
    debug_assert!(validate_handler(handler).is_ok(), "handler {handler:?}");
    debug_assert!(!process.contains(SEPARATOR), "process {process:?}");
    match project {
        None => format!("{process}{HANDLER_SUFFIX}{handler}"),
        Some(project) => format!("{process}{HANDLER_SUFFIX}{handler};account={project}"),
    }
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
    fn a_handler_suffix_is_kept_and_scoped() {
        let project = Qualifier::Account(3);
        assert_eq!(
            project.qualify("instance.start;handler=foo"),
            "instance.start;handler=foo;account=3"
        );
        // A scope forged after the handler is dropped; the handler stays.
        assert_eq!(
            project.qualify("instance.start;handler=foo;account=9"),
            "instance.start;handler=foo;account=3"
        );
        assert_eq!(
            Qualifier::Agent(5).qualify("instance.start;handler=a-b_c.1"),
            "instance.start;handler=a-b_c.1;agent=5"
        );
        // Only right after the name, and only a valid one.
        assert_eq!(
            project.qualify("instance.start;account=9;handler=foo"),
            "instance.start;account=3"
        );
        assert_eq!(
            project.qualify("instance.start;handler=*"),
            "instance.start;account=3"
        );
        assert_eq!(
            project.qualify("instance.start;handler="),
            "instance.start;account=3"
        );
        // Idempotent.
        let once = project.qualify("instance.start;handler=foo");
        assert_eq!(project.qualify(&once), once);
    }

    #[test]
    fn delivery_strips_only_the_scope() {
        assert_eq!(
            strip_scope("instance.start;handler=foo;account=3"),
            "instance.start;handler=foo"
        );
        assert_eq!(strip_scope("ping;agent=1"), "ping");
        assert_eq!(
            strip_scope("instance.start;handler=foo"),
            "instance.start;handler=foo"
        );
        assert_eq!(strip_scope("resource.change"), "resource.change");
        assert_eq!(strip_scope("x;account=notanumber"), "x;account=notanumber");
    }

    #[test]
    fn handler_call_names_route_as_subscriptions_do() {
        let scoped = for_handler("instance.start", "foo", Some(3));
        assert_eq!(scoped, "instance.start;handler=foo;account=3");
        // What a project key subscribes to `instance.start;handler=foo` as, and receives.
        assert_eq!(
            Qualifier::Account(3).qualify("instance.start;handler=foo"),
            scoped
        );
        assert_eq!(strip_scope(&scoped), "instance.start;handler=foo");
        assert_eq!(scope(&scoped), Qualifier::Account(3));
        let raw = for_handler("instance.start", "foo", None);
        assert_eq!(raw, "instance.start;handler=foo");
        assert_eq!(Qualifier::Raw.qualify("instance.start;handler=foo"), raw);
        assert_eq!(scope(&raw), Qualifier::Raw);
        assert_eq!(validate(&scoped), Ok(()));
        assert_eq!(scope("ping;agent=7"), Qualifier::Agent(7));
        assert_eq!(scope("ping"), Qualifier::Raw);
    }

    #[test]
    fn names_are_validated() {
        assert!(validate("compute.instance.activate;agent=5").is_ok());
        assert!(validate("reply.123-abc_*").is_ok());
        assert_eq!(validate(""), Err(NameError::Empty));
        assert_eq!(validate("a b"), Err(NameError::BadCharacter(' ')));
        assert_eq!(validate(&"a".repeat(300)), Err(NameError::TooLong));
        assert!(validate("instance.start;handler=foo").is_ok());
        assert_eq!(
            validate("instance.start;handler="),
            Err(NameError::BadHandler)
        );
        assert_eq!(
            validate("instance.start;handler=a*"),
            Err(NameError::BadHandler)
        );
        assert_eq!(
            validate(&format!("x;handler={}", "h".repeat(MAX_HANDLER_LEN + 1))),
            Err(NameError::BadHandler)
        );
        assert!(validate(&format!("x;handler={}", "h".repeat(MAX_HANDLER_LEN))).is_ok());
        assert_eq!(base("ping;agent=1"), "ping");
        assert_eq!(base("ping"), "ping");
    }
}
