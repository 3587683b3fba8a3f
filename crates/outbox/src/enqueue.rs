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

    /// Turns the commit-time `NOTIFY` on or off. Off, relays find new events by polling, or
    /// sooner when the producer signals a [`crate::wake::CommitNotifier`] after its commits;
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
    /// write. One statement, one round trip, for any number of events (the relay's wake-up
    /// notification included). To write events in the same statement as the caller's own rows,
    /// use [`Outbox::prepare`].
    pub async fn enqueue(&self, conn: &mut PgConnection, events: &[NewEvent]) -> Result<Vec<Uuid>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let prepared = self.prepare(events)?;
        let sql = format!(
            "WITH {} SELECT {}",
            prepared.insert_cte(1),
            prepared.notify_sql()
        );
        prepared.bind(sqlx::query(&sql)).execute(&mut *conn).await?;
        Ok(prepared.event_ids)
    }

    /// Validates and serialises `events` for one insert that the caller folds into a statement
    /// of its own (see [`PreparedEvents`]); returns the events' ids, in order, with them.
    ///
    /// Events are inserted grouped by aggregate (stable, so their order within an aggregate is
    /// kept) to take the per-aggregate locks in one order and avoid deadlocks between producers.
    pub fn prepare(&self, events: &[NewEvent]) -> Result<PreparedEvents> {
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
        let mut p = PreparedEvents {
            event_ids: ids.clone(),
            notify: self.notify,
            eid: Vec::with_capacity(n),
            tenant: Vec::with_capacity(n),
            atype: Vec::with_capacity(n),
            aid: Vec::with_capacity(n),
            etype: Vec::with_capacity(n),
            topic: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
            headers: Vec::with_capacity(n),
        };
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
            p.payload.push(serde_json::to_vec(&envelope)?);
            p.headers.push(serde_json::Value::Object(h));
            p.eid.push(ids[i]);
            p.tenant.push(e.tenant_id.clone());
            p.atype.push(e.aggregate_type.clone());
            p.aid.push(e.aggregate_id.clone());
            p.etype.push(e.event_type.clone());
            p.topic.push(e.topic.clone());
        }
        Ok(p)
    }
}

/// Events validated and serialised by [`Outbox::prepare`], ready to be inserted by a statement
/// the caller writes: its own rows and the events then cost one round trip together.
///
/// ```text
/// WITH mine AS (UPDATE ... $1 ... $2 ...), {insert_cte(3)} SELECT {notify_sql()}
/// ```
/// bound as `prepared.bind(sqlx::query(&sql).bind(a).bind(b))`: the caller's parameters first,
/// then the [`PreparedEvents::PARAMS`] of the events.
#[derive(Debug, Clone)]
pub struct PreparedEvents {
    /// The events' ids (`eventId`), in the order the events were given.
    pub event_ids: Vec<Uuid>,
    notify: bool,
    eid: Vec<Uuid>,
    tenant: Vec<String>,
    atype: Vec<String>,
    aid: Vec<String>,
    etype: Vec<String>,
    topic: Vec<String>,
    payload: Vec<Vec<u8>>,
    headers: Vec<serde_json::Value>,
}

impl PreparedEvents {
    /// How many parameters [`PreparedEvents::insert_cte`] takes.
    pub const PARAMS: usize = 8;

    /// A data-modifying common table expression named `outbox_inserted` that inserts the events
    /// (`RETURNING id`), with its parameters numbered from `$first`. PostgreSQL runs a
    /// data-modifying CTE whether or not the statement reads it.
    pub fn insert_cte(&self, first: usize) -> String {
        let p: Vec<String> = (first..first + Self::PARAMS)
            .map(|i| format!("${i}"))
            .collect();
        // WITH ORDINALITY keeps the insertion order (the ids, and so the order within an
        // aggregate, are drawn row by row by the table's trigger).
        format!(
            "outbox_inserted AS (
               INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers)
               SELECT u.event_id, u.tenant_id, u.aggregate_type, u.aggregate_id, u.event_type, u.topic, u.payload, u.headers
               FROM unnest({}::uuid[], {}::text[], {}::text[], {}::text[], {}::text[], {}::text[], {}::bytea[], {}::jsonb[])
                    WITH ORDINALITY AS u(event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers, ord)
               ORDER BY u.ord
               RETURNING id)",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
        )
    }

    /// A SQL expression to select in the same statement: it asks PostgreSQL to wake the relays
    /// at commit (`pg_notify`, folded into one per transaction), or is `NULL` when the outbox
    /// was built [`Outbox::with_notify`]`(false)` or there are no events.
    pub fn notify_sql(&self) -> String {
        if self.notify && !self.eid.is_empty() {
            format!("pg_notify('{NOTIFY_CHANNEL}', '')")
        } else {
            "NULL".to_string()
        }
    }

    /// Binds the events' parameters after those already bound to `q`.
    pub fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.eid)
            .bind(&self.tenant)
            .bind(&self.atype)
            .bind(&self.aid)
            .bind(&self.etype)
            .bind(&self.topic)
            .bind(&self.payload)
            .bind(&self.headers)
    }
}
