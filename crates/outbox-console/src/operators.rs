//! Named operators and their tokens. A file (`--tokens-file`) or a variable
//! (`OUTBOX_CONSOLE_TOKENS`) lists them, `NAME:TOKEN`, one per line in the file, comma-separated in
//! the variable. The name is what `outbox_audit.actor` records; the token is the secret typed
//! into the login form. Tokens are compared in constant time.

use std::path::Path;

use subtle::ConstantTimeEq;

/// Shortest token accepted: a token is a password that cannot be rate-limited per user.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the operators cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum OperatorsError {
    /// The file cannot be read.
    #[error("cannot read the console tokens file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An entry is not `NAME:TOKEN`.
    #[error("{origin}: an entry is not NAME:TOKEN (NAME 1-64 of A-Z a-z 0-9 _ . @ -, TOKEN at least {MIN_TOKEN_LEN} characters without spaces)")]
    Malformed {
        /// Where (file and line, or the variable).
        origin: String,
    },
    /// Two entries with one name.
    #[error("operator {0:?} is listed twice: give each operator one token")]
    Duplicate(String),
}

/// An operator.
#[derive(Clone)]
pub struct Operator {
    /// The name recorded as actor.
    pub name: String,
    token: Vec<u8>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Every operator.
#[derive(Debug, Clone, Default)]
pub struct Operators(Vec<Operator>);

impl Operators {
    /// Parses `NAME:TOKEN` entries; `origin` names their source in errors.
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = (String, &'a str)>,
    ) -> Result<Self, OperatorsError> {
        let mut out: Vec<Operator> = Vec::new();
        for (origin, e) in entries {
            let e = e.trim();
            let Some((name, token)) = e.split_once(':') else {
                return Err(OperatorsError::Malformed { origin });
            };
            let (name, token) = (name.trim(), token.trim());
            let name_ok = (1..=64).contains(&name.len())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c));
            if !name_ok
                || token.len() < MIN_TOKEN_LEN
                || token.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(OperatorsError::Malformed { origin });
            }
            if out.iter().any(|o| o.name == name) {
                return Err(OperatorsError::Duplicate(name.into()));
            }
            out.push(Operator {
                name: name.into(),
                token: token.as_bytes().to_vec(),
            });
        }
        Ok(Self(out))
    }

    /// Reads the file (one `NAME:TOKEN` a line; blank lines and `#` comments ignored) and the
    /// variable's value (comma-separated), either may be absent.
    pub fn load(file: Option<&Path>, env_value: Option<&str>) -> Result<Self, OperatorsError> {
        let text = match file {
            Some(p) => std::fs::read_to_string(p).map_err(|source| OperatorsError::File {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        let path = file.map(|p| p.display().to_string()).unwrap_or_default();
        let from_file = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(|(i, l)| (format!("{path} line {}", i + 1), l));
        let from_env = env_value
            .unwrap_or("")
            .split(',')
            .filter(|e| !e.trim().is_empty())
            .map(|e| ("OUTBOX_CONSOLE_TOKENS".to_string(), e));
        Self::parse(from_file.chain(from_env))
    }

    /// Whether no operator is configured (then nobody can act).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many operators there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The operator whose token is `token`. Every operator's token is compared, each in constant
    /// time, so the time taken does not tell which (or how much of one) matched.
    pub fn authenticate(&self, token: &str) -> Option<&Operator> {
        let mut found = None;
        for o in &self.0 {
            if bool::from(o.token.as_slice().ct_eq(token.as_bytes())) {
                found = Some(o);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_authenticates() {
        let ops =
            Operators::load(None, Some("alice:aaaaaaaaaaaaaaaa1, bob:bbbbbbbbbbbbbbbb2")).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops.authenticate("bbbbbbbbbbbbbbbb2").unwrap().name, "bob");
        assert!(ops.authenticate("bbbbbbbbbbbbbbbb").is_none());
        assert!(ops.authenticate("").is_none());
        assert!(Operators::load(None, Some("alice:short")).is_err());
        assert!(Operators::load(None, Some("al ice:aaaaaaaaaaaaaaaa1")).is_err());
        assert!(matches!(
            Operators::load(None, Some("a:aaaaaaaaaaaaaaaa1,a:bbbbbbbbbbbbbbbb2")),
            Err(OperatorsError::Duplicate(_))
        ));
        assert!(
            !format!("{ops:?}").contains("aaaa"),
            "tokens never in Debug"
        );
    }
}
