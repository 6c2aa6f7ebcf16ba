//! The single error type of the crate.

use crate::attribute::Attribute;

/// Everything that can go wrong while parsing, validating or solving a policy.
///
/// The enum is `#[non_exhaustive]`: match it with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The policy text is not well formed.
    ///
    /// Displays as `"{message} at {position}"`, a newline, then the snippet.
    #[error("{message} at {position}\n{snippet}")]
    Syntax {
        /// What is wrong, e.g. `unexpected ')'`.
        message: String,
        /// 0-based byte offset in the input where the problem was found.
        position: usize,
        /// One line of the input around `position`, a newline, and a caret
        /// line (`   ^`) pointing at the offending column.
        snippet: String,
    },
    /// The policy text is longer than [`MAX_POLICY_LEN`](crate::MAX_POLICY_LEN) bytes.
    #[error("policy text is too long: {len} bytes (the maximum is {max})")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
        /// The limit that was exceeded.
        max: usize,
    },
    /// The policy has more than [`MAX_LEAVES`](crate::MAX_LEAVES) attribute leaves.
    #[error("policy has too many attribute leaves (the maximum is {max})")]
    TooManyLeaves {
        /// The limit that was exceeded.
        max: usize,
    },
    /// The policy (or the parenthesis nesting of its text) is deeper than
    /// [`MAX_DEPTH`](crate::MAX_DEPTH).
    #[error("policy is nested too deeply (the maximum depth is {max})")]
    TooDeep {
        /// The limit that was exceeded.
        max: usize,
    },
    /// A string is not a valid [`AuthorityId`](crate::AuthorityId).
    #[error("invalid authority id '{text}': {reason}")]
    InvalidAuthority {
        /// The rejected input.
        text: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A string is not a valid [`Attribute`].
    #[error("invalid attribute '{text}': {reason}")]
    InvalidAttribute {
        /// The rejected input.
        text: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A hand-built threshold node has `k == 0`, `k > n` or no children.
    #[error("invalid threshold {k} of {n}: need 1 <= k <= n and n >= 1")]
    InvalidThreshold {
        /// The threshold.
        k: usize,
        /// The number of children.
        n: usize,
    },
    /// A hand-built `AND` or `OR` node has fewer than two children.
    #[error("{node} node has {children} child(ren); AND and OR nodes need at least 2")]
    InvalidArity {
        /// `"AND"` or `"OR"`.
        node: &'static str,
        /// The number of children it has.
        children: usize,
    },
    /// The prime field is too small for the LSSS construction (its modulus
    /// must exceed [`MAX_LEAVES`](crate::MAX_LEAVES) so that threshold
    /// x-coordinates are distinct and non-zero).
    #[error("field modulus of {bits} bits is too small for the LSSS construction")]
    FieldTooSmall {
        /// `MODULUS_BIT_SIZE` of the field.
        bits: u32,
    },
    /// The held attributes do not satisfy the policy.
    ///
    /// `missing` is a smallest (per-node minimal) set of attributes whose
    /// addition would satisfy it: sorted and without duplicates.
    #[error(
        "policy is not satisfied; missing attributes: {}",
        list_attributes(missing)
    )]
    Unsatisfied {
        /// Attributes that would make the policy satisfied if added.
        missing: Vec<Attribute>,
    },
}

fn list_attributes(list: &[Attribute]) -> String {
    if list.is_empty() {
        return "(none)".to_owned();
    }
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
