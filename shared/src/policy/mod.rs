//! The route policy: which permissions a request needs, by method and path, decided at
//! the edge before the origin is called.
//!
//! An ordered list of rules `{methods, path, require}` and a default (`allow` any valid
//! key, or `deny`). The first rule whose methods and path match decides: the key must
//! satisfy the rule's [`Expression`]. No rule matches: the default.
//!
//! **Paths** are matched after [`normalize_path`], and the origin is sent that same
//! normalised path, so what was checked is what is fetched: `%XX` of a character a path
//! segment may hold as it is (letters, digits, `-._~!$&'()*+,=:@`) is decoded, `.` and
//! `..` segments are resolved (never above the root),
//! empty segments (`//`) dropped, `;` parameters ignored for matching (`/admin;x` and
//! `/..;/` are `/admin` and `..`, as Tomcat reads them), a trailing slash ignored, and
//! literal segments compared without regard to ASCII case. An encoded separator (`%2F`,
//! `%5C`), `%00`, an encoded `%` (`%25`: a double encoding) or a malformed escape is
//! refused (400), as is a path over [`MAX_PATH_LEN`] bytes (414): origins disagree on what
//! those mean.
//!
//! **Patterns** are `/`-separated literal segments (letters, digits and `-._~!$&'()+,=:@`),
//! `*` for exactly one segment, and `**` as the last segment for any number (none too).
//!
//! **Methods**: a list of `GET HEAD POST PUT PATCH DELETE OPTIONS`, or `*` for any. A `HEAD`
//! request matches the rules for `GET`. A rule's `methods` left out means `*` (an empty
//! list is refused). A request with any other method passes only a `*` rule: no rule
//! matching it, it is refused whatever the default.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::permissions::{Expression, ExpressionError};

/// Most rules in a policy.
pub const MAX_RULES: usize = 200;
/// Longest path pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 256;
/// Longest request path the edge matches, in bytes (longer: 414).
pub const MAX_PATH_LEN: usize = 2048;

/// What happens to a request no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Any valid key passes (the behaviour with no policy at all).
    #[default]
    Allow,
    Deny,
}

/// A rule as written in the policy document (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleDocument {
    /// Methods the rule applies to; absent or `["*"]`: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(example = json!(["GET"])))]
    pub methods: Option<Vec<String>>,
    /// Path pattern: literal segments, `*` (one segment), `**` (last: any number).
    #[cfg_attr(feature = "utoipa", schema(example = "/v1/orders/*"))]
    pub path: String,
    /// Permission expression the key must satisfy (`AND`, `OR`, parentheses).
    #[cfg_attr(feature = "utoipa", schema(example = "orders:read"))]
    pub require: String,
    /// Credits a request this rule admits spends (keys or identities with credits): 0 to
    /// 1,000,000; absent: 1.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::optional"
    )]
    #[cfg_attr(
        feature = "utoipa",
        schema(minimum = 0, maximum = 1_000_000, example = 5)
    )]
    pub cost: Option<u64>,
}

/// The most credits one request may cost.
pub const MAX_COST: u64 = 1_000_000;

/// The policy document an administrator writes (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// When no rule matches: `allow` (any valid key) or `deny`.
    #[serde(default)]
    pub default: Fallback,
    /// First match wins; at most 200.
    #[serde(default)]
    pub rules: Vec<RuleDocument>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("too many rules: at most 200")]
    TooManyRules,
    #[error("rule {rule}: {message}")]
    Rule { rule: usize, message: String },
    #[error("unreadable policy line {line}")]
    Unreadable { line: usize },
}

/// A checked policy, ready to decide.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoutePolicy {
    /// Starts at 1 and grows by one with each change; 0: no policy was ever set.
    pub version: u64,
    pub fallback: Fallback,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub methods: Methods,
    pub path: PathPattern,
    pub require: Expression,
    /// Credits a request it admits spends.
    pub cost: u64,
}

/// What the policy says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'p> {
    /// Admitted, at this cost in credits.
    Allow(u64),
    /// Refused: the rule's expression the key does not satisfy, or `None` for the default.
    Deny(Option<&'p Expression>),
}

impl RoutePolicy {
    /// Is a policy in force? (Without one, paths are forwarded as they came.)
    pub fn is_active(&self) -> bool {
        !self.rules.is_empty() || self.fallback == Fallback::Deny
    }

    pub fn from_document(version: u64, doc: &PolicyDocument) -> Result<Self, PolicyError> {
        if doc.rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules);
        }
        let rules = doc
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let err = |message: String| PolicyError::Rule { rule: i, message };
                let any = ["*".to_owned()];
                let names = match r.methods.as_deref() {
                    None => &any[..],
                    Some([]) => return Err(err(
                        "methods is empty: list the methods, or [\"*\"] (or leave it out) for any"
                            .into(),
                    )),
                    Some(names) => names,
                };
                Ok(Rule {
                    methods: Methods::from_names(names.iter().map(String::as_str)).ok_or_else(
                        || {
                            err(format!(
                                "methods {names:?}: each one of {} (or [\"*\"] for any)",
                                METHODS.join(" ")
                            ))
                        },
                    )?,
                    path: PathPattern::parse(&r.path)
                        .map_err(|e| err(format!("path {:?}: {e}", r.path)))?,
                    require: Expression::parse(&r.require)
                        .map_err(|e: ExpressionError| err(format!("require: {e}")))?,
                    cost: match r.cost {
                        None => 1,
                        Some(c) if c <= MAX_COST => c,
                        Some(_) => return Err(err(format!("cost: at most {MAX_COST}"))),
                    },
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(RoutePolicy {
            version,
            fallback: doc.default,
            rules,
        })
    }

    /// The document, canonical (methods and expressions as the policy reads them).
    pub fn to_document(&self) -> PolicyDocument {
        PolicyDocument {
            default: self.fallback,
            rules: self
                .rules
                .iter()
                .map(|r| RuleDocument {
                    methods: (r.methods != Methods::ANY).then(|| r.methods.names()),
                    path: r.path.text.clone(),
                    require: r.require.to_string(),
                    cost: (r.cost != 1).then_some(r.cost),
                })
                .collect(),
        }
    }

    pub fn decide(&self, method: &str, path: &NormalPath, permissions: &[String]) -> Verdict<'_> {
        for rule in &self.rules {
            if rule.methods.matches(method) && rule.path.matches(&path.segments) {
                return if rule.require.holds(permissions) {
                    Verdict::Allow(rule.cost)
                } else {
                    Verdict::Deny(Some(&rule.require))
                };
            }
        }
        // A method no rule could name (`PROPFIND`, `QUERY`…) passes only a rule for any
        // method: an origin handler that takes every method must not be reached by one.
        if !METHODS.contains(&method) {
            return Verdict::Deny(None);
        }
        match self.fallback {
            Fallback::Allow => Verdict::Allow(1),
            Fallback::Deny => Verdict::Deny(None),
        }
    }

    /// The compact text the edge reads ([`RoutePolicy::from_lines`]): `version default`,
    /// then one `methods pattern expression` line per rule. Neither methods nor a pattern
    /// hold spaces, so the expression is the rest of the line.
    pub fn to_lines(&self) -> String {
        let mut out = format!("{} {}\n", self.version, self.fallback.as_str());
        for r in &self.rules {
            // A cost other than 1 goes before the expression, where a Worker from before
            // costs cannot read it (so it fails closed rather than charge nothing).
            let cost = if r.cost == 1 {
                String::new()
            } else {
                format!("cost={} ", r.cost)
            };
            out.push_str(&format!(
                "{} {} {cost}{}\n",
                r.methods.names().join(","),
                r.path.text,
                r.require
            ));
        }
        out
    }

    /// Reads [`RoutePolicy::to_lines`] (`|` may stand for a line break: no policy holds
    /// one): checked as a document is, but without the words (the edge only needs to know
    /// that it cannot read a line, and carries no messages).
    pub fn from_lines(text: &str) -> Result<Self, PolicyError> {
        let mut lines = text.split(['\n', '|']).filter(|l| !l.is_empty());
        let bad = |line| PolicyError::Unreadable { line };
        let head = lines.next().ok_or(bad(0))?;
        let (version, fallback) = head.split_once(' ').ok_or(bad(0))?;
        let mut policy = RoutePolicy {
            version: version.parse().map_err(|_| bad(0))?,
            fallback: match fallback {
                "allow" => Fallback::Allow,
                "deny" => Fallback::Deny,
                _ => return Err(bad(0)),
            },
            rules: Vec::new(),
        };
        for (i, line) in lines.enumerate() {
            let mut parts = line.splitn(3, ' ');
            let rule = (|| {
                let methods = Methods::from_names(parts.next()?.split(','))?;
                let path = PathPattern::parse(parts.next()?).ok()?;
                let rest = parts.next()?;
                let (cost, require) = match rest.strip_prefix("cost=") {
                    None => (1, rest),
                    Some(r) => {
                        let (cost, require) = r.split_once(' ')?;
                        (cost.parse().ok().filter(|c| *c <= MAX_COST)?, require)
                    }
                };
                Some(Rule {
                    methods,
                    path,
                    require: Expression::parse(require).ok()?,
                    cost,
                })
            })();
            policy.rules.push(rule.ok_or(bad(i + 1))?);
        }
        if policy.rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules);
        }
        Ok(policy)
    }
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Allow => "allow",
            Fallback::Deny => "deny",
        }
    }
}

/// The methods a rule applies to, as bits of [`METHODS`]; all bits: any method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Methods(u8);

const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

impl Methods {
    pub const ANY: Methods = Methods(u8::MAX);

    /// Methods by name; none, or `*` alone: any. `None`: a name that is not a method.
    fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Methods> {
        let mut bits = 0u8;
        let mut any = false;
        for name in names {
            if name == "*" {
                any = true;
            } else {
                bits |= 1 << METHODS.iter().position(|m| *m == name)?;
            }
        }
        match (any, bits) {
            (_, 0) => Some(Methods::ANY),
            (true, _) => None,
            (false, bits) => Some(Methods(bits)),
        }
    }

    fn names(self) -> Vec<String> {
        if self == Methods::ANY {
            return vec!["*".into()];
        }
        (0..METHODS.len())
            .filter(|i| self.0 & (1 << i) != 0)
            .map(|i| METHODS[i].to_owned())
            .collect()
    }

    /// Does a request with `method` match? (`HEAD` matches rules for `GET` too.)
    pub fn matches(self, method: &str) -> bool {
        if self == Methods::ANY {
            return true;
        }
        match METHODS.iter().position(|m| *m == method) {
            Some(1) => self.0 & 0b11 != 0,
            Some(i) => self.0 & (1 << i) != 0,
            None => false,
        }
    }
}

/// A checked path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<PatternSegment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternSegment {
    /// Lower case (requests are compared lower-cased).
    Literal(String),
    One,
    Rest,
}

/// What is wrong with a path pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("longer than 256 bytes")]
    TooLong,
    #[error("must start with /")]
    Relative,
    #[error("** may only be the last segment")]
    RestNotLast,
    #[error("empty segment (// or a trailing /)")]
    EmptySegment,
    #[error(". and .. segments are not allowed")]
    DotSegment,
    #[error("a segment holds a character other than letters, digits and -._~!$&'()+,=:@ (and * only as a whole segment)")]
    Character,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, PatternError> {
        if text.len() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong);
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(PatternError::Relative);
        };
        let mut segments = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() {
            vec![]
        } else {
            rest.split('/').collect()
        };
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "*" => PatternSegment::One,
                "**" if i + 1 == parts.len() => PatternSegment::Rest,
                "**" => return Err(PatternError::RestNotLast),
                "" => return Err(PatternError::EmptySegment),
                "." | ".." => return Err(PatternError::DotSegment),
                p if p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()+,=:@".contains(&b)) =>
                {
                    PatternSegment::Literal(p.to_ascii_lowercase())
                }
                _ => return Err(PatternError::Character),
            });
        }
        Ok(PathPattern {
            text: text.to_owned(),
            segments,
        })
    }

    pub fn matches(&self, path: &[String]) -> bool {
        let mut i = 0;
        for segment in &self.segments {
            match segment {
                PatternSegment::Rest => return true,
                PatternSegment::One if i < path.len() => {}
                PatternSegment::Literal(l) if path.get(i) == Some(l) => {}
                _ => return false,
            }
            i += 1;
        }
        i == path.len()
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A request path, normalised ([`normalize_path`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// What the origin is sent: dot segments resolved, `//` dropped, unreserved escapes
    /// decoded; parameters and case kept.
    pub forward: String,
    /// What rules match: the same segments without parameters, lower case.
    segments: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request path is longer than 2048 bytes")]
    TooLong,
    #[error("the request path holds an encoded / or \\ (%2F, %5C)")]
    EncodedSeparator,
    #[error("the request path holds a malformed, double or NUL percent-encoding")]
    BadEncoding,
}

impl PathError {
    pub fn status(self) -> u16 {
        match self {
            PathError::TooLong => 414,
            _ => 400,
        }
    }
}

/// Normalises a request path (without its query), as the module docs say.
pub fn normalize_path(raw: &str) -> Result<NormalPath, PathError> {
    if raw.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    let mut forward: Vec<String> = Vec::new();
    let mut segments: Vec<String> = Vec::new();
    for part in raw.split(['/', '\\']) {
        let decoded = decode_segment(part)?;
        let bare = decoded.split(';').next().unwrap_or("");
        match bare {
            "" | "." => {}
            ".." => {
                forward.pop();
                segments.pop();
            }
            _ => {
                segments.push(bare.to_ascii_lowercase());
                forward.push(decoded);
            }
        }
    }
    let mut path = String::with_capacity(raw.len());
    for segment in &forward {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() || raw.ends_with('/') {
        path.push('/');
    }
    Ok(NormalPath {
        forward: path,
        segments,
    })
}

/// `%XX` of an unreserved character decoded; other escapes kept, in upper case.
fn decode_segment(part: &str) -> Result<String, PathError> {
    let bytes = part.as_bytes();
    let mut out = String::with_capacity(part.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i] as char);
            i += 1;
            continue;
        }
        let byte = bytes
            .get(i + 1..i + 3)
            .and_then(|h| core::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or(PathError::BadEncoding)?;
        match byte {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            // `%25` in any form: an origin that decodes twice would see another escape
            // (`%25%32%65` is `%2e` once decoded, `.` twice).
            0 | b'%' => return Err(PathError::BadEncoding),
            // What a path segment may hold as it is (RFC 3986 pchar, but `;`, whose
            // meaning origins disagree on): decoded, so `%3A` is the `:` a rule names.
            b if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b) => {
                out.push(b as char)
            }
            b => out.push_str(&format!("%{b:02X}")),
        }
        i += 3;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
