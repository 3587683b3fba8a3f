//! The filters pages pass around (query strings, hidden form fields) and their parsing into the
//! library's filters.

use chrono::{DateTime, NaiveDateTime, Utc};
use maud::{html, Markup};
use outbox::consumers::dead_letters::ParkedFilter;
use outbox::ops::DeadLetterFilter;
use serde::Deserialize;
use uuid::Uuid;

use crate::render::{self, enc};

/// Prefix of a form value carried percent-encoded (see [`attr_value`]).
const PCT: &str = "pct:";

/// A value as it goes into an HTML attribute: as is, or, when it holds a control character
/// (which never goes into a page), `pct:` and the value percent-encoded.
pub(crate) fn attr_value(v: &str) -> String {
    if v.chars().any(char::is_control) {
        format!("{PCT}{}", enc(v))
    } else {
        v.to_string()
    }
}

fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn some(s: &Option<String>) -> Option<String> {
    let s = s.as_deref().filter(|s| !s.trim().is_empty())?;
    match s.strip_prefix(PCT) {
        Some(rest) => pct_decode(rest),
        None => Some(s.trim().to_string()),
    }
}

/// RFC 3339, or a browser's `datetime-local` value (`2026-12-06T04:00`, taken as UTC).
fn time(s: &Option<String>, what: &str) -> Result<Option<DateTime<Utc>>, String> {
    let Some(s) = some(s) else { return Ok(None) };
    if let Ok(t) = DateTime::parse_from_rfc3339(&s) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    for fmt in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&s, fmt) {
            return Ok(Some(t.and_utc()));
        }
    }
    Err(format!(
        "{what} {s:?} is not a time: use 2026-12-06T04:00 (UTC) or RFC 3339"
    ))
}

fn uuid(s: &Option<String>) -> Result<Option<Uuid>, String> {
    some(s)
        .map(|s| {
            s.parse()
                .map_err(|_| format!("event id {s:?} is not a UUID"))
        })
        .transpose()
}

/// A filter carried in links (query string) and forms (hidden fields), and shown to the operator.
pub(crate) trait Carried {
    /// Its fields by name, unset ones `None`.
    fn pairs(&self) -> Vec<(&'static str, Option<String>)>;

    /// As a query string.
    fn query(&self) -> String {
        pairs_to_query(&self.pairs())
    }

    /// As hidden form fields.
    fn hidden(&self) -> Markup {
        pairs_to_hidden(&self.pairs())
    }

    /// As text for the operator.
    fn describe(&self) -> Markup {
        pairs_to_text(&self.pairs())
    }
}

fn pairs_to_query(pairs: &[(&str, Option<String>)]) -> String {
    pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect::<Vec<_>>()
        .join("&")
}

fn pairs_to_hidden(pairs: &[(&str, Option<String>)]) -> Markup {
    html! {
        @for (k, v) in pairs {
            @if let Some(v) = v { input type="hidden" name=(k) value=(attr_value(v)); }
        }
    }
}

fn pairs_to_text(pairs: &[(&str, Option<String>)]) -> Markup {
    html! {
        @for (i, (k, v)) in pairs.iter().filter(|(_, v)| v.is_some()).enumerate() {
            @if i > 0 { ", " }
            span.muted { (k) " = " } code { (render::text(v.as_deref().unwrap_or(""))) }
        }
    }
}

/// Which dead letters (query string or form).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct DeadQuery {
    pub(crate) event_id: Option<String>,
    pub(crate) tenant: Option<String>,
    pub(crate) aggregate_type: Option<String>,
    pub(crate) aggregate_id: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) since: Option<String>,
    pub(crate) until: Option<String>,
}

impl Carried for DeadQuery {
    fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("event_id", some(&self.event_id)),
            ("tenant", some(&self.tenant)),
            ("aggregate_type", some(&self.aggregate_type)),
            ("aggregate_id", some(&self.aggregate_id)),
            ("group", some(&self.group)),
            ("since", some(&self.since)),
            ("until", some(&self.until)),
        ]
    }
}

impl DeadQuery {
    pub(crate) fn filter(&self) -> Result<DeadLetterFilter, String> {
        Ok(DeadLetterFilter {
            event_id: uuid(&self.event_id)?,
            tenant_id: some(&self.tenant),
            aggregate_type: some(&self.aggregate_type),
            aggregate_id: some(&self.aggregate_id),
            error_group: some(&self.group),
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
            ..Default::default()
        })
    }
}

/// Which parked events (query string or form).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ParkedQuery {
    pub(crate) consumer: Option<String>,
    pub(crate) event_id: Option<String>,
    pub(crate) tenant: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) aggregate_type: Option<String>,
    pub(crate) aggregate_id: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) since: Option<String>,
    pub(crate) until: Option<String>,
}

impl Carried for ParkedQuery {
    fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("consumer", some(&self.consumer)),
            ("event_id", some(&self.event_id)),
            ("tenant", some(&self.tenant)),
            ("reason", some(&self.reason)),
            ("aggregate_type", some(&self.aggregate_type)),
            ("aggregate_id", some(&self.aggregate_id)),
            ("group", some(&self.group)),
            ("since", some(&self.since)),
            ("until", some(&self.until)),
        ]
    }
}

impl ParkedQuery {
    pub(crate) fn filter(&self) -> Result<ParkedFilter, String> {
        Ok(ParkedFilter {
            consumer: some(&self.consumer),
            event_id: uuid(&self.event_id)?,
            tenant_id: some(&self.tenant),
            reason: some(&self.reason),
            aggregate_type: some(&self.aggregate_type),
            aggregate_id: some(&self.aggregate_id),
            error_group: some(&self.group),
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
            as_of: None,
        })
    }
}
