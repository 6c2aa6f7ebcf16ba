//! The `mabe` policy language: attributes, a parser and canonical printer for
//! access policies, and linear secret-sharing schemes (LSSS) built from them.
//!
//! ```
//! use ark_bls12_381::Fr;
//! use mabe_policy::{parse, Lsss};
//!
//! let policy = parse("(doctor@hospital-a AND cardiology@hospital-a) OR 2 of (er@a, er@b, er@c)")?;
//! assert_eq!(parse(&policy.to_string())?, policy);
//!
//! let lsss = Lsss::<Fr>::from_policy(&policy)?;
//! let solution = lsss.solve(|_, attribute| attribute.name() == "er")?;
//! assert_eq!(solution.rows().len(), 2);
//! # Ok::<(), mabe_policy::PolicyError>(())
//! ```
//!
//! The crate is pure: no I/O, no `unsafe`, and no panics on any input. All
//! inputs are bounded by [`MAX_POLICY_LEN`], [`MAX_LEAVES`] and [`MAX_DEPTH`].

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod ast;
pub mod attribute;
pub mod error;
pub mod lsss;
pub mod parser;

pub use ast::{MAX_DEPTH, MAX_LEAVES, MAX_POLICY_LEN, Policy};
pub use attribute::{Attribute, AuthorityId};
pub use error::PolicyError;
pub use lsss::{Lsss, Row, Solution};
pub use parser::parse;
