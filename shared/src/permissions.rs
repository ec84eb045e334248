//! Permissions a client key carries, and the expressions routes require of them.
//!
//! A **permission** is 1 to [`MAX_PERMISSION_LEN`] ASCII characters: letters, digits and
//! `_ - . : /`, starting with a letter or digit (`orders:read`, `billing.invoices/write`).
//! Case matters. A key carries at most [`MAX_PERMISSIONS`], as a set (sorted, no
//! duplicates: [`normalize_permissions`]).
//!
//! An **expression** combines permissions with `AND`, `OR` and parentheses; `AND` binds
//! tighter (`a OR b AND c` is `a OR (b AND c)`). At most [`MAX_EXPRESSION_LEN`] bytes and
//! [`MAX_DEPTH`] levels of parentheses. The operators are upper case and separated from
//! permissions by spaces or parentheses (a permission can hold neither).

use core::fmt;

pub const MAX_PERMISSIONS: usize = 50;
pub const MAX_PERMISSION_LEN: usize = 64;
pub const MAX_EXPRESSION_LEN: usize = 512;
pub const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionError {
    #[error("invalid permission {0:?}: 1 to 64 of A-Z a-z 0-9 _ - . : /, starting with a letter or digit")]
    Invalid(String),
    #[error("too many permissions: at most 50")]
    TooMany,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpressionError {
    #[error("the expression is empty")]
    Empty,
    #[error("the expression is longer than 512 bytes")]
    TooLong,
    #[error("the expression nests parentheses deeper than 8")]
    TooDeep,
    #[error("unexpected {found:?} at byte {at} of the expression: {expected}")]
    Unexpected {
        at: usize,
        found: String,
        expected: &'static str,
    },
}

/// Is `p` a well-formed permission?
pub fn is_permission(p: &str) -> bool {
    let b = p.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_PERMISSION_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_-.:/".contains(c))
}

/// A key's permissions as stored and sent: checked, sorted, without duplicates.
pub fn normalize_permissions(
    permissions: impl IntoIterator<Item = String>,
) -> Result<Vec<String>, PermissionError> {
    let mut out = Vec::new();
    for p in permissions {
        if !is_permission(&p) {
            return Err(PermissionError::Invalid(p));
        }
        out.push(p);
    }
    out.sort_unstable();
    out.dedup();
    if out.len() > MAX_PERMISSIONS {
        return Err(PermissionError::TooMany);
    }
    Ok(out)
}

/// A parsed permission expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expression {
    Permission(String),
    And(Vec<Expression>),
    Or(Vec<Expression>),
}

impl Expression {
    pub fn parse(text: &str) -> Result<Expression, ExpressionError> {
        if text.len() > MAX_EXPRESSION_LEN {
            return Err(ExpressionError::TooLong);
        }
        let tokens = tokenize(text)?;
        if tokens.is_empty() {
            return Err(ExpressionError::Empty);
        }
        let mut parser = Parser {
            tokens: &tokens,
            next: 0,
            text,
        };
        let expression = parser.or(0)?;
        match parser.peek() {
            None => Ok(expression),
            Some(_) => Err(parser.unexpected("AND, OR or the end")),
        }
    }

    /// Does a key with `permissions` (sorted, as [`normalize_permissions`] returns them)
    /// satisfy it?
    pub fn holds(&self, permissions: &[String]) -> bool {
        match self {
            Expression::Permission(p) => permissions
                .binary_search_by(|q| q.as_str().cmp(p.as_str()))
                .is_ok(),
            Expression::And(all) => all.iter().all(|e| e.holds(permissions)),
            Expression::Or(any) => any.iter().any(|e| e.holds(permissions)),
        }
    }
}

/// The canonical text: operators upper case, single spaces, parentheses only where needed.
impl fmt::Display for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (parts, op) = match self {
            Expression::Permission(p) => return f.write_str(p),
            Expression::And(parts) => (parts, " AND "),
            Expression::Or(parts) => (parts, " OR "),
        };
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                f.write_str(op)?;
            }
            // Only an OR inside an AND needs parentheses.
            if matches!((self, part), (Expression::And(_), Expression::Or(_))) {
                write!(f, "({part})")?;
            } else {
                write!(f, "{part}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
    Open,
    Close,
    And,
    Or,
    Word(&'a str),
}

/// Tokens with the byte offset each starts at.
fn tokenize(text: &str) -> Result<Vec<(usize, Token<'_>)>, ExpressionError> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b' ' || c == b'\t' {
            i += 1;
            continue;
        }
        if c == b'(' || c == b')' {
            tokens.push((i, if c == b'(' { Token::Open } else { Token::Close }));
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !b" \t()".contains(&bytes[i]) {
            i += 1;
        }
        let word = &text[start..i];
        let token = match word {
            "AND" => Token::And,
            "OR" => Token::Or,
            w if is_permission(w) => Token::Word(w),
            w => {
                return Err(ExpressionError::Unexpected {
                    at: start,
                    found: w.chars().take(MAX_PERMISSION_LEN + 1).collect(),
                    expected: "a permission, AND, OR or parentheses",
                })
            }
        };
        tokens.push((start, token));
    }
    Ok(tokens)
}

struct Parser<'t, 'a> {
    tokens: &'t [(usize, Token<'a>)],
    next: usize,
    text: &'a str,
}

impl Parser<'_, '_> {
    fn peek(&self) -> Option<&Token<'_>> {
        self.tokens.get(self.next).map(|(_, t)| t)
    }

    fn unexpected(&self, expected: &'static str) -> ExpressionError {
        match self.tokens.get(self.next) {
            Some((at, token)) => ExpressionError::Unexpected {
                at: *at,
                found: match token {
                    Token::Open => "(".into(),
                    Token::Close => ")".into(),
                    Token::And => "AND".into(),
                    Token::Or => "OR".into(),
                    Token::Word(w) => (*w).into(),
                },
                expected,
            },
            None => ExpressionError::Unexpected {
                at: self.text.len(),
                found: "the end".into(),
                expected,
            },
        }
    }

    fn or(&mut self, depth: usize) -> Result<Expression, ExpressionError> {
        let mut parts = vec![self.and(depth)?];
        while self.peek() == Some(&Token::Or) {
            self.next += 1;
            parts.push(self.and(depth)?);
        }
        Ok(flatten(parts, false))
    }

    fn and(&mut self, depth: usize) -> Result<Expression, ExpressionError> {
        let mut parts = vec![self.term(depth)?];
        while self.peek() == Some(&Token::And) {
            self.next += 1;
            parts.push(self.term(depth)?);
        }
        Ok(flatten(parts, true))
    }

    fn term(&mut self, depth: usize) -> Result<Expression, ExpressionError> {
        match self.peek() {
            Some(Token::Word(w)) => {
                let p = Expression::Permission((*w).to_owned());
                self.next += 1;
                Ok(p)
            }
            Some(Token::Open) => {
                if depth >= MAX_DEPTH {
                    return Err(ExpressionError::TooDeep);
                }
                self.next += 1;
                let inner = self.or(depth + 1)?;
                if self.peek() != Some(&Token::Close) {
                    return Err(self.unexpected("AND, OR or )"));
                }
                self.next += 1;
                Ok(inner)
            }
            _ => Err(self.unexpected("a permission or (")),
        }
    }
}

/// One part stands alone; an AND of ANDs (from parentheses) is one AND.
fn flatten(mut parts: Vec<Expression>, and: bool) -> Expression {
    if parts.len() == 1 {
        return parts.pop().expect("one part");
    }
    let mut flat = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            Expression::And(inner) if and => flat.extend(inner),
            Expression::Or(inner) if !and => flat.extend(inner),
            part => flat.push(part),
        }
    }
    if and {
        Expression::And(flat)
    } else {
        Expression::Or(flat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn perms(list: &[&str]) -> Vec<String> {
        normalize_permissions(list.iter().map(|s| s.to_string())).unwrap()
    }

    #[test]
    fn permission_grammar() {
        for ok in ["orders:read", "a", "billing.invoices/write", "v2_x-y", "A1"] {
            assert!(is_permission(ok), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in ["", ":read", "orders read", "a*", "é", "(a)", "a,b", &long] {
            assert!(!is_permission(bad), "{bad}");
        }
        assert!(is_permission(&"a".repeat(64)));
    }

    #[test]
    fn a_key_holds_a_sorted_set() {
        assert_eq!(perms(&["b", "a", "b"]), ["a", "b"]);
        assert!(matches!(
            normalize_permissions(["ok".into(), "not ok".into()]),
            Err(PermissionError::Invalid(p)) if p == "not ok"
        ));
        let many: Vec<String> = (0..51).map(|i| format!("p{i}")).collect();
        assert_eq!(
            normalize_permissions(many.clone()),
            Err(PermissionError::TooMany)
        );
        assert!(normalize_permissions(many[..50].to_vec()).is_ok());
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let e = Expression::parse("a OR b AND c").unwrap();
        assert!(e.holds(&perms(&["a"])));
        assert!(e.holds(&perms(&["b", "c"])));
        assert!(!e.holds(&perms(&["b"])));
        let e = Expression::parse("(a OR b) AND c").unwrap();
        assert!(!e.holds(&perms(&["a"])));
        assert!(e.holds(&perms(&["a", "c"])));
        assert_eq!(e.to_string(), "(a OR b) AND c");
        assert_eq!(
            Expression::parse(" ( ( a ) )AND(b AND c) ")
                .unwrap()
                .to_string(),
            "a AND b AND c"
        );
        assert!(!Expression::parse("orders:read").unwrap().holds(&[]));
    }

    #[test]
    fn bad_expressions_say_where() {
        for (text, at) in [
            ("a AND", 5),
            ("a b", 2),
            ("(a", 2),
            ("a)", 1),
            ("AND", 0),
            ("a and b", 2),
            ("a AND OR b", 6),
            ("()", 1),
            ("a & b", 2),
        ] {
            match Expression::parse(text) {
                Err(ExpressionError::Unexpected { at: got, .. }) => assert_eq!(got, at, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert_eq!(Expression::parse("  "), Err(ExpressionError::Empty));
        assert_eq!(
            Expression::parse(&"(".repeat(9).to_string()),
            Err(ExpressionError::TooDeep)
        );
        let deep8 = format!("{}a{}", "(".repeat(8), ")".repeat(8));
        assert!(Expression::parse(&deep8).is_ok());
        let long = vec!["a"; 200].join(" OR ");
        assert_eq!(Expression::parse(&long), Err(ExpressionError::TooLong));
    }

    proptest! {
        #[test]
        fn parser_never_panics(text in "[a-c()ANDOR \t:é]{0,80}") {
            let _ = Expression::parse(&text);
        }

        #[test]
        fn canonical_text_parses_to_the_same_expression(text in "[a-c() ]{0,40}|[a-c]( (AND|OR) \\(?[a-c]\\)?){0,6}") {
            if let Ok(e) = Expression::parse(&text) {
                let again = Expression::parse(&e.to_string()).unwrap();
                prop_assert_eq!(again, e);
            }
        }
    }
}
