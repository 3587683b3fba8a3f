//! The outbox databases a command works on: every `--database-url` (`[NAME=]URL`, repeatable)
//! and every line of `--databases-file`, each with the name operators see in metrics, health and
//! `outbox status`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The database used when neither `--database-url` nor `--databases-file` names one.
pub const DEFAULT_URL: &str = "postgres://root@127.0.0.1:5432/root";

/// One outbox database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    /// The operator's name for it (the `database` label of metrics, the key in health and status).
    pub name: String,
    /// PostgreSQL URL.
    pub url: String,
    /// Whether the operator chose the name (`NAME=URL`) rather than it being derived from the URL.
    pub named: bool,
}

/// Why the list of databases cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DatabasesError {
    /// A name that cannot be a metric label value or a file-friendly key.
    #[error("database name {name:?} ({origin}) is not valid: use 1 to 63 letters, digits, '_' or '-', as in `eu-1=postgres://...`")]
    BadName {
        /// The name as given.
        name: String,
        /// Where it was given.
        origin: String,
    },
    /// Not a PostgreSQL URL.
    #[error("{origin}: {value:?} is not NAME=postgres://... nor a postgres:// URL")]
    BadUrl {
        /// The value as given.
        value: String,
        /// Where it was given.
        origin: String,
    },
    /// Two databases with the same name.
    #[error("two databases are named {0:?}: give each its own name with NAME=URL")]
    Duplicate(String),
    /// The file cannot be read.
    #[error("cannot read --databases-file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `--database NAME` matches nothing.
    #[error("no database is named {0:?}; the names are: {1}")]
    Unknown(String, String),
}

/// Parses one `[NAME=]URL` value; `origin` says where it came from, for error messages.
pub fn parse_one(value: &str, origin: &str) -> Result<Database, DatabasesError> {
    let value = value.trim();
    let is_url = |s: &str| s.starts_with("postgres://") || s.starts_with("postgresql://");
    if is_url(value) {
        return Ok(Database {
            name: derived_name(value),
            url: value.to_string(),
            named: false,
        });
    }
    let Some((name, url)) = value.split_once('=') else {
        return Err(DatabasesError::BadUrl {
            value: value.into(),
            origin: origin.into(),
        });
    };
    let (name, url) = (name.trim(), url.trim());
    if !is_url(url) {
        return Err(DatabasesError::BadUrl {
            value: value.into(),
            origin: origin.into(),
        });
    }
    if !valid_name(name) {
        return Err(DatabasesError::BadName {
            name: name.into(),
            origin: origin.into(),
        });
    }
    Ok(Database {
        name: name.into(),
        url: url.into(),
        named: true,
    })
}

/// Reads a databases file: one `[NAME=]URL` per line; blank lines and lines starting with `#`
/// are ignored.
pub fn parse_file(path: &Path) -> Result<Vec<Database>, DatabasesError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatabasesError::File {
        path: path.into(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| parse_one(l, &format!("{} line {}", path.display(), i + 1)))
        .collect()
}

/// Every database given: the `--database-url` values first, then the file's lines; the default
/// URL when there are none. Names must be unique.
pub fn resolve(urls: &[String], file: Option<&Path>) -> Result<Vec<Database>, DatabasesError> {
    let mut out = urls
        .iter()
        .map(|u| parse_one(u, "--database-url"))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(f) = file {
        out.extend(parse_file(f)?);
    }
    if out.is_empty() {
        out.push(parse_one(DEFAULT_URL, "default")?);
    }
    let mut seen = HashSet::new();
    for d in &out {
        if !seen.insert(d.name.as_str()) {
            return Err(DatabasesError::Duplicate(d.name.clone()));
        }
    }
    Ok(out)
}

/// Keeps only the database called `name` (`--database NAME`), or all when `name` is `None`.
pub fn select(all: Vec<Database>, name: Option<&str>) -> Result<Vec<Database>, DatabasesError> {
    let Some(name) = name else { return Ok(all) };
    let names = all
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    match all.into_iter().find(|d| d.name == name) {
        Some(d) => Ok(vec![d]),
        None => Err(DatabasesError::Unknown(name.into(), names)),
    }
}

/// Whether `list` is the plain single-database case (one unnamed URL): the relay then runs
/// exactly as it always has, with unlabelled metrics and the single-database health bodies.
pub fn is_single_unnamed(list: &[Database]) -> bool {
    matches!(list, [d] if !d.named)
}

/// The database part of the URL's path (`.../inventory?x=y` gives `inventory`), else `default`.
fn derived_name(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
    let db = path.split(['?', '#']).next().unwrap_or("");
    if valid_name(db) {
        db.to_string()
    } else {
        "default".to_string()
    }
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_unnamed_values() {
        let d = parse_one("eu-1=postgres://u@h:5432/orders?sslmode=require", "t").unwrap();
        assert_eq!(
            (d.name.as_str(), d.url.as_str(), d.named),
            ("eu-1", "postgres://u@h:5432/orders?sslmode=require", true)
        );
        let d = parse_one("postgres://u@h/orders?application_name=a=b", "t").unwrap();
        assert_eq!((d.name.as_str(), d.named), ("orders", false));
        assert_eq!(parse_one("postgresql://h", "t").unwrap().name, "default");
        assert!(parse_one("eu 1=postgres://h/x", "t").is_err());
        assert!(parse_one("eu=mysql://h/x", "t").is_err());
        assert!(parse_one("just-a-name", "t").is_err());
    }

    #[test]
    fn file_lines_flags_default_and_duplicates() {
        let dir = std::env::temp_dir().join(format!("dbs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("databases");
        std::fs::write(&f, "# tenants\n\nb=postgres://h/b\n  c=postgres://h/c  \n").unwrap();
        let all = resolve(&["a=postgres://h/a".into()], Some(&f)).unwrap();
        let names: Vec<_> = all.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(!is_single_unnamed(&all));
        assert_eq!(
            select(all.clone(), Some("c")).unwrap()[0].url,
            "postgres://h/c"
        );
        assert!(select(all, Some("z")).is_err());
        let dflt = resolve(&[], None).unwrap();
        assert_eq!(dflt[0].url, DEFAULT_URL);
        assert!(is_single_unnamed(&dflt));
        assert!(matches!(
            resolve(&["postgres://h/x".into(), "x=postgres://g/x".into()], None),
            Err(DatabasesError::Duplicate(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
