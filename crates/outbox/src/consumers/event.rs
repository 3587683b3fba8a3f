//! What a consumer receives: the event's ids and position read from the broker headers, with the
//! exact bytes the producer's transaction wrote.

use std::collections::BTreeMap;

use bytes::Bytes;
use uuid::Uuid;

/// An aggregate's identity as the relay sends it (`Outbox-Tenant-Id`, `Outbox-Aggregate-Type`,
/// `Outbox-Aggregate-Id`): the unit of ordering.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggregateKey {
    /// Tenant.
    pub tenant_id: String,
    /// Aggregate kind.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
}

/// Where an event stands in its aggregate: (`Outbox-Seq-Epoch`, `Outbox-Seq`). Ordered first by
/// epoch (an aggregate compacted by the relay restarts at seq 1 in a higher epoch), then by seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Sequence epoch (0 for aggregates older than the table contract).
    pub epoch: i64,
    /// Position in the epoch, from 1.
    pub seq: i64,
}

impl Position {
    /// Whether `self` is the event right after `applied` (the next seq of the same epoch, or seq 1
    /// of a later epoch).
    pub fn follows(&self, applied: Option<Position>) -> bool {
        match applied {
            None => self.seq == 1,
            Some(a) if self.epoch == a.epoch => self.seq == a.seq + 1,
            Some(a) => self.epoch > a.epoch && self.seq == 1,
        }
    }
}

/// One event as delivered by a broker.
#[derive(Debug, Clone)]
pub struct InboundEvent {
    /// The envelope's `eventId` (`Outbox-Event-Id`, else the broker message id, else the body's
    /// `eventId`): the de-duplication key.
    pub event_id: Uuid,
    /// `Outbox-Event-Type`, if sent.
    pub event_type: Option<String>,
    /// The aggregate, when the producer sent the three aggregate headers.
    pub aggregate: Option<AggregateKey>,
    /// The position in the aggregate, when the producer sent `Outbox-Seq` (and the aggregate).
    /// Without it the event is de-duplicated by `eventId` only and not ordered.
    pub position: Option<Position>,
    /// NATS subject or AMQP routing key.
    pub subject: String,
    /// The message headers as text.
    pub headers: BTreeMap<String, String>,
    /// The body: the envelope the producer's transaction wrote.
    pub payload: Bytes,
}

/// Why a message cannot be read as an event at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable(pub String);

impl InboundEvent {
    /// Reads an event from its headers (`message_id` is the broker's own message id, if any) and
    /// body.
    pub fn from_parts(
        subject: String,
        headers: BTreeMap<String, String>,
        message_id: Option<&str>,
        payload: Bytes,
    ) -> Result<Self, Unreadable> {
        let event_id = headers
            .get("Outbox-Event-Id")
            .map(String::as_str)
            .or(message_id)
            .map(|s| s.to_string())
            .or_else(|| {
                serde_json::from_slice::<serde_json::Value>(&payload)
                    .ok()?
                    .get("eventId")?
                    .as_str()
                    .map(str::to_string)
            })
            .ok_or_else(|| {
                Unreadable("no Outbox-Event-Id header, message id or body eventId".into())
            })?;
        let event_id = Uuid::parse_str(&event_id)
            .map_err(|e| Unreadable(format!("event id {event_id:?} is not a UUID: {e}")))?;
        let aggregate = match (
            headers.get("Outbox-Tenant-Id"),
            headers.get("Outbox-Aggregate-Type"),
            headers.get("Outbox-Aggregate-Id"),
        ) {
            (Some(t), Some(ty), Some(id)) => Some(AggregateKey {
                tenant_id: t.clone(),
                aggregate_type: ty.clone(),
                aggregate_id: id.clone(),
            }),
            _ => None,
        };
        let num = |name: &str| -> Result<Option<i64>, Unreadable> {
            headers
                .get(name)
                .map(|v| {
                    v.trim()
                        .parse::<i64>()
                        .map_err(|_| Unreadable(format!("{name} {v:?} is not an integer")))
                })
                .transpose()
        };
        let position = match (num("Outbox-Seq")?, &aggregate) {
            (Some(seq), Some(_)) if seq >= 1 => Some(Position {
                epoch: num("Outbox-Seq-Epoch")?.unwrap_or(0),
                seq,
            }),
            (Some(seq), _) if seq < 1 => {
                return Err(Unreadable(format!("Outbox-Seq {seq} is not positive")))
            }
            _ => None,
        };
        Ok(Self {
            event_id,
            event_type: headers.get("Outbox-Event-Type").cloned(),
            aggregate,
            position,
            subject,
            headers,
            payload,
        })
    }

    /// Reads a message as [`InboundEvent::from_parts`] does; a message that is not a readable
    /// event comes back under a random event id, with the reason, so that it can be parked.
    pub fn read(
        subject: String,
        headers: BTreeMap<String, String>,
        message_id: Option<&str>,
        payload: Bytes,
    ) -> (Self, Option<Unreadable>) {
        match Self::from_parts(
            subject.clone(),
            headers.clone(),
            message_id,
            payload.clone(),
        ) {
            Ok(e) => (e, None),
            Err(why) => (
                Self {
                    event_id: Uuid::new_v4(),
                    event_type: headers.get("Outbox-Event-Type").cloned(),
                    aggregate: None,
                    position: None,
                    subject,
                    headers,
                    payload,
                },
                Some(why),
            ),
        }
    }

    /// The body as JSON (the envelope), for handlers that want it parsed.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_handles_epochs() {
        let p = |epoch, seq| Position { epoch, seq };
        assert!(p(0, 1).follows(None));
        assert!(!p(0, 2).follows(None));
        assert!(p(0, 3).follows(Some(p(0, 2))));
        assert!(!p(0, 4).follows(Some(p(0, 2))));
        assert!(p(9, 1).follows(Some(p(0, 7))));
        assert!(!p(9, 2).follows(Some(p(0, 7))));
        assert!(p(0, 2) < p(9, 1));
    }

    #[test]
    fn reads_ids_from_headers_then_message_id_then_body() {
        let id = Uuid::now_v7();
        let mut h = BTreeMap::new();
        h.insert("Outbox-Tenant-Id".to_string(), "t".to_string());
        h.insert("Outbox-Aggregate-Type".to_string(), "a".to_string());
        h.insert("Outbox-Aggregate-Id".to_string(), "1".to_string());
        h.insert("Outbox-Seq".to_string(), "4".to_string());
        let e =
            InboundEvent::from_parts("s".into(), h, Some(&id.to_string()), Bytes::new()).unwrap();
        assert_eq!(e.event_id, id);
        assert_eq!(e.position, Some(Position { epoch: 0, seq: 4 }));
        let body = Bytes::from(format!(r#"{{"eventId":"{id}"}}"#));
        let e = InboundEvent::from_parts("s".into(), BTreeMap::new(), None, body).unwrap();
        assert_eq!(e.event_id, id);
        assert!(e.position.is_none());
        assert!(InboundEvent::from_parts("s".into(), BTreeMap::new(), None, Bytes::new()).is_err());
    }
}
