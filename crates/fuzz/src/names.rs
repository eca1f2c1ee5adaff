//! Event-name validation and qualification.

use drover_proto::names::{self, MAX_NAME_LEN, Qualifier};

/// `data`: one byte choosing the qualifier, eight bytes of id, then the name (UTF-8).
/// Returns whether `data` was long enough to hold a name.
pub fn names(data: &[u8]) -> bool {
    if data.len() < 9 {
        return false;
    }
    let id = i64::from_le_bytes(data[1..9].try_into().expect("eight bytes"));
    let qualifier = match data[0] % 3 {
        0 => Qualifier::Raw,
        1 => Qualifier::Agent(id),
        _ => Qualifier::Account(id),
    };
    let name = String::from_utf8_lossy(&data[9..]);
    check(qualifier, &name);
    true
}

/// The properties for one qualifier and one name.
pub fn check(qualifier: Qualifier, name: &str) {
    if names::validate(name).is_ok() {
        assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || "*._-;=".contains(c))
        );
    }
    let base = names::base(name);
    assert!(!base.contains(names::SEPARATOR));
    assert!(name.starts_with(base));
    // What routes: the base, and a valid `;handler=<h>` right after it.
    let routable = names::routable(name);
    assert!(name.starts_with(routable));
    match routable.strip_prefix(base) {
        Some("") => {}
        Some(rest) => {
            let handler = rest
                .strip_prefix(names::HANDLER_SUFFIX)
                .unwrap_or_else(|| panic!("{name:?} routes as {routable:?}"));
            assert_eq!(names::validate_handler(handler), Ok(()));
        }
        None => panic!("{name:?} routes as {routable:?}"),
    }

    let qualified = qualifier.qualify(name);
    assert_eq!(
        qualifier.qualify(&qualified),
        qualified,
        "qualification is not idempotent"
    );
    match qualifier {
        Qualifier::Raw => {
            assert_eq!(qualified, name);
            assert!(!qualifier.strips());
        }
        Qualifier::Agent(id) | Qualifier::Account(id) => {
            let suffix = match qualifier {
                Qualifier::Agent(_) => format!(";agent={id}"),
                _ => format!(";account={id}"),
            };
            // Whatever `;…` the client sent, the server's suffix is the only scope, and only a
            // handler stays before it.
            assert_eq!(
                qualified.strip_suffix(&suffix),
                Some(routable),
                "{name:?} qualified as {qualified:?}"
            );
            assert_eq!(names::scope(&qualified), qualifier);
            // Delivery strips the scope and nothing else.
            assert_eq!(names::strip_scope(&qualified), routable);
            assert_eq!(names::base(&qualified), base);
            assert!(qualifier.strips());
            let expected = match qualifier {
                Qualifier::Agent(_) => names::for_agent(name, id),
                _ => names::for_account(name, id),
            };
            assert_eq!(qualified, expected);
            // A valid name whose base is not empty qualifies to a valid name (when short enough).
            if names::validate(name).is_ok() && !base.is_empty() && qualified.len() <= MAX_NAME_LEN
            {
                assert_eq!(names::validate(&qualified), Ok(()));
            }
            // A handler call's name is what a subscriber of its handler name is qualified to.
            if let (Qualifier::Account(_), Some(handler)) = (
                qualifier,
                routable
                    .strip_prefix(base)
                    .and_then(|rest| rest.strip_prefix(names::HANDLER_SUFFIX)),
            ) && !base.is_empty()
            {
                assert_eq!(names::for_handler(base, handler, Some(id)), qualified);
            }
        }
    }
}
