//! The policy language parser.
//!
//! ```text
//! expr     := and_expr (OR and_expr)*
//! and_expr := primary (AND primary)*
//! primary  := '(' expr ')' | NUMBER OF '(' expr (',' expr)* ')' | ATTRIBUTE
//! ```
//!
//! Keywords are case-insensitive; `AND` binds tighter than `OR`. The parser
//! is recursive descent whose recursion is bounded: parentheses may nest at
//! most [`MAX_DEPTH`] levels, so no input can overflow the stack.

use crate::ast::{MAX_DEPTH, MAX_LEAVES, MAX_POLICY_LEN, Policy};
use crate::attribute::Attribute;
use crate::error::PolicyError;

/// Parses a policy text into its syntax tree.
///
/// Checks, in this order as the text is read: the length limit
/// ([`PolicyError::TooLong`]), syntax ([`PolicyError::Syntax`] with the byte
/// position and a snippet), parenthesis nesting and tree depth
/// ([`PolicyError::TooDeep`]) and the leaf count
/// ([`PolicyError::TooManyLeaves`]).
///
/// ```
/// use mabe_policy::{parse, Policy, PolicyError};
/// let p = parse("a@x OR b@x and c@x")?;
/// assert!(matches!(&p, Policy::Or(children) if children.len() == 2));
/// assert_eq!(p.to_string(), "a@x OR (b@x AND c@x)");
///
/// let err = parse("a@x AND (b@x OR c@x))").unwrap_err();
/// assert_eq!(err.to_string(), "unexpected ')' at 20\na@x AND (b@x OR c@x))\n                    ^");
/// # Ok::<(), PolicyError>(())
/// ```
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    if text.len() > MAX_POLICY_LEN {
        return Err(PolicyError::TooLong {
            len: text.len(),
            max: MAX_POLICY_LEN,
        });
    }
    let mut parser = Parser::new(text)?;
    if parser.current.kind == Kind::End {
        return Err(parser.error("empty policy", 0));
    }
    let policy = parser.expr(0)?;
    if parser.current.kind != Kind::End {
        let message = match parser.current.kind {
            Kind::Close => "unexpected ')'".to_owned(),
            _ => format!(
                "unexpected {} (expected AND, OR or the end of the policy)",
                parser.describe_current()
            ),
        };
        return Err(parser.error(message, parser.current.start));
    }
    if policy.depth() > MAX_DEPTH {
        return Err(PolicyError::TooDeep { max: MAX_DEPTH });
    }
    Ok(policy)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Open,
    Close,
    Comma,
    And,
    Or,
    Of,
    Number(Option<usize>),
    Attribute(Attribute),
    Word,
    End,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

struct Parser<'a> {
    text: &'a str,
    /// Byte offset where lexing resumes.
    offset: usize,
    current: Token,
    leaves: usize,
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-')
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Result<Self, PolicyError> {
        let mut parser = Parser {
            text,
            offset: 0,
            current: Token {
                kind: Kind::End,
                start: 0,
                end: 0,
            },
            leaves: 0,
        };
        parser.advance()?;
        Ok(parser)
    }

    fn error(&self, message: impl Into<String>, position: usize) -> PolicyError {
        PolicyError::Syntax {
            message: message.into(),
            position,
            snippet: snippet(self.text, position),
        }
    }

    /// Reads the next token into `self.current`.
    fn advance(&mut self) -> Result<(), PolicyError> {
        let rest = self.text.get(self.offset..).unwrap_or("");
        let trimmed = rest.trim_start();
        let start = self.offset + (rest.len() - trimmed.len());
        let bytes = trimmed.as_bytes();
        let (kind, len) = match bytes.first() {
            None => (Kind::End, 0),
            Some(b'(') => (Kind::Open, 1),
            Some(b')') => (Kind::Close, 1),
            Some(b',') => (Kind::Comma, 1),
            Some(&b) if is_word_byte(b) => {
                let len = bytes.iter().take_while(|&&b| is_word_byte(b)).count();
                let word = trimmed.get(..len).unwrap_or("");
                (self.classify(word, start)?, len)
            }
            Some(_) => {
                let c = trimmed.chars().next().unwrap_or(' ');
                return Err(self.error(
                    format!("unexpected character '{}'", c.escape_debug()),
                    start,
                ));
            }
        };
        self.current = Token {
            kind,
            start,
            end: start + len,
        };
        self.offset = start + len;
        Ok(())
    }

    fn classify(&self, word: &str, start: usize) -> Result<Kind, PolicyError> {
        if word.contains('@') {
            return match word.parse::<Attribute>() {
                Ok(a) => Ok(Kind::Attribute(a)),
                Err(PolicyError::InvalidAttribute { reason, .. }) => Err(self.error(
                    format!("invalid attribute '{}': {reason}", shorten(word)),
                    start,
                )),
                Err(other) => Err(other),
            };
        }
        if word.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Kind::Number(word.parse().ok()));
        }
        Ok(if word.eq_ignore_ascii_case("and") {
            Kind::And
        } else if word.eq_ignore_ascii_case("or") {
            Kind::Or
        } else if word.eq_ignore_ascii_case("of") {
            Kind::Of
        } else {
            Kind::Word
        })
    }

    fn describe_current(&self) -> String {
        match self.current.kind {
            Kind::End => "end of input".to_owned(),
            _ => {
                let word = self
                    .text
                    .get(self.current.start..self.current.end)
                    .unwrap_or("");
                format!("'{}'", shorten(word))
            }
        }
    }

    /// `expr := and_expr (OR and_expr)*`; `nesting` is the number of
    /// enclosing parentheses.
    fn expr(&mut self, nesting: usize) -> Result<Policy, PolicyError> {
        let first = self.and_expr(nesting)?;
        if self.current.kind != Kind::Or {
            return Ok(first);
        }
        let mut children = vec![first];
        while self.current.kind == Kind::Or {
            self.advance()?;
            children.push(self.and_expr(nesting)?);
        }
        Ok(Policy::Or(children))
    }

    /// `and_expr := primary (AND primary)*`
    fn and_expr(&mut self, nesting: usize) -> Result<Policy, PolicyError> {
        let first = self.primary(nesting)?;
        if self.current.kind != Kind::And {
            return Ok(first);
        }
        let mut children = vec![first];
        while self.current.kind == Kind::And {
            self.advance()?;
            children.push(self.primary(nesting)?);
        }
        Ok(Policy::And(children))
    }

    fn primary(&mut self, nesting: usize) -> Result<Policy, PolicyError> {
        let token = self.current.clone();
        match token.kind {
            Kind::Attribute(a) => {
                self.leaves += 1;
                if self.leaves > MAX_LEAVES {
                    return Err(PolicyError::TooManyLeaves { max: MAX_LEAVES });
                }
                self.advance()?;
                Ok(Policy::Leaf(a))
            }
            Kind::Open => {
                let inner = self.open(nesting)?;
                let policy = self.expr(inner)?;
                self.close(token.start, "expected ')', AND or OR")?;
                Ok(policy)
            }
            Kind::Number(k) => self.threshold(k, token.start, nesting),
            Kind::Word => Err(self.error(
                format!(
                    "expected an attribute name@authority, found {}",
                    self.describe_current()
                ),
                token.start,
            )),
            _ => Err(self.error(
                format!(
                    "expected an attribute name@authority, '(' or 'k of (...)', found {}",
                    self.describe_current()
                ),
                token.start,
            )),
        }
    }

    /// Consumes a '(' and returns the new nesting level.
    fn open(&mut self, nesting: usize) -> Result<usize, PolicyError> {
        let inner = nesting + 1;
        if inner > MAX_DEPTH {
            return Err(PolicyError::TooDeep { max: MAX_DEPTH });
        }
        self.advance()?;
        Ok(inner)
    }

    /// Consumes the ')' matching the '(' at `open_at`.
    fn close(&mut self, open_at: usize, expected: &str) -> Result<(), PolicyError> {
        match self.current.kind {
            Kind::Close => self.advance(),
            Kind::End => Err(self.error("unclosed '('", open_at)),
            _ => Err(self.error(
                format!("{expected}, found {}", self.describe_current()),
                self.current.start,
            )),
        }
    }

    /// `NUMBER OF '(' expr (',' expr)* ')'`, with the number already current.
    fn threshold(
        &mut self,
        k: Option<usize>,
        number_at: usize,
        nesting: usize,
    ) -> Result<Policy, PolicyError> {
        let Some(k) = k else {
            return Err(self.error("threshold number is too large", number_at));
        };
        self.advance()?;
        if self.current.kind != Kind::Of {
            return Err(self.error(
                format!(
                    "expected 'of' after the threshold {k}, found {}",
                    self.describe_current()
                ),
                self.current.start,
            ));
        }
        self.advance()?;
        if self.current.kind != Kind::Open {
            return Err(self.error(
                format!("expected '(' after 'of', found {}", self.describe_current()),
                self.current.start,
            ));
        }
        let open_at = self.current.start;
        let inner = self.open(nesting)?;
        let mut children = vec![self.expr(inner)?];
        while self.current.kind == Kind::Comma {
            self.advance()?;
            children.push(self.expr(inner)?);
        }
        self.close(open_at, "expected ',', ')', AND or OR")?;
        let n = children.len();
        if k == 0 || k > n {
            return Err(self.error(
                format!("invalid threshold {k} of {n}: k must be between 1 and {n}"),
                number_at,
            ));
        }
        Ok(Policy::Threshold { k, children })
    }
}

/// Shortens a word for use in a message.
fn shorten(word: &str) -> String {
    const MAX: usize = 40;
    if word.chars().count() <= MAX {
        word.to_owned()
    } else {
        let mut s: String = word.chars().take(MAX).collect();
        s.push_str("...");
        s
    }
}

/// One line of `text` around byte `position` (at most [`WINDOW`] characters,
/// elided with `...`, control characters shown as spaces), a newline, and a
/// caret under the position.
fn snippet(text: &str, position: usize) -> String {
    const WINDOW: usize = 60;
    const BEFORE: usize = 30;
    let mut p = position.min(text.len());
    while p > 0 && !text.is_char_boundary(p) {
        p -= 1;
    }
    let head = text.get(..p).unwrap_or("");
    let tail = text.get(p..).unwrap_or("");
    let before: Vec<char> = head.chars().rev().take(WINDOW + 1).collect();
    let after: Vec<char> = tail.chars().take(WINDOW + 1).collect();
    // Prefer BEFORE characters on the left, but use more when the tail is short.
    let n_before = before
        .len()
        .min(BEFORE.max(WINDOW.saturating_sub(after.len())));
    let n_after = after.len().min(WINDOW - n_before);
    let clean = |c: &char| if c.is_control() { ' ' } else { *c };
    let mut line = String::new();
    let mut column = 0;
    if before.len() > n_before {
        line.push_str("...");
        column += 3;
    }
    line.extend(before.iter().take(n_before).rev().map(clean));
    column += n_before;
    line.extend(after.iter().take(n_after).map(clean));
    if after.len() > n_after {
        line.push_str("...");
    }
    let line = line.trim_end().to_owned();
    format!("{line}\n{}^", " ".repeat(column))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(s: &str) -> Policy {
        Policy::leaf(s).unwrap()
    }

    fn syntax(text: &str) -> (String, usize, String) {
        match parse(text) {
            Err(PolicyError::Syntax {
                message,
                position,
                snippet,
            }) => (message, position, snippet),
            other => panic!("expected a syntax error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn precedence_and_chains() {
        assert_eq!(
            parse("a@x OR b@x AND c@x OR d@x").unwrap(),
            Policy::Or(vec![
                leaf("a@x"),
                Policy::And(vec![leaf("b@x"), leaf("c@x")]),
                leaf("d@x")
            ])
        );
        assert_eq!(
            parse("(a@x OR b@x) OR c@x").unwrap(),
            Policy::Or(vec![
                Policy::Or(vec![leaf("a@x"), leaf("b@x")]),
                leaf("c@x")
            ])
        );
        assert_eq!(
            parse("a@x and (b@x or c@x)").unwrap(),
            Policy::And(vec![
                leaf("a@x"),
                Policy::Or(vec![leaf("b@x"), leaf("c@x")])
            ])
        );
        assert_eq!(parse("((a@x))").unwrap(), leaf("a@x"));
        assert_eq!(parse("  A@X\n").unwrap(), leaf("a@x"));
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let expected = parse("a@x AND b@x OR 1 of (c@x)").unwrap();
        for text in ["a@x and b@x or 1 of (c@x)", "a@x And b@x oR 1 OF (c@x)"] {
            assert_eq!(parse(text).unwrap(), expected);
        }
    }

    #[test]
    fn thresholds() {
        assert_eq!(
            parse("2 of (a@x, b@x AND c@x, d@x OR e@x)").unwrap(),
            Policy::Threshold {
                k: 2,
                children: vec![
                    leaf("a@x"),
                    Policy::And(vec![leaf("b@x"), leaf("c@x")]),
                    Policy::Or(vec![leaf("d@x"), leaf("e@x")])
                ]
            }
        );
        assert_eq!(
            parse("1 of (a@x)").unwrap(),
            Policy::Threshold {
                k: 1,
                children: vec![leaf("a@x")]
            }
        );
        assert_eq!(
            parse("2@x AND 02 of (a@x, b@x)").unwrap(),
            Policy::And(vec![
                leaf("2@x"),
                Policy::Threshold {
                    k: 2,
                    children: vec![leaf("a@x"), leaf("b@x")]
                }
            ])
        );
    }

    #[test]
    fn error_unexpected_close() {
        let (m, p, s) = syntax("a@x AND (b@x OR c@x))");
        assert_eq!(m, "unexpected ')'");
        assert_eq!(p, 20);
        assert_eq!(s, "a@x AND (b@x OR c@x))\n                    ^");
        assert_eq!(
            parse("a@x AND (b@x OR c@x))").unwrap_err().to_string(),
            "unexpected ')' at 20\na@x AND (b@x OR c@x))\n                    ^"
        );
    }

    #[test]
    fn error_messages_and_positions() {
        let cases: &[(&str, &str, usize)] = &[
            ("", "empty policy", 0),
            ("   ", "empty policy", 0),
            ("(a@x OR b@x", "unclosed '('", 0),
            ("a@x AND 2 of (b@x, c@x", "unclosed '('", 13),
            (
                "a@x b@x",
                "unexpected 'b@x' (expected AND, OR or the end of the policy)",
                4,
            ),
            (
                "a@x AND doctor",
                "expected an attribute name@authority, found 'doctor'",
                8,
            ),
            (
                "a@x AND",
                "expected an attribute name@authority, '(' or 'k of (...)', found end of input",
                7,
            ),
            (
                "OR a@x",
                "expected an attribute name@authority, '(' or 'k of (...)', found 'OR'",
                0,
            ),
            (
                "a@x AND ()",
                "expected an attribute name@authority, '(' or 'k of (...)', found ')'",
                9,
            ),
            (
                "a@x AND b@x@y",
                "invalid attribute 'b@x@y': must contain exactly one '@'",
                8,
            ),
            (
                "a@x OR _b@x",
                "invalid attribute '_b@x': the name (before '@') must start with a letter or a digit",
                7,
            ),
            (
                "a@x OR b@",
                "invalid attribute 'b@': the authority (after '@') must not be empty",
                7,
            ),
            ("a@x & b@x", "unexpected character '&'", 4),
            ("a@x AND é@x", "unexpected character 'é'", 8),
            (
                "0 of (a@x, b@x)",
                "invalid threshold 0 of 2: k must be between 1 and 2",
                0,
            ),
            (
                "a@x OR 3 of (a@x, b@x)",
                "invalid threshold 3 of 2: k must be between 1 and 2",
                7,
            ),
            (
                "2 (a@x, b@x)",
                "expected 'of' after the threshold 2, found '('",
                2,
            ),
            ("2 of a@x", "expected '(' after 'of', found 'a@x'", 5),
            (
                "2 of (a@x b@x)",
                "expected ',', ')', AND or OR, found 'b@x'",
                10,
            ),
            ("(a@x, b@x)", "expected ')', AND or OR, found ','", 4),
            (
                "99999999999999999999999 of (a@x)",
                "threshold number is too large",
                0,
            ),
        ];
        for &(text, message, position) in cases {
            let (m, p, _) = syntax(text);
            assert_eq!((m.as_str(), p), (message, position), "input {text:?}");
        }
    }

    #[test]
    fn snippet_text() {
        let (_, _, s) = syntax("(a@x OR b@x");
        assert_eq!(s, "(a@x OR b@x\n^");
        let (_, _, s) = syntax("a@x AND");
        assert_eq!(s, "a@x AND\n       ^");
        let (_, _, s) = syntax("a@x\nAND\tdoctor");
        assert_eq!(s, "a@x AND doctor\n        ^");
        // Long input: a window with ellipses, caret still under the token.
        let text = format!(
            "{}doctor AND {}b@x",
            "a@x AND ".repeat(20),
            "b@x AND ".repeat(20)
        );
        let (_, p, s) = syntax(&text);
        assert_eq!(p, 160);
        let (line, caret) = s.split_once('\n').unwrap();
        assert!(line.starts_with("...") && line.ends_with("..."), "{line}");
        assert!(line.chars().count() <= 66);
        let column = caret.len() - 1;
        assert!(caret.ends_with('^'));
        assert_eq!(line.get(column..column + 6), Some("doctor"));
        // Multi-byte characters before the error.
        let text = format!("{}(", "é".repeat(50));
        let s = snippet(&text, text.len() - 1);
        let (line, caret) = s.split_once('\n').unwrap();
        assert_eq!(line.chars().nth(caret.len() - 1), Some('('));
        // Positions inside a character or past the end do not panic.
        let _ = snippet("é", 1);
        let _ = snippet("abc", 99);
        assert_eq!(snippet("", 0), "\n^");
    }

    #[test]
    fn limits() {
        let long = format!("a@x{}", " ".repeat(MAX_POLICY_LEN - 2));
        assert_eq!(
            parse(&long),
            Err(PolicyError::TooLong {
                len: MAX_POLICY_LEN + 1,
                max: MAX_POLICY_LEN
            })
        );
        let ok = format!("a@x{}", " ".repeat(MAX_POLICY_LEN - 3));
        assert!(parse(&ok).is_ok());

        let leaves = |n: usize| vec!["a@x"; n].join(" OR ");
        assert_eq!(parse(&leaves(MAX_LEAVES)).unwrap().leaf_count(), MAX_LEAVES);
        assert_eq!(
            parse(&leaves(MAX_LEAVES + 1)),
            Err(PolicyError::TooManyLeaves { max: MAX_LEAVES })
        );

        let nested = |n: usize| format!("{}a@x{}", "1 of (".repeat(n - 1), ")".repeat(n - 1));
        let p = parse(&nested(MAX_DEPTH)).unwrap();
        assert_eq!(p.depth(), MAX_DEPTH);
        assert_eq!(parse(&p.to_string()).unwrap(), p);
        assert_eq!(
            parse(&nested(MAX_DEPTH + 1)),
            Err(PolicyError::TooDeep { max: MAX_DEPTH })
        );
        // Depth via AND/OR alternation: each parenthesis adds a level.
        let alt = |n: usize| {
            let mut s = String::from("z@x");
            for i in 0..n {
                let op = if i % 2 == 0 { "AND" } else { "OR" };
                s = format!("a@x {op} ({s})");
            }
            s
        };
        assert_eq!(parse(&alt(MAX_DEPTH - 1)).unwrap().depth(), MAX_DEPTH);
        assert_eq!(
            parse(&alt(MAX_DEPTH)),
            Err(PolicyError::TooDeep { max: MAX_DEPTH })
        );
        // AST deeper than the limit with fewer nested parentheses.
        let mut s = String::from("z@x");
        for _ in 0..40 {
            s = format!("a@x OR b@x AND ({s})");
        }
        assert_eq!(parse(&s), Err(PolicyError::TooDeep { max: MAX_DEPTH }));
    }

    #[test]
    fn deep_parentheses_do_not_overflow() {
        assert!(matches!(
            parse(&"(".repeat(100_000)),
            Err(PolicyError::TooLong { .. })
        ));
        assert_eq!(
            parse(&"(".repeat(60_000)),
            Err(PolicyError::TooDeep { max: MAX_DEPTH })
        );
        let balanced = format!("{}a@x{}", "(".repeat(30_000), ")".repeat(30_000));
        assert_eq!(
            parse(&balanced),
            Err(PolicyError::TooDeep { max: MAX_DEPTH })
        );
        let ok = format!("{}a@x{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert_eq!(parse(&ok).unwrap(), leaf("a@x"));
        assert!(parse(&"1 of (".repeat(10_000)).is_err());
    }

    #[test]
    fn from_str_matches_parse() {
        let p: Policy = "a@x AND b@y".parse().unwrap();
        assert_eq!(p, parse("a@x AND b@y").unwrap());
    }
}
