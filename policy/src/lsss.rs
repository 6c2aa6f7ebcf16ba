//! Linear secret-sharing schemes (monotone span programs) built from policies.
//!
//! [`Lsss::from_policy`] turns a [`Policy`] into a share-generating matrix
//! with one row per leaf (left-to-right leaf order):
//!
//! * column 0 is the secret column; the root gets the vector `(1)` and the
//!   reconstruction target is `(1, 0, ..., 0)`;
//! * an `AND` node with vector `v` and `m` children allocates `m - 1` fresh
//!   columns `j1..j(m-1)` (Lewko–Waters chain): child 1 gets `v + e_j1`,
//!   child `i` gets `-e_j(i-1) + e_ji`, child `m` gets `-e_j(m-1)`;
//! * an `OR` node gives every child `v`;
//! * a `k of n` threshold allocates `k - 1` fresh columns `j1..j(k-1)` and
//!   gives child `i` (1-based) `v + sum_t i^t e_jt` (Vandermonde); any `k`
//!   children reconstruct `v` with Lagrange coefficients at 0.
//!
//! [`Lsss::solve`] finds reconstruction coefficients for a set of held rows.

use std::collections::BTreeSet;

use ark_ff::PrimeField;

use crate::ast::{MAX_LEAVES, Policy};
use crate::attribute::Attribute;
use crate::error::PolicyError;

/// One row of the share-generating matrix: the attribute of a leaf and its
/// sparse vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row<F> {
    attribute: Attribute,
    entries: Vec<(usize, F)>,
}

impl<F> Row<F> {
    /// The attribute labelling this row.
    pub fn attribute(&self) -> &Attribute {
        &self.attribute
    }

    /// The non-zero entries `(column, value)`, sorted by column.
    pub fn entries(&self) -> &[(usize, F)] {
        &self.entries
    }
}

impl<F: PrimeField> Row<F> {
    /// The dot product `A_x · v`. Columns beyond the end of `v` count as zero.
    ///
    /// ```
    /// use ark_bls12_381::Fr;
    /// use mabe_policy::{parse, Lsss};
    /// let lsss = Lsss::<Fr>::from_policy(&parse("a@x AND b@x")?)?;
    /// let w = [Fr::from(7u64), Fr::from(3u64)];
    /// // Shares of the secret 7: (7 + 3) and (-3).
    /// let shares: Vec<Fr> = lsss.rows().iter().map(|r| r.dot(&w)).collect();
    /// assert_eq!(shares, [Fr::from(10u64), -Fr::from(3u64)]);
    /// assert_eq!(lsss.rows()[0].dot(&[]), Fr::from(0u64));
    /// # Ok::<(), mabe_policy::PolicyError>(())
    /// ```
    pub fn dot(&self, v: &[F]) -> F {
        self.entries
            .iter()
            .filter_map(|&(column, value)| v.get(column).map(|&x| value * x))
            .sum()
    }

    /// The row as a dense vector of length `columns` (entries at columns
    /// `>= columns` are dropped).
    pub fn to_dense(&self, columns: usize) -> Vec<F> {
        let mut dense = vec![F::zero(); columns];
        for &(column, value) in &self.entries {
            if let Some(slot) = dense.get_mut(column) {
                *slot = value;
            }
        }
        dense
    }
}

/// A node of the policy tree kept for [`Lsss::solve`]; children are indices
/// into `Lsss::nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Gate {
    Leaf(usize),
    And(Vec<usize>),
    Or(Vec<usize>),
    Threshold(usize, Vec<usize>),
}

/// A linear secret-sharing scheme for a policy: the share-generating matrix
/// (rows in left-to-right leaf order) and the tree needed to solve it.
///
/// ```
/// use ark_bls12_381::Fr;
/// use mabe_policy::{parse, Lsss};
/// let policy = parse("(doctor@a AND cardiology@a) OR 2 of (er@a, er@b, er@c)")?;
/// let lsss = Lsss::<Fr>::from_policy(&policy)?;
/// assert_eq!(lsss.len(), 5);
/// assert_eq!(lsss.columns(), 3); // secret + 1 (AND) + 1 (2 of 3)
/// assert_eq!(lsss.rows()[2].attribute().to_string(), "er@a");
/// # Ok::<(), mabe_policy::PolicyError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lsss<F> {
    rows: Vec<Row<F>>,
    columns: usize,
    nodes: Vec<Gate>,
    root: usize,
}

/// Reconstruction coefficients: `sum c_x * A_x = (1, 0, ..., 0)` over the
/// listed rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Solution<F> {
    rows: Vec<(usize, F)>,
}

impl<F> Solution<F> {
    /// The `(row index, coefficient)` pairs, in ascending row order.
    pub fn rows(&self) -> &[(usize, F)] {
        &self.rows
    }

    /// The number of rows used.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is used (never the case for a successful solve).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl<F: PrimeField> Lsss<F> {
    /// Builds the LSSS of a policy, after checking it with
    /// [`Policy::validate`].
    ///
    /// Fails with [`PolicyError::FieldTooSmall`] if the field modulus is not
    /// larger than [`MAX_LEAVES`] (threshold x-coordinates must be distinct
    /// and non-zero).
    ///
    /// ```
    /// use ark_bls12_381::Fr;
    /// use mabe_policy::{parse, Lsss};
    /// let lsss = Lsss::<Fr>::from_policy(&parse("a@x AND b@x AND c@x")?)?;
    /// let dense: Vec<Vec<Fr>> = lsss.rows().iter().map(|r| r.to_dense(lsss.columns())).collect();
    /// let (one, zero) = (Fr::from(1u64), Fr::from(0u64));
    /// assert_eq!(dense, [
    ///     vec![one, one, zero],
    ///     vec![zero, -one, one],
    ///     vec![zero, zero, -one],
    /// ]);
    /// # Ok::<(), mabe_policy::PolicyError>(())
    /// ```
    pub fn from_policy(policy: &Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        let bits = F::MODULUS_BIT_SIZE;
        // p >= 2^(bits-1), so bits > bitlen(MAX_LEAVES) gives p > MAX_LEAVES.
        if bits <= usize::BITS - MAX_LEAVES.leading_zeros() {
            return Err(PolicyError::FieldTooSmall { bits });
        }
        let mut builder = Builder {
            rows: Vec::new(),
            nodes: Vec::new(),
            columns: 1,
        };
        // Recursion depth is bounded by MAX_DEPTH thanks to `validate`.
        let root = builder.build(policy, vec![(0, F::one())]);
        Ok(Lsss {
            rows: builder.rows,
            columns: builder.columns,
            nodes: builder.nodes,
            root,
        })
    }

    /// The rows of the share-generating matrix, in left-to-right leaf order.
    pub fn rows(&self) -> &[Row<F>] {
        &self.rows
    }

    /// The number of rows (leaves).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the matrix has no rows (never true for a valid policy).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The number of columns, including the secret column 0.
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Finds reconstruction coefficients using the fewest rows among those
    /// for which `holds(row_index, attribute)` is true.
    ///
    /// `holds` is called exactly once per row. The choice is made by dynamic
    /// programming over the tree (AND: all children; OR: the cheapest child;
    /// `k of n`: the `k` cheapest satisfiable children; ties go to the
    /// leftmost) and the coefficients are the products of the Lagrange
    /// coefficients along each path. When the policy is not satisfied, the
    /// error is [`PolicyError::Unsatisfied`] with a small set of missing
    /// attributes, chosen by the same dynamic programming.
    ///
    /// ```
    /// use std::collections::BTreeSet;
    /// use ark_bls12_381::Fr;
    /// use mabe_policy::{parse, Attribute, Lsss, PolicyError};
    /// let lsss = Lsss::<Fr>::from_policy(&parse("(a@x AND b@x AND c@x) OR d@x")?)?;
    ///
    /// let all = |_: usize, _: &Attribute| true;
    /// let solution = lsss.solve(all)?;
    /// assert_eq!(solution.rows(), &[(3, Fr::from(1u64))]); // d@x alone
    ///
    /// let held: BTreeSet<Attribute> = ["a@x".parse()?, "c@x".parse()?].into();
    /// let err = lsss.solve(|_, a| held.contains(a)).unwrap_err();
    /// assert_eq!(err, PolicyError::Unsatisfied { missing: vec!["b@x".parse()?] });
    ///
    /// // sum c_x * A_x is the target (1, 0, ..., 0).
    /// let solution = lsss.solve(|row, _| row != 3)?;
    /// let mut sum = vec![Fr::from(0u64); lsss.columns()];
    /// for &(row, c) in solution.rows() {
    ///     for &(col, v) in lsss.rows()[row].entries() {
    ///         sum[col] += c * v;
    ///     }
    /// }
    /// assert_eq!(sum, [Fr::from(1u64), Fr::from(0u64), Fr::from(0u64)]);
    /// # Ok::<(), PolicyError>(())
    /// ```
    pub fn solve(
        &self,
        holds: impl Fn(usize, &Attribute) -> bool,
    ) -> Result<Solution<F>, PolicyError> {
        let held: Vec<bool> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| holds(i, &row.attribute))
            .collect();
        let mut costs: Vec<Option<usize>> = vec![None; self.nodes.len()];
        self.cost(self.root, &held, &mut costs);
        if costs.get(self.root).copied().flatten().is_none() {
            return Err(PolicyError::Unsatisfied {
                missing: self.missing(self.root, &held).into_iter().collect(),
            });
        }
        let mut rows = Vec::new();
        self.collect(self.root, F::one(), &costs, &mut rows)?;
        rows.sort_by_key(|&(row, _)| row);
        Ok(Solution { rows })
    }

    /// Fills `costs[node]` with the fewest held rows satisfying the subtree
    /// (`None` if unsatisfiable). Recursion is bounded by the tree depth.
    fn cost(&self, node: usize, held: &[bool], costs: &mut [Option<usize>]) -> Option<usize> {
        let cost = match self.nodes.get(node)? {
            Gate::Leaf(row) => held.get(*row).copied().unwrap_or(false).then_some(1),
            Gate::And(children) => children
                .iter()
                .map(|&c| self.cost(c, held, costs))
                .collect::<Vec<_>>()
                .into_iter()
                .sum(),
            Gate::Or(children) => children
                .iter()
                .map(|&c| self.cost(c, held, costs))
                .collect::<Vec<_>>()
                .into_iter()
                .flatten()
                .min(),
            Gate::Threshold(k, children) => {
                let child_costs: Vec<Option<usize>> = children
                    .iter()
                    .map(|&c| self.cost(c, held, costs))
                    .collect();
                cheapest(&child_costs, *k).map(|chosen| {
                    chosen
                        .iter()
                        .filter_map(|&i| child_costs.get(i).copied().flatten())
                        .sum()
                })
            }
        };
        if let Some(slot) = costs.get_mut(node) {
            *slot = cost;
        }
        cost
    }

    /// Walks the chosen children, pushing `(row, coefficient)` pairs.
    fn collect(
        &self,
        node: usize,
        coefficient: F,
        costs: &[Option<usize>],
        out: &mut Vec<(usize, F)>,
    ) -> Result<(), PolicyError> {
        let cost_of = |c: &usize| costs.get(*c).copied().flatten();
        match self.nodes.get(node) {
            None => {}
            Some(Gate::Leaf(row)) => out.push((*row, coefficient)),
            Some(Gate::And(children)) => {
                for &c in children {
                    self.collect(c, coefficient, costs, out)?;
                }
            }
            Some(Gate::Or(children)) => {
                let mut best: Option<(usize, usize)> = None;
                for &c in children {
                    if let Some(cost) = cost_of(&c) {
                        if best.is_none_or(|(b, _)| cost < b) {
                            best = Some((cost, c));
                        }
                    }
                }
                if let Some((_, c)) = best {
                    self.collect(c, coefficient, costs, out)?;
                }
            }
            Some(Gate::Threshold(k, children)) => {
                let child_costs: Vec<Option<usize>> = children.iter().map(cost_of).collect();
                let chosen = cheapest(&child_costs, *k).unwrap_or_default();
                // x-coordinates are the 1-based child positions.
                let xs: Vec<F> = chosen.iter().map(|&i| F::from(i as u64 + 1)).collect();
                for (&i, &x) in chosen.iter().zip(&xs) {
                    let lagrange = lagrange_at_zero(x, &xs)?;
                    if let Some(&c) = children.get(i) {
                        self.collect(c, coefficient * lagrange, costs, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A per-node minimal set of missing attributes that would satisfy the
    /// subtree.
    fn missing(&self, node: usize, held: &[bool]) -> BTreeSet<Attribute> {
        match self.nodes.get(node) {
            None => BTreeSet::new(),
            Some(Gate::Leaf(row)) => match (held.get(*row), self.rows.get(*row)) {
                (Some(false), Some(r)) => BTreeSet::from([r.attribute.clone()]),
                _ => BTreeSet::new(),
            },
            Some(Gate::And(children)) => children
                .iter()
                .flat_map(|&c| self.missing(c, held))
                .collect(),
            Some(Gate::Or(children)) => children
                .iter()
                .map(|&c| self.missing(c, held))
                .reduce(|best, next| if next.len() < best.len() { next } else { best })
                .unwrap_or_default(),
            Some(Gate::Threshold(k, children)) => {
                let mut sets: Vec<BTreeSet<Attribute>> =
                    children.iter().map(|&c| self.missing(c, held)).collect();
                // Stable: ties keep the leftmost children.
                sets.sort_by_key(BTreeSet::len);
                sets.into_iter().take(*k).flatten().collect()
            }
        }
    }
}

/// Indices of the `k` cheapest satisfiable children (ties: leftmost), in
/// ascending index order; `None` if fewer than `k` are satisfiable.
fn cheapest(costs: &[Option<usize>], k: usize) -> Option<Vec<usize>> {
    let mut candidates: Vec<(usize, usize)> = costs
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|c| (c, i)))
        .collect();
    if candidates.len() < k {
        return None;
    }
    candidates.sort_unstable();
    let mut chosen: Vec<usize> = candidates.into_iter().take(k).map(|(_, i)| i).collect();
    chosen.sort_unstable();
    Some(chosen)
}

/// The Lagrange coefficient of `x` at 0 over the points `xs`:
/// `prod_{x' != x} x' / (x' - x)`.
fn lagrange_at_zero<F: PrimeField>(x: F, xs: &[F]) -> Result<F, PolicyError> {
    let mut numerator = F::one();
    let mut denominator = F::one();
    for &other in xs.iter().filter(|&&o| o != x) {
        numerator *= other;
        denominator *= other - x;
    }
    let inverse = denominator.inverse().ok_or(PolicyError::FieldTooSmall {
        bits: F::MODULUS_BIT_SIZE,
    })?;
    Ok(numerator * inverse)
}

struct Builder<F> {
    rows: Vec<Row<F>>,
    nodes: Vec<Gate>,
    columns: usize,
}

impl<F: PrimeField> Builder<F> {
    /// Allocates `count` fresh columns and returns the first.
    fn fresh(&mut self, count: usize) -> usize {
        let first = self.columns;
        self.columns += count;
        first
    }

    /// Builds the subtree `policy` with share vector `v` (sorted, non-zero
    /// entries) and returns its node index. Fresh columns are always larger
    /// than every column in `v`, so appending keeps vectors sorted.
    fn build(&mut self, policy: &Policy, v: Vec<(usize, F)>) -> usize {
        let gate = match policy {
            Policy::Leaf(attribute) => {
                let row = self.rows.len();
                self.rows.push(Row {
                    attribute: attribute.clone(),
                    entries: v.into_iter().filter(|(_, x)| !x.is_zero()).collect(),
                });
                Gate::Leaf(row)
            }
            Policy::Or(children) => Gate::Or(
                children
                    .iter()
                    .map(|child| self.build(child, v.clone()))
                    .collect(),
            ),
            Policy::And(children) => {
                let m = children.len();
                let first = self.fresh(m.saturating_sub(1));
                let mut ids = Vec::with_capacity(m);
                for (i, child) in children.iter().enumerate() {
                    // 0-based i: child 0 gets v + e_j0, child i gets
                    // -e_j(i-1) + e_ji, the last gets -e_j(m-2).
                    let mut w = if i == 0 { v.clone() } else { Vec::new() };
                    if i > 0 {
                        w.push((first + i - 1, -F::one()));
                    }
                    if i + 1 < m {
                        w.push((first + i, F::one()));
                    }
                    ids.push(self.build(child, w));
                }
                Gate::And(ids)
            }
            Policy::Threshold { k, children } => {
                let extra = k.saturating_sub(1);
                let first = self.fresh(extra);
                let mut ids = Vec::with_capacity(children.len());
                for (i, child) in children.iter().enumerate() {
                    let x = F::from(i as u64 + 1);
                    let mut w = v.clone();
                    let mut power = F::one();
                    for t in 0..extra {
                        power *= x;
                        w.push((first + t, power));
                    }
                    ids.push(self.build(child, w));
                }
                Gate::Threshold(*k, ids)
            }
        };
        self.nodes.push(gate);
        self.nodes.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse;
    use ark_bls12_381::Fr;

    fn lsss(text: &str) -> Lsss<Fr> {
        Lsss::from_policy(&parse(text).unwrap()).unwrap()
    }

    fn reconstruct(l: &Lsss<Fr>, s: &Solution<Fr>) -> Vec<Fr> {
        let mut sum = vec![Fr::from(0u64); l.columns()];
        for &(row, c) in s.rows() {
            for &(col, v) in l.rows()[row].entries() {
                sum[col] += c * v;
            }
        }
        sum
    }

    fn target(columns: usize) -> Vec<Fr> {
        let mut t = vec![Fr::from(0u64); columns];
        t[0] = Fr::from(1u64);
        t
    }

    #[test]
    fn and_chain_matrix() {
        let l = lsss("a@x AND b@x AND c@x AND d@x");
        assert_eq!(l.columns(), 4);
        let one = Fr::from(1u64);
        assert_eq!(l.rows()[0].entries(), &[(0, one), (1, one)]);
        assert_eq!(l.rows()[1].entries(), &[(1, -one), (2, one)]);
        assert_eq!(l.rows()[2].entries(), &[(2, -one), (3, one)]);
        assert_eq!(l.rows()[3].entries(), &[(3, -one)]);
        let s = l.solve(|_, _| true).unwrap();
        assert_eq!(s.rows(), &[(0, one), (1, one), (2, one), (3, one)]);
    }

    #[test]
    fn threshold_matrix_and_lagrange() {
        let l = lsss("2 of (a@x, b@x, c@x)");
        assert_eq!(l.columns(), 2);
        let f = |n: u64| Fr::from(n);
        assert_eq!(l.rows()[2].entries(), &[(0, f(1)), (1, f(3))]);
        let s = l.solve(|row, _| row != 0).unwrap();
        // x = 2, 3: L2(0) = 3, L3(0) = -2.
        assert_eq!(s.rows(), &[(1, f(3)), (2, -f(2))]);
        assert_eq!(reconstruct(&l, &s), target(2));
        let one = lsss("1 of (a@x, b@x)");
        assert_eq!(one.columns(), 1);
    }

    #[test]
    fn minimal_rows() {
        let l = lsss("(a@x AND b@x AND c@x) OR d@x");
        let s = l.solve(|_, _| true).unwrap();
        assert_eq!(s.rows(), &[(3, Fr::from(1u64))]);
        let l = lsss("2 of (a@x AND b@x, c@x, d@x AND e@x, f@x)");
        let s = l.solve(|_, _| true).unwrap();
        let used: Vec<usize> = s.rows().iter().map(|r| r.0).collect();
        assert_eq!(used, [2, 5]);
        assert_eq!(reconstruct(&l, &s), target(l.columns()));
        // Ties go left.
        let l = lsss("a@x OR b@x");
        assert_eq!(l.solve(|_, _| true).unwrap().rows()[0].0, 0);
    }

    #[test]
    fn nested_reconstruction() {
        let l = lsss("2 of (a@x AND 2 of (b@x, c@x, d@x), e@x OR f@x, 3 of (g@x, h@x, i@x, j@x))");
        for mask in 0u32..(1 << l.len()) {
            if let Ok(s) = l.solve(|row, _| mask & (1 << row) != 0) {
                assert_eq!(reconstruct(&l, &s), target(l.columns()), "mask {mask:b}");
                assert!(s.rows().iter().all(|&(row, _)| mask & (1 << row) != 0));
            }
        }
    }

    #[test]
    fn unsatisfied_missing() {
        let l = lsss("(a@x AND b@x AND c@x) OR (d@x AND e@x) OR 2 of (a@x, f@x, g@x)");
        let err = l.solve(|_, _| false).unwrap_err();
        let expected: Vec<Attribute> = vec!["d@x".parse().unwrap(), "e@x".parse().unwrap()];
        assert_eq!(err, PolicyError::Unsatisfied { missing: expected });
        let err = l.solve(|_, a| a.name() == "a").unwrap_err();
        let expected: Vec<Attribute> = vec!["f@x".parse().unwrap()];
        assert_eq!(err, PolicyError::Unsatisfied { missing: expected });
        assert!(err.to_string().contains("f@x"));
        // Duplicates are reported once, sorted.
        let l = lsss("b@x AND a@x AND b@x");
        let err = l.solve(|_, _| false).unwrap_err();
        let expected: Vec<Attribute> = vec!["a@x".parse().unwrap(), "b@x".parse().unwrap()];
        assert_eq!(err, PolicyError::Unsatisfied { missing: expected });
    }

    #[test]
    fn holds_called_once_per_row_with_index() {
        let l = lsss("a@x AND (b@y OR a@x)");
        let calls = std::cell::RefCell::new(Vec::new());
        let _ = l.solve(|row, a| {
            calls.borrow_mut().push((row, a.to_string()));
            true
        });
        assert_eq!(
            calls.into_inner(),
            [
                (0, "a@x".to_owned()),
                (1, "b@y".to_owned()),
                (2, "a@x".to_owned())
            ]
        );
    }

    #[test]
    fn rejects_invalid_hand_built() {
        let p = Policy::And(vec![Policy::leaf("a@x").unwrap()]);
        assert!(matches!(
            Lsss::<Fr>::from_policy(&p),
            Err(PolicyError::InvalidArity { .. })
        ));
    }

    #[test]
    fn dot_and_dense() {
        let l = lsss("a@x AND 2 of (b@x, c@x)");
        let f = |n: u64| Fr::from(n);
        let w = [f(5), f(7), f(11)];
        // row 1 (b@x): v = -e1, plus x=1: + 1*e2.
        assert_eq!(l.rows()[1].dot(&w), -f(7) + f(11));
        assert_eq!(l.rows()[1].dot(&w[..2]), -f(7));
        assert_eq!(l.rows()[1].to_dense(3), vec![f(0), -f(1), f(1)]);
        assert_eq!(l.rows()[1].to_dense(1), vec![f(0)]);
    }
}
