//! The compact metadata encoding: one header, `Outbox-Meta`, in place of the `Outbox-*` headers.
//!
//! A relay sends each event's ids and position either as one header per field (the default,
//! [`HeaderEncoding::Full`]) or, opted in per relay, as one header holding all of them
//! ([`HeaderEncoding::Compact`]). The event id stays where the broker looks for it (`Nats-Msg-Id`,
//! which JetStream de-duplicates on; the AMQP `message_id` property; on Redis Streams and Kafka,
//! which have no message id of their own, `Outbox-Event-Id`), `traceparent` stays its own
//! header (tracing tools look for it by name), and the body is the same in both.
//!
//! Why one text header and not a binary one: NATS header values are text lines (no CR or LF) and
//! RabbitMQ's are typed tables; one text format serves both, can be read by eye, and is parsed in
//! any language with a `split` and a standard percent-decoder. Why positional and not JSON: it is
//! the smallest text form (no field names), and it needs no JSON parser on the hot path.
//!
//! Layout, version 1 (docs/architecture.md, "The compact metadata header", for consumers in other
//! languages): eleven fields separated by `;`, the first the version:
//!
//! ```text
//! 1;<producer id>;<seq epoch>;<seq>;<tenant>;<aggregate type>;<aggregate id>;<event type>;<correlation id>;<skip>;<content type>
//! ```
//!
//! Text fields are percent-encoded (`%XX`, UTF-8): `%`, `;`, space and the ASCII control
//! characters always, nothing else. Integers are decimal. Empty means absent for the producer id,
//! the correlation id, the skip reason and the content type (`application/json`). A reader that
//! meets another version or another number of fields must not guess: the message is unreadable.

use std::fmt::Write as _;

use crate::publisher::{OutboundMessage, SKIP_HEADER};

/// The header that carries the compact encoding.
pub const META_HEADER: &str = "Outbox-Meta";

/// The version this module writes and reads.
pub const META_VERSION: &str = "1";

/// Fields of version 1, the version included.
const FIELDS: usize = 11;

/// The content type written when the event names none, and read from an empty field.
const DEFAULT_CONTENT_TYPE: &str = "application/json";

/// How a relay sends an event's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderEncoding {
    /// One header per field (`Outbox-Event-Id`, `Outbox-Tenant-Id`, ..., `Content-Type`): what
    /// every consumer of earlier versions reads.
    #[default]
    Full,
    /// The broker's message id (Redis, Kafka: `Outbox-Event-Id`), `Outbox-Meta`, and
    /// `traceparent` when the event has one. Read by this library's consumer runtime from this
    /// version on; other consumers read the layout in the module doc.
    Compact,
}

/// The value of `Outbox-Meta` for `m`. Never contains CR, LF or any other control character.
pub fn encode(m: &OutboundMessage) -> String {
    let mut s = String::with_capacity(
        96 + m.tenant_id.len() + m.aggregate_type.len() + m.aggregate_id.len() + m.event_type.len(),
    );
    s.push_str(META_VERSION);
    s.push(';');
    if let Some(p) = m.producer_id {
        // Hyphenated lower case, exactly as `Outbox-Producer-Id` has it: consumers key positions
        // by this text, so both encodings must name a producer alike.
        let _ = write!(s, "{}", p.hyphenated());
    }
    let _ = write!(s, ";{};{};", m.seq_epoch, m.seq);
    for field in [
        &m.tenant_id,
        &m.aggregate_type,
        &m.aggregate_id,
        &m.event_type,
    ] {
        escape_into(&mut s, field);
        s.push(';');
    }
    escape_into(&mut s, m.header("correlationId").unwrap_or(""));
    s.push(';');
    if let Some(skip) = m.header(SKIP_HEADER) {
        // A marker without a reason is still a marker: an empty field would say "no marker".
        escape_into(&mut s, if skip.is_empty() { "-" } else { skip });
    }
    s.push(';');
    match m.header("contentType") {
        Some(c) if c != DEFAULT_CONTENT_TYPE => escape_into(&mut s, c),
        _ => {}
    }
    s
}

/// Appends `v` with `%`, `;`, space and control characters percent-encoded.
fn escape_into(out: &mut String, v: &str) {
    if !v.bytes().any(needs_escape) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        if c.is_ascii() && needs_escape(c as u8) {
            let _ = write!(out, "%{:02X}", c as u8);
        } else {
            out.push(c);
        }
    }
}

fn needs_escape(b: u8) -> bool {
    b <= b' ' || b == 0x7f || b == b'%' || b == b';'
}

/// The fields of an `Outbox-Meta` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Producer identity (empty: none sent).
    pub producer: String,
    /// Sequence epoch.
    pub seq_epoch: i64,
    /// Position in the epoch, from 1.
    pub seq: i64,
    /// Tenant.
    pub tenant_id: String,
    /// Aggregate kind.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Event type.
    pub event_type: String,
    /// Correlation id, if any.
    pub correlation_id: Option<String>,
    /// The skip marker's reason, if the message is one.
    pub skip: Option<String>,
    /// Content type of the body.
    pub content_type: String,
}

/// Why an `Outbox-Meta` value cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{META_HEADER} {value:?} cannot be read: {why}")]
pub struct MetaError {
    value: String,
    why: String,
}

impl Meta {
    /// Reads a header value written by [`encode`] (or by any writer of the documented layout).
    pub fn decode(value: &str) -> Result<Self, MetaError> {
        let fail = |why: String| MetaError {
            value: value.chars().take(200).collect(),
            why,
        };
        let f: Vec<&str> = value.split(';').collect();
        if f[0] != META_VERSION {
            return Err(fail(format!(
                "version {:?} is not one this consumer reads ({META_VERSION}): upgrade the consumer",
                f[0]
            )));
        }
        if f.len() != FIELDS {
            return Err(fail(format!(
                "{} fields where version {META_VERSION} has {FIELDS}",
                f.len()
            )));
        }
        let text = |i: usize, name: &str| unescape(f[i]).map_err(|e| fail(format!("{name}: {e}")));
        let int = |i: usize, name: &str| {
            f[i].parse::<i64>()
                .map_err(|_| fail(format!("{name} {:?} is not an integer", f[i])))
        };
        let optional = |s: String| (!s.is_empty()).then_some(s);
        let seq = int(3, "seq")?;
        if seq < 1 {
            return Err(fail(format!("seq {seq} is not positive")));
        }
        Ok(Self {
            producer: text(1, "producer id")?,
            seq_epoch: int(2, "seq epoch")?,
            seq,
            tenant_id: text(4, "tenant")?,
            aggregate_type: text(5, "aggregate type")?,
            aggregate_id: text(6, "aggregate id")?,
            event_type: text(7, "event type")?,
            correlation_id: optional(text(8, "correlation id")?),
            skip: optional(text(9, "skip")?),
            content_type: optional(text(10, "content type")?)
                .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.into()),
        })
    }

    /// The fields under the names the full encoding gives them (`Outbox-Tenant-Id`, ...), so that
    /// what reads one encoding reads the other.
    pub fn full_headers(self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("Outbox-Event-Type", self.event_type),
            ("Outbox-Tenant-Id", self.tenant_id),
            ("Outbox-Aggregate-Type", self.aggregate_type),
            ("Outbox-Aggregate-Id", self.aggregate_id),
            ("Outbox-Seq", self.seq.to_string()),
            ("Outbox-Seq-Epoch", self.seq_epoch.to_string()),
            ("Content-Type", self.content_type),
        ];
        if !self.producer.is_empty() {
            h.push(("Outbox-Producer-Id", self.producer));
        }
        if let Some(c) = self.correlation_id {
            h.push(("Outbox-Correlation-Id", c));
        }
        if let Some(s) = self.skip {
            h.push(("Outbox-Skip", s));
        }
        h
    }
}

/// Percent-decodes a field; `%` must be followed by two hex digits and the result be UTF-8.
fn unescape(v: &str) -> Result<String, String> {
    if !v.contains('%') {
        return Ok(v.to_string());
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes are not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::test_message;
    use uuid::Uuid;

    fn message() -> OutboundMessage {
        let mut m = test_message(7, "v-1", 0);
        m.seq_epoch = 3;
        m.producer_id = Some(Uuid::parse_str("0193b0c4-1c2d-7e3f-8a9b-0c1d2e3f4a5b").unwrap());
        m.tenant_id = "acme".into();
        m.aggregate_type = "ProductVariant".into();
        m.event_type = "StockLevelChangedEvent".into();
        m.headers.insert(
            "correlationId".into(),
            "c0ffee00-0000-4000-8000-000000000001".into(),
        );
        m.headers
            .insert("contentType".into(), "application/json".into());
        m
    }

    #[test]
    fn the_documented_example_is_what_is_written() {
        assert_eq!(
            encode(&message()),
            "1;0193b0c4-1c2d-7e3f-8a9b-0c1d2e3f4a5b;3;7;acme;ProductVariant;v-1;\
             StockLevelChangedEvent;c0ffee00-0000-4000-8000-000000000001;;"
        );
    }

    #[test]
    fn every_field_survives_a_round_trip_whatever_its_characters() {
        let mut m = message();
        m.tenant_id = "a;b%c d".into();
        m.aggregate_id = " lead\r\nand\0trail ".into();
        m.event_type = "ünï;cödé %41".into();
        m.headers.insert(SKIP_HEADER.into(), "purged".into());
        m.headers
            .insert("contentType".into(), "text/plain; charset=utf-8".into());
        let v = encode(&m);
        assert!(!v.chars().any(|c| c.is_control()), "{v:?}");
        assert_eq!(v.split(';').count(), FIELDS, "{v:?}");
        let d = Meta::decode(&v).unwrap();
        assert_eq!(d.producer, m.producer_id.unwrap().to_string());
        assert_eq!((d.seq_epoch, d.seq), (3, 7));
        assert_eq!(d.tenant_id, m.tenant_id);
        assert_eq!(d.aggregate_type, m.aggregate_type);
        assert_eq!(d.aggregate_id, m.aggregate_id);
        assert_eq!(d.event_type, m.event_type);
        assert_eq!(d.correlation_id.as_deref(), m.header("correlationId"));
        assert_eq!(d.skip.as_deref(), Some("purged"));
        assert_eq!(d.content_type, "text/plain; charset=utf-8");
    }

    #[test]
    fn absent_fields_read_as_absent_and_an_empty_skip_reason_is_still_a_skip() {
        let mut m = message();
        m.producer_id = None;
        m.headers.clear();
        m.headers.insert(SKIP_HEADER.into(), String::new());
        let d = Meta::decode(&encode(&m)).unwrap();
        assert_eq!(d.producer, "");
        assert_eq!(d.correlation_id, None);
        assert_eq!(d.skip.as_deref(), Some("-"));
        assert_eq!(d.content_type, DEFAULT_CONTENT_TYPE);
        let names: Vec<&str> = d.full_headers().iter().map(|(k, _)| *k).collect();
        assert!(!names.contains(&"Outbox-Producer-Id"), "{names:?}");
        assert!(names.contains(&"Outbox-Skip"), "{names:?}");
    }

    #[test]
    fn malformed_values_are_refused_with_the_reason() {
        let good = encode(&message());
        for (bad, why) in [
            (String::new(), "version"),
            (good.replacen('1', "2", 1), "version"),
            (format!("{good};extra"), "12 fields"),
            (good.rsplit_once(';').unwrap().0.to_string(), "10 fields"),
            (good.replace(";3;7;", ";3;x;"), "seq \"x\""),
            (good.replace(";3;7;", ";3;0;"), "not positive"),
            (good.replace(";3;7;", ";e;7;"), "seq epoch"),
            (good.replace("acme", "ac%2"), "tenant: bad percent"),
            (good.replace("acme", "ac%zz"), "tenant: bad percent"),
            (good.replace("acme", "%FF"), "not UTF-8"),
        ] {
            let e = Meta::decode(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
