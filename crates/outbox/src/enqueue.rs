//! Writing events inside the caller's transaction.

use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::envelope::NewEvent;
use crate::error::Result;

/// Channel the enqueue API notifies at commit so that relays wake at once.
pub const NOTIFY_CHANNEL: &str = "outbox_event";

/// The enqueue side of the outbox: cheap to clone, holds only configuration.
#[derive(Debug, Clone)]
pub struct Outbox {
    source_service: String,
    notify: bool,
}

impl Outbox {
    /// An outbox whose envelopes name `source_service`; relays are notified at commit.
    pub fn new(source_service: impl Into<String>) -> Self {
        Self {
            source_service: source_service.into(),
            notify: true,
        }
    }

    /// Turns the commit-time `NOTIFY` on or off. Off, relays find new events by polling only;
    /// see `docs/benchmarks.md` for what the notification costs concurrent producers.
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// The service name put into every envelope.
    pub fn source_service(&self) -> &str {
        &self.source_service
    }

    /// Writes `events` in the caller's open transaction and returns their event ids, in order.
    ///
    /// Nothing is visible to a relay until the transaction commits, and nothing remains if it rolls
    /// back. All events are validated before anything is written, so a bad one leaves no partial
    /// write. Events are inserted grouped by aggregate (stable, so their order within an aggregate is
    /// kept) to take the per-aggregate locks in one order and avoid deadlocks between producers.
    pub async fn enqueue(&self, conn: &mut PgConnection, events: &[NewEvent]) -> Result<Vec<Uuid>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        for e in events {
            e.validate()?;
        }
        let now = Utc::now();
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&events[a], &events[b]);
            (&x.tenant_id, &x.aggregate_type, &x.aggregate_id).cmp(&(
                &y.tenant_id,
                &y.aggregate_type,
                &y.aggregate_id,
            ))
        });
        let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
        let n = events.len();
        let (
            mut eid,
            mut tenant,
            mut atype,
            mut aid,
            mut etype,
            mut topic,
            mut payload,
            mut headers,
        ) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for &i in &order {
            let e = &events[i];
            let envelope = e.to_envelope(ids[i], now, &self.source_service);
            let mut h = serde_json::Map::new();
            h.insert(
                "correlationId".into(),
                envelope.correlation_id.clone().into(),
            );
            if let Some(tp) = &e.traceparent {
                h.insert("traceparent".into(), tp.clone().into());
            }
            h.insert("contentType".into(), "application/json".into());
            payload.push(serde_json::to_vec(&envelope)?);
            headers.push(serde_json::Value::Object(h));
            eid.push(ids[i]);
            tenant.push(e.tenant_id.as_str());
            atype.push(e.aggregate_type.as_str());
            aid.push(e.aggregate_id.as_str());
            etype.push(e.event_type.as_str());
            topic.push(e.topic.as_str());
        }
        // One round trip for any number of events; WITH ORDINALITY keeps the insertion order.
        sqlx::query(
            "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers)
             SELECT u.event_id, u.tenant_id, u.aggregate_type, u.aggregate_id, u.event_type, u.topic, u.payload, u.headers
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[], $8::jsonb[])
                  WITH ORDINALITY AS u(event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers, ord)
             ORDER BY u.ord",
        )
        .bind(&eid)
        .bind(&tenant)
        .bind(&atype)
        .bind(&aid)
        .bind(&etype)
        .bind(&topic)
        .bind(&payload)
        .bind(&headers)
        .execute(&mut *conn)
        .await?;
        if self.notify {
            // Delivered at commit only, and folded into one per transaction by PostgreSQL.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(NOTIFY_CHANNEL)
                .execute(&mut *conn)
                .await?;
        }
        Ok(ids)
    }
}
