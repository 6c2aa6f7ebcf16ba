//! The policy syntax tree, its canonical printer and structural queries.
//!
//! Every traversal here is iterative (explicit stacks), so even a
//! hand-built tree far deeper than [`MAX_DEPTH`] is inspected and printed
//! without deep recursion. (The derived `Clone`, `PartialEq`, `Debug` and
//! `Drop` are recursive, as usual for Rust trees.)

use core::fmt;
use core::str::FromStr;
use std::collections::BTreeSet;

use crate::attribute::{Attribute, AuthorityId};
use crate::error::PolicyError;

/// Maximum length of a policy text, in bytes.
pub const MAX_POLICY_LEN: usize = 65536;
/// Maximum number of attribute leaves in a policy.
pub const MAX_LEAVES: usize = 1024;
/// Maximum depth of a policy tree (a single leaf has depth 1). The parser also
/// rejects texts whose parentheses nest more than this many levels.
pub const MAX_DEPTH: usize = 64;

/// An access policy: a monotone boolean formula over attributes.
///
/// Texts are parsed with [`parse`](crate::parse) (or [`str::parse`]) and
/// printed canonically with [`Display`](fmt::Display); the two round-trip.
/// Parsed trees satisfy the invariants checked by [`Policy::validate`]:
/// `And`/`Or` have at least two children and thresholds have
/// `1 <= k <= children.len()`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Policy {
    /// A single attribute.
    Leaf(Attribute),
    /// All children must be satisfied.
    And(Vec<Policy>),
    /// At least one child must be satisfied.
    Or(Vec<Policy>),
    /// At least `k` of the children must be satisfied (`k of (c1, c2, ...)`).
    Threshold {
        /// How many children must be satisfied.
        k: usize,
        /// The children.
        children: Vec<Policy>,
    },
}

impl Policy {
    /// Builds a leaf from an attribute text such as `doctor@hospital-a`.
    pub fn leaf(attribute: &str) -> Result<Self, PolicyError> {
        Ok(Policy::Leaf(attribute.parse()?))
    }

    /// The children of an inner node (empty for a leaf).
    pub fn children(&self) -> &[Policy] {
        match self {
            Policy::Leaf(_) => &[],
            Policy::And(c) | Policy::Or(c) | Policy::Threshold { children: c, .. } => c,
        }
    }

    /// All leaves in left-to-right order, found iteratively.
    fn leaves(&self) -> impl Iterator<Item = &Attribute> {
        let mut stack = vec![self];
        core::iter::from_fn(move || {
            while let Some(node) = stack.pop() {
                match node {
                    Policy::Leaf(a) => return Some(a),
                    _ => stack.extend(node.children().iter().rev()),
                }
            }
            None
        })
    }

    /// The distinct attributes mentioned by the policy.
    ///
    /// ```
    /// let p = mabe_policy::parse("a@x AND (b@y OR a@x)")?;
    /// let names: Vec<String> = p.attributes().iter().map(|a| a.to_string()).collect();
    /// assert_eq!(names, ["a@x", "b@y"]);
    /// # Ok::<(), mabe_policy::PolicyError>(())
    /// ```
    pub fn attributes(&self) -> BTreeSet<Attribute> {
        self.leaves().cloned().collect()
    }

    /// The distinct authorities whose attributes the policy mentions.
    pub fn authorities(&self) -> BTreeSet<AuthorityId> {
        self.leaves().map(|a| a.authority().clone()).collect()
    }

    /// The number of leaves (attribute occurrences, duplicates counted).
    pub fn leaf_count(&self) -> usize {
        self.leaves().count()
    }

    /// The depth of the tree; a leaf has depth 1.
    pub fn depth(&self) -> usize {
        let mut max = 0;
        let mut stack = vec![(self, 1usize)];
        while let Some((node, d)) = stack.pop() {
            max = max.max(d);
            stack.extend(node.children().iter().map(|c| (c, d.saturating_add(1))));
        }
        max
    }

    /// Checks the limits ([`MAX_DEPTH`], [`MAX_LEAVES`]) and node arities of
    /// a tree, e.g. one built by hand. Parsed policies always pass.
    ///
    /// ```
    /// use mabe_policy::{Policy, PolicyError};
    /// let p = Policy::Threshold { k: 3, children: vec![Policy::leaf("a@x")?, Policy::leaf("b@x")?] };
    /// assert_eq!(p.validate(), Err(PolicyError::InvalidThreshold { k: 3, n: 2 }));
    /// # Ok::<(), PolicyError>(())
    /// ```
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut leaves = 0usize;
        let mut stack = vec![(self, 1usize)];
        while let Some((node, d)) = stack.pop() {
            if d > MAX_DEPTH {
                return Err(PolicyError::TooDeep { max: MAX_DEPTH });
            }
            match node {
                Policy::Leaf(_) => {
                    leaves += 1;
                    if leaves > MAX_LEAVES {
                        return Err(PolicyError::TooManyLeaves { max: MAX_LEAVES });
                    }
                }
                Policy::And(c) if c.len() < 2 => {
                    return Err(PolicyError::InvalidArity {
                        node: "AND",
                        children: c.len(),
                    });
                }
                Policy::Or(c) if c.len() < 2 => {
                    return Err(PolicyError::InvalidArity {
                        node: "OR",
                        children: c.len(),
                    });
                }
                Policy::Threshold { k, children } if *k == 0 || *k > children.len() => {
                    return Err(PolicyError::InvalidThreshold {
                        k: *k,
                        n: children.len(),
                    });
                }
                _ => {}
            }
            stack.extend(node.children().iter().rev().map(|c| (c, d + 1)));
        }
        Ok(())
    }

    /// Whether holding the attributes in `held` satisfies the policy.
    ///
    /// ```
    /// use std::collections::BTreeSet;
    /// let p = mabe_policy::parse("doctor@a AND 2 of (x@a, y@b, z@c)")?;
    /// let held: BTreeSet<_> = ["doctor@a", "z@c", "x@a"].iter().map(|s| s.parse().unwrap()).collect();
    /// assert!(p.is_satisfied_by(&held));
    /// # Ok::<(), mabe_policy::PolicyError>(())
    /// ```
    pub fn is_satisfied_by(&self, held: &BTreeSet<Attribute>) -> bool {
        self.fold(
            |a| held.contains(a),
            |node, values| match node {
                Policy::Leaf(_) | Policy::And(_) => values.iter().all(|&v| v),
                Policy::Or(_) => values.iter().any(|&v| v),
                Policy::Threshold { k, .. } => values.iter().filter(|&&v| v).count() >= *k,
            },
        )
        .unwrap_or(false)
    }

    /// Bottom-up evaluation without recursion: `leaf` maps each leaf, `node`
    /// combines the values of an inner node's children (in order).
    fn fold<T>(
        &self,
        mut leaf: impl FnMut(&Attribute) -> T,
        mut node: impl FnMut(&Policy, Vec<T>) -> T,
    ) -> Option<T> {
        enum Step<'a> {
            Enter(&'a Policy),
            Exit(&'a Policy),
        }
        let mut work = vec![Step::Enter(self)];
        let mut values: Vec<T> = Vec::new();
        while let Some(step) = work.pop() {
            match step {
                Step::Enter(Policy::Leaf(a)) => values.push(leaf(a)),
                Step::Enter(p) => {
                    work.push(Step::Exit(p));
                    work.extend(p.children().iter().rev().map(Step::Enter));
                }
                Step::Exit(p) => {
                    let start = values.len().checked_sub(p.children().len())?;
                    let children = values.split_off(start);
                    values.push(node(p, children));
                }
            }
        }
        values.pop()
    }
}

impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        crate::parser::parse(text)
    }
}

/// Canonical text: `AND`/`OR` in uppercase, `k of (c1, c2)` with lowercase
/// `of`; an `AND`/`OR` child of an `AND`/`OR` node is parenthesised,
/// threshold children are printed bare. Parsing the output gives back the
/// same tree.
///
/// ```
/// let text = "(Doctor@A and cardiology@a) or 2 OF (emergency@a,emergency@b , emergency@c)";
/// let p = mabe_policy::parse(text)?;
/// assert_eq!(
///     p.to_string(),
///     "(doctor@a AND cardiology@a) OR 2 of (emergency@a, emergency@b, emergency@c)"
/// );
/// assert_eq!(mabe_policy::parse(&p.to_string())?, p);
/// # Ok::<(), mabe_policy::PolicyError>(())
/// ```
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        enum Item<'a> {
            Node(&'a Policy, bool),
            Text(&'static str),
        }
        let mut stack = vec![Item::Node(self, false)];
        while let Some(item) = stack.pop() {
            let (node, parens) = match item {
                Item::Text(s) => {
                    f.write_str(s)?;
                    continue;
                }
                Item::Node(node, parens) => (node, parens),
            };
            let (separator, children) = match node {
                Policy::Leaf(a) => {
                    write!(f, "{a}")?;
                    continue;
                }
                Policy::And(c) => (" AND ", c),
                Policy::Or(c) => (" OR ", c),
                Policy::Threshold { k, children } => {
                    write!(f, "{k} of (")?;
                    (", ", children)
                }
            };
            let is_threshold = matches!(node, Policy::Threshold { .. });
            if is_threshold || parens {
                if !is_threshold {
                    f.write_str("(")?;
                }
                stack.push(Item::Text(")"));
            }
            for (i, child) in children.iter().enumerate().rev() {
                let child_parens = !is_threshold && matches!(child, Policy::And(_) | Policy::Or(_));
                stack.push(Item::Node(child, child_parens));
                if i > 0 {
                    stack.push(Item::Text(separator));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(s: &str) -> Policy {
        Policy::leaf(s).unwrap()
    }

    #[test]
    fn display_canonical() {
        let p = Policy::Or(vec![
            Policy::And(vec![leaf("doctor@a"), leaf("cardiology@a")]),
            Policy::Threshold {
                k: 2,
                children: vec![
                    leaf("emergency@a"),
                    leaf("emergency@b"),
                    leaf("emergency@c"),
                ],
            },
        ]);
        assert_eq!(
            p.to_string(),
            "(doctor@a AND cardiology@a) OR 2 of (emergency@a, emergency@b, emergency@c)"
        );
        let q = Policy::Threshold {
            k: 1,
            children: vec![
                Policy::Or(vec![
                    leaf("a@x"),
                    Policy::And(vec![leaf("b@x"), leaf("c@x")]),
                ]),
                Policy::And(vec![
                    Policy::Or(vec![leaf("d@x"), leaf("e@x")]),
                    Policy::Threshold {
                        k: 1,
                        children: vec![leaf("f@x")],
                    },
                ]),
            ],
        };
        assert_eq!(
            q.to_string(),
            "1 of (a@x OR (b@x AND c@x), (d@x OR e@x) AND 1 of (f@x))"
        );
    }

    #[test]
    fn queries() {
        let p = Policy::And(vec![
            leaf("a@x"),
            Policy::Or(vec![
                leaf("b@y"),
                Policy::And(vec![leaf("a@x"), leaf("c@z")]),
            ]),
        ]);
        assert_eq!(p.leaf_count(), 4);
        assert_eq!(p.depth(), 4);
        assert_eq!(p.attributes().len(), 3);
        assert_eq!(p.authorities().len(), 3);
        assert_eq!(leaf("a@x").depth(), 1);
        assert!(p.validate().is_ok());
    }

    #[test]
    fn validate_hand_built() {
        assert_eq!(
            Policy::And(vec![leaf("a@x")]).validate(),
            Err(PolicyError::InvalidArity {
                node: "AND",
                children: 1
            })
        );
        assert_eq!(
            Policy::Or(vec![]).validate(),
            Err(PolicyError::InvalidArity {
                node: "OR",
                children: 0
            })
        );
        assert_eq!(
            Policy::Threshold {
                k: 0,
                children: vec![leaf("a@x")]
            }
            .validate(),
            Err(PolicyError::InvalidThreshold { k: 0, n: 1 })
        );
        assert_eq!(
            Policy::Threshold {
                k: 1,
                children: vec![]
            }
            .validate(),
            Err(PolicyError::InvalidThreshold { k: 1, n: 0 })
        );
        let wide = Policy::Or(vec![leaf("a@x"); MAX_LEAVES + 1]);
        assert_eq!(
            wide.validate(),
            Err(PolicyError::TooManyLeaves { max: MAX_LEAVES })
        );
        assert!(Policy::Or(vec![leaf("a@x"); MAX_LEAVES]).validate().is_ok());
    }

    fn chain(depth: usize) -> Policy {
        let mut p = leaf("a@x");
        for _ in 1..depth {
            p = Policy::Threshold {
                k: 1,
                children: vec![p],
            };
        }
        p
    }

    #[test]
    fn very_deep_hand_built_tree_is_handled_iteratively() {
        let p = chain(100_000);
        assert_eq!(p.depth(), 100_000);
        assert_eq!(p.validate(), Err(PolicyError::TooDeep { max: MAX_DEPTH }));
        assert_eq!(p.leaf_count(), 1);
        let held = p.attributes();
        assert!(p.is_satisfied_by(&held));
        assert!(p.to_string().starts_with("1 of (1 of ("));
        // Tear down without recursive drop.
        let mut p = p;
        while let Policy::Threshold { mut children, .. } = p {
            match children.pop() {
                Some(c) => p = c,
                None => break,
            }
        }
        assert_eq!(chain(MAX_DEPTH).validate(), Ok(()));
        assert_eq!(
            chain(MAX_DEPTH + 1).validate(),
            Err(PolicyError::TooDeep { max: MAX_DEPTH })
        );
    }

    #[test]
    fn satisfaction() {
        let p = Policy::Threshold {
            k: 2,
            children: vec![
                leaf("a@x"),
                leaf("b@x"),
                Policy::And(vec![leaf("c@x"), leaf("d@x")]),
            ],
        };
        let set = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<BTreeSet<_>>()
        };
        assert!(!p.is_satisfied_by(&set(&["a@x", "c@x"])));
        assert!(p.is_satisfied_by(&set(&["a@x", "c@x", "d@x"])));
        assert!(p.is_satisfied_by(&set(&["a@x", "b@x"])));
        assert!(!p.is_satisfied_by(&set(&[])));
    }
}
