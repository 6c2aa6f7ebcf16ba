//! Authority identifiers and attributes (`name@authority`).

use core::fmt;
use core::str::FromStr;

use crate::error::PolicyError;

/// Maximum length of an [`AuthorityId`] in bytes.
pub const MAX_AUTHORITY_LEN: usize = 63;
/// Maximum length of an attribute name in bytes.
pub const MAX_ATTRIBUTE_NAME_LEN: usize = 128;

/// The identifier of an attribute authority, e.g. `hospital-a`.
///
/// Canonical form: lowercase, matching `[a-z0-9][a-z0-9-]{0,62}`. ASCII
/// uppercase letters in the input are lowercased before validation; nothing
/// is trimmed.
///
/// ```
/// use mabe_policy::AuthorityId;
/// let id: AuthorityId = "Hospital-A".parse()?;
/// assert_eq!(id.as_str(), "hospital-a");
/// assert!("hospital_a".parse::<AuthorityId>().is_err());
/// # Ok::<(), mabe_policy::PolicyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct AuthorityId(String);

impl AuthorityId {
    /// Parses and validates an authority id (same as [`FromStr`]).
    pub fn new(text: &str) -> Result<Self, PolicyError> {
        text.parse()
    }

    /// The canonical (lowercase) text of the id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AuthorityId {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let canonical = text.to_ascii_lowercase();
        match authority_problem(&canonical) {
            None => Ok(AuthorityId(canonical)),
            Some(problem) => Err(PolicyError::InvalidAuthority {
                text: text.to_owned(),
                reason: problem.authority_reason(),
            }),
        }
    }
}

impl fmt::Display for AuthorityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for AuthorityId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// An attribute issued by an authority; text form `name@authority`.
///
/// The name matches `[a-z0-9][a-z0-9_.:-]{0,127}` and the authority is an
/// [`AuthorityId`]. ASCII uppercase letters are lowercased, so the stored form
/// is canonical. Ordering is by name, then authority.
///
/// ```
/// use mabe_policy::Attribute;
/// let a: Attribute = "Cardiology@Hospital-A".parse()?;
/// assert_eq!(a.name(), "cardiology");
/// assert_eq!(a.authority().as_str(), "hospital-a");
/// assert_eq!(a.to_string(), "cardiology@hospital-a");
/// # Ok::<(), mabe_policy::PolicyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Attribute {
    name: String,
    authority: AuthorityId,
}

impl Attribute {
    /// Builds an attribute from a name (validated and lowercased) and an
    /// authority.
    pub fn new(name: &str, authority: &AuthorityId) -> Result<Self, PolicyError> {
        let canonical = name.to_ascii_lowercase();
        if let Some(reason) = name_problem(&canonical) {
            return Err(PolicyError::InvalidAttribute {
                text: name.to_owned(),
                reason,
            });
        }
        Ok(Attribute {
            name: canonical,
            authority: authority.clone(),
        })
    }

    /// The attribute name (the part before `@`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The issuing authority (the part after `@`).
    pub fn authority(&self) -> &AuthorityId {
        &self.authority
    }
}

impl FromStr for Attribute {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| PolicyError::InvalidAttribute {
            text: text.to_owned(),
            reason,
        };
        let mut parts = text.split('@');
        let (Some(name), Some(authority), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid("must contain exactly one '@'"));
        };
        let name = name.to_ascii_lowercase();
        if let Some(reason) = name_problem(&name) {
            return Err(invalid(reason));
        }
        let authority = authority.to_ascii_lowercase();
        if let Some(problem) = authority_problem(&authority) {
            return Err(invalid(problem.attribute_reason()));
        }
        Ok(Attribute {
            name,
            authority: AuthorityId(authority),
        })
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.authority)
    }
}

#[derive(Clone, Copy)]
enum AuthorityProblem {
    Empty,
    TooLong,
    BadStart,
    BadChar,
}

impl AuthorityProblem {
    fn authority_reason(self) -> &'static str {
        match self {
            AuthorityProblem::Empty => "must not be empty",
            AuthorityProblem::TooLong => "must be at most 63 characters long",
            AuthorityProblem::BadStart => "must start with a letter or a digit",
            AuthorityProblem::BadChar => "may contain only letters, digits and '-'",
        }
    }

    fn attribute_reason(self) -> &'static str {
        match self {
            AuthorityProblem::Empty => "the authority (after '@') must not be empty",
            AuthorityProblem::TooLong => {
                "the authority (after '@') must be at most 63 characters long"
            }
            AuthorityProblem::BadStart => {
                "the authority (after '@') must start with a letter or a digit"
            }
            AuthorityProblem::BadChar => {
                "the authority (after '@') may contain only letters, digits and '-'"
            }
        }
    }
}

/// Checks an already-lowercased authority id.
fn authority_problem(s: &str) -> Option<AuthorityProblem> {
    let bytes = s.as_bytes();
    let Some(&first) = bytes.first() else {
        return Some(AuthorityProblem::Empty);
    };
    if !is_lower_alnum(first) {
        return Some(AuthorityProblem::BadStart);
    }
    if !bytes.iter().all(|&b| is_lower_alnum(b) || b == b'-') {
        return Some(AuthorityProblem::BadChar);
    }
    if bytes.len() > MAX_AUTHORITY_LEN {
        return Some(AuthorityProblem::TooLong);
    }
    None
}

/// Checks an already-lowercased attribute name.
fn name_problem(s: &str) -> Option<&'static str> {
    let bytes = s.as_bytes();
    let Some(&first) = bytes.first() else {
        return Some("the name (before '@') must not be empty");
    };
    if !is_lower_alnum(first) {
        return Some("the name (before '@') must start with a letter or a digit");
    }
    if !bytes
        .iter()
        .all(|&b| is_lower_alnum(b) || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        return Some(
            "the name (before '@') may contain only letters, digits, '_', '.', ':' and '-'",
        );
    }
    if bytes.len() > MAX_ATTRIBUTE_NAME_LEN {
        return Some("the name (before '@') must be at most 128 characters long");
    }
    None
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_valid_and_lowercased() {
        let id: AuthorityId = "Hosp-1".parse().unwrap();
        assert_eq!(id.as_str(), "hosp-1");
        assert_eq!(id.to_string(), "hosp-1");
        assert!("0".parse::<AuthorityId>().is_ok());
        assert!("a".repeat(63).parse::<AuthorityId>().is_ok());
    }

    #[test]
    fn authority_invalid() {
        for (bad, reason) in [
            ("", "must not be empty"),
            ("-a", "must start with a letter or a digit"),
            ("a_b", "may contain only letters, digits and '-'"),
            (" a", "must start with a letter or a digit"),
            ("a ", "may contain only letters, digits and '-'"),
            ("hôpital", "may contain only letters, digits and '-'"),
        ] {
            assert_eq!(
                bad.parse::<AuthorityId>(),
                Err(PolicyError::InvalidAuthority {
                    text: bad.to_owned(),
                    reason
                }),
                "{bad:?}"
            );
        }
        assert!(matches!(
            "a".repeat(64).parse::<AuthorityId>(),
            Err(PolicyError::InvalidAuthority { .. })
        ));
    }

    #[test]
    fn attribute_roundtrip_and_parts() {
        let a: Attribute = "Doctor.Senior:x_1-2@Hosp-A".parse().unwrap();
        assert_eq!(a.name(), "doctor.senior:x_1-2");
        assert_eq!(a.authority().as_str(), "hosp-a");
        assert_eq!(a.to_string(), "doctor.senior:x_1-2@hosp-a");
        assert_eq!(a.to_string().parse::<Attribute>().unwrap(), a);
        let b = Attribute::new("DOCTOR.senior:X_1-2", a.authority()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn attribute_invalid() {
        for bad in [
            "", "doctor", "a@b@c", "@x", "a@", "_a@x", "a b@x", "a@x_y", "a@-x", "é@x",
        ] {
            assert!(
                matches!(
                    bad.parse::<Attribute>(),
                    Err(PolicyError::InvalidAttribute { .. })
                ),
                "{bad:?}"
            );
        }
        let long = format!("{}@x", "a".repeat(129));
        assert!(long.parse::<Attribute>().is_err());
        let ok = format!("{}@x", "a".repeat(128));
        assert!(ok.parse::<Attribute>().is_ok());
        let auth: AuthorityId = "x".parse().unwrap();
        assert!(Attribute::new("", &auth).is_err());
        assert!(Attribute::new("a@b", &auth).is_err());
    }

    #[test]
    fn ordering_is_name_then_authority() {
        let a: Attribute = "a@z".parse().unwrap();
        let b: Attribute = "b@a".parse().unwrap();
        assert!(a < b);
    }
}
