//! The event envelope consumers receive, and the description of a new event.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{OutboxError, Result};

/// The published envelope (design brief, "Envelope"). Built once at enqueue time; its JSON bytes
/// are stored and published unchanged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// UUID v7 of this event instance; also the broker message id (`Nats-Msg-Id`, `message_id`).
    pub event_id: Uuid,
    /// The event's type, e.g. `StockLevelChangedEvent`.
    pub event_type: String,
    /// Version of the `data` schema, e.g. `1.0`.
    pub event_version: String,
    /// When the event was generated, RFC 3339 in UTC.
    pub timestamp: String,
    /// The service that produced the event.
    pub source_service: String,
    /// Ties the event to the request or process that caused it.
    pub correlation_id: String,
    /// The tenant the event belongs to.
    pub tenant_id: String,
    /// The event-specific payload.
    pub data: serde_json::Value,
}

/// An event to enqueue. `topic` is the routing key (e.g. `inventory.stock.changed`); the relay turns
/// it into a subject or routing key that also carries the tenant.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Tenant: 1-64 characters of `A-Z a-z 0-9 _ -` (it becomes a subject token).
    pub tenant_id: String,
    /// Kind of aggregate, e.g. `ProductVariant`; same alphabet as the tenant.
    pub aggregate_type: String,
    /// The aggregate's id; events of one aggregate are delivered in commit order.
    pub aggregate_id: String,
    /// Event type, e.g. `StockLevelChangedEvent`.
    pub event_type: String,
    /// Version of the payload schema.
    pub event_version: String,
    /// Dot-separated routing key.
    pub topic: String,
    /// The payload.
    pub data: serde_json::Value,
    /// Correlation id of the originating request; a new one is generated when absent.
    pub correlation_id: Option<String>,
    /// W3C `traceparent` of the request that caused the event, if it had one.
    pub traceparent: Option<String>,
}

impl NewEvent {
    /// A new event with version `1.0` and no correlation or trace context.
    pub fn new(
        tenant_id: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        topic: impl Into<String>,
        data: serde_json::Value,
    ) -> Self {
        Self {
            tenant_id: tenant_id.into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            event_version: "1.0".into(),
            topic: topic.into(),
            data,
            correlation_id: None,
            traceparent: None,
        }
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the W3C trace context.
    pub fn traceparent(mut self, tp: impl Into<String>) -> Self {
        self.traceparent = Some(tp.into());
        self
    }

    /// Checks the event against the table contract, so a bad event fails before any write.
    pub fn validate(&self) -> Result<()> {
        check_token("tenantId", &self.tenant_id, 64)?;
        check_token("aggregateType", &self.aggregate_type, 64)?;
        let aggregate_chars = self.aggregate_id.chars().count();
        if aggregate_chars == 0 || aggregate_chars > 200 {
            return Err(invalid("aggregateId must be 1 to 200 characters"));
        }
        // It travels as a broker header (`Outbox-Aggregate-Id`): a CR/LF would end the header
        // line. The table refuses it too (CHECK outbox_event_aggregate_id_no_control_chars).
        if self.aggregate_id.chars().any(char::is_control) {
            return Err(invalid(format!(
                "aggregateId {:?} must not contain control characters",
                self.aggregate_id
            )));
        }
        if let Some(c) = &self.correlation_id {
            let n = c.chars().count();
            if n == 0 || n > MAX_CORRELATION_ID {
                return Err(invalid(format!(
                    "correlationId must be 1 to {MAX_CORRELATION_ID} characters"
                )));
            }
            if c.chars().any(char::is_control) {
                return Err(invalid(format!(
                    "correlationId {c:?} must not contain control characters"
                )));
            }
        }
        if self.event_type.is_empty()
            || self.event_type.len() > 128
            || !self
                .event_type
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(invalid(format!(
                "eventType {:?} must be 1-128 characters of A-Z a-z 0-9 _ . -",
                self.event_type
            )));
        }
        if self.topic.len() > 200 || self.topic.split('.').any(|t| !is_token(t)) {
            return Err(invalid(format!(
                "topic {:?} must be dot-separated tokens of A-Z a-z 0-9 _ -",
                self.topic
            )));
        }
        if self.event_version.is_empty() || self.event_version.len() > 32 {
            return Err(invalid("eventVersion must be 1 to 32 characters"));
        }
        if let Some(tp) = &self.traceparent {
            if !is_traceparent(tp) {
                return Err(invalid(format!(
                    "traceparent {tp:?} is not a W3C trace context"
                )));
            }
        }
        Ok(())
    }

    /// Builds the envelope this event will be published as.
    pub fn to_envelope(&self, event_id: Uuid, at: DateTime<Utc>, source: &str) -> Envelope {
        Envelope {
            event_id,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            timestamp: at.to_rfc3339_opts(SecondsFormat::Millis, true),
            source_service: source.to_string(),
            correlation_id: self
                .correlation_id
                .clone()
                .unwrap_or_else(|| Uuid::now_v7().to_string()),
            tenant_id: self.tenant_id.clone(),
            data: self.data.clone(),
        }
    }
}

/// Longest correlation id accepted by [`NewEvent::validate`]. The table accepts header values up
/// to 1024 characters; a correlation id is an identifier, and 200 keeps headers small.
pub const MAX_CORRELATION_ID: usize = 200;

fn invalid(msg: impl Into<String>) -> OutboxError {
    OutboxError::InvalidEvent(msg.into())
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn check_token(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max || !is_token(value) {
        return Err(invalid(format!(
            "{field} {value:?} must be 1-{max} characters of A-Z a-z 0-9 _ -"
        )));
    }
    Ok(())
}

/// `version-traceid-parentid-flags`, lower-case hex (W3C Trace Context, level 1).
pub fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    };
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].chars().any(|c| c != '0')
        && hex(parts[2], 16)
        && parts[2].chars().any(|c| c != '0')
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> NewEvent {
        NewEvent::new(
            "acme",
            "ProductVariant",
            "v1",
            "StockLevelChangedEvent",
            "inventory.stock.changed",
            serde_json::json!({"a": 1}),
        )
    }

    #[test]
    fn validates_tokens() {
        assert!(ev().validate().is_ok());
        let mut e = ev();
        e.tenant_id = "ac.me".into();
        assert!(e.validate().is_err());
        let mut e = ev();
        e.topic = "inventory..changed".into();
        assert!(e.validate().is_err());
        let mut e = ev();
        e.topic = "inventory.*".into();
        assert!(e.validate().is_err());
    }

    #[test]
    fn control_characters_and_long_correlation_ids_are_refused() {
        let mut e = ev();
        e.aggregate_id = "v\n1".into();
        assert!(matches!(e.validate(), Err(OutboxError::InvalidEvent(m)) if m.contains("control")));
        let mut e = ev();
        e.aggregate_id = "v\u{7f}".into();
        assert!(e.validate().is_err());
        assert!(ev().correlation_id("c\r\nX-Evil: 1").validate().is_err());
        assert!(ev().correlation_id("c".repeat(201)).validate().is_err());
        assert!(ev().correlation_id("").validate().is_err());
        assert!(ev().correlation_id("c".repeat(200)).validate().is_ok());
        // Non-ASCII is fine: the limit is on characters, not bytes.
        let mut e = ev();
        e.aggregate_id = "é".repeat(200);
        assert!(e.validate().is_ok());
    }

    #[test]
    fn traceparent_format() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent("garbage"));
    }

    #[test]
    fn envelope_is_camel_case_rfc3339() {
        let id = Uuid::now_v7();
        let env = ev()
            .correlation_id("c-1")
            .to_envelope(id, Utc::now(), "InventoryService");
        let v = serde_json::to_value(&env).unwrap();
        for k in [
            "eventId",
            "eventType",
            "eventVersion",
            "timestamp",
            "sourceService",
            "correlationId",
            "tenantId",
            "data",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert!(env.timestamp.ends_with('Z'));
        assert_eq!(env.correlation_id, "c-1");
    }
}
