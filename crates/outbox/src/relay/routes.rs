//! Routes the broker refused, held back for a back-off while the other routes flow (issue 19).
//!
//! A *route* is the subject or routing key a message is published with
//! ([`crate::Publisher::route_template`]). A full RabbitMQ queue with `x-overflow: reject-publish`
//! nacks what is routed to it, a JetStream subject at its `max_msgs_per_subject` with
//! `discard_new_per_subject` refuses new messages for that subject: outages of one route, reported
//! as [`FailureKind::RouteRefused`](crate::FailureKind::RouteRefused). Treating them as a
//! broker-wide outage held back every route, and since the refused event stayed at the head of
//! every claim the relay spun (claim, send, nack, settle) without pause.
//!
//! The rules:
//! - A refused route is held for a back-off (100 ms doubling per refusal in a row, capped at the
//!   broker back-off cap). While held, nothing is sent to it, and nothing of an aggregate whose
//!   first pending event goes to it: the relay drops such messages from a claimed batch (with
//!   the rest of their aggregates: a claim returns each aggregate's events from its first) and
//!   remembers their aggregates, which later claims leave out whole
//!   ([`crate::store::HeldRoutes`]). So a refused route's backlog costs a claim one look per
//!   aggregate, then nothing: the other routes get the whole batch.
//! - When the back-off ends, one message of the route is let through (a probe); the rest of the
//!   route stays out of the batch. Acknowledged: the route is released. Refused: held again,
//!   for longer. So a refused route gets at most one publish per back-off interval, beyond what
//!   was already in flight when its first refusal came.
//! - No row is touched: a held route's events stay pending with their attempts unspent.
//! - More than `limit` routes held at once (a full queue bound by `#` refuses every key) is the
//!   broker's outage, not the routes': the holds are dropped and the relay backs off as a whole.
//! - This relay's holds are written to `outbox_route_hold` for `outbox status`, and counted in
//!   the gauges `outbox_refused_routes` and `outbox_oldest_route_held_age_seconds` (no route
//!   label: routes carry tenants).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::publisher::OutboundMessage;
use crate::store::{HeldRoutes, RouteHoldRow};

/// An aggregate: tenant, type, id.
type AggKey = (String, String, String);
use crate::telemetry as m;

/// One refused route.
#[derive(Debug, Clone)]
struct Hold {
    /// Not sent to before this (then one probe).
    until: Instant,
    /// Refusals in a row.
    refusals: u32,
    since: DateTime<Utc>,
    oldest_event: DateTime<Utc>,
    last_error: String,
    /// Aggregates whose first pending event goes to this route: claims leave them out.
    aggregates: HashSet<AggKey>,
}

/// The routes one relay holds back. Owned by the relay loop.
#[derive(Debug)]
pub struct RouteHolds {
    template: String,
    holds: HashMap<String, Hold>,
    cap: Duration,
    limit: usize,
}

/// What recording a batch's outcomes changed.
#[derive(Debug, Default, PartialEq)]
pub struct Recorded {
    /// Routes were held or released: write them for `outbox status`.
    pub changed: bool,
    /// More routes are held than the limit: back off as a whole (the holds were dropped).
    pub broker_wide: bool,
}

impl RouteHolds {
    /// No route held. `template` renders a message's route, `cap` bounds one back-off, and more
    /// than `limit` held routes fall back to a broker-wide back-off.
    pub fn new(template: &str, cap: Duration, limit: usize) -> Self {
        Self {
            template: template.to_string(),
            holds: HashMap::new(),
            cap: cap.max(Duration::from_millis(100)),
            limit,
        }
    }

    /// The route of `msg`.
    pub fn route(&self, msg: &OutboundMessage) -> String {
        msg.render(&self.template)
    }

    /// Whether no route is held.
    pub fn is_empty(&self) -> bool {
        self.holds.is_empty()
    }

    /// The aggregates a claim must leave out now: those of the routes whose back-off has not
    /// ended (a route due for its probe has its aggregates claimed again).
    pub fn active(&self) -> HeldRoutes {
        let now = Instant::now();
        let mut out = HeldRoutes::default();
        for h in self.holds.values().filter(|h| h.until > now) {
            for (t, a, i) in &h.aggregates {
                out.tenants.push(t.clone());
                out.aggregate_types.push(a.clone());
                out.aggregate_ids.push(i.clone());
            }
        }
        out
    }

    /// When the earliest back-off ends, if any route is held.
    pub fn next_due(&self) -> Option<Instant> {
        self.holds.values().map(|h| h.until).min()
    }

    /// Drops from `batch` what may not be sent now: messages of a held route, all but the first
    /// message of a route whose back-off ended (its probe), and every later message of their
    /// aggregates (the batch holds each aggregate's events in order). What is dropped stays
    /// pending, untouched. A claim already leaves out the held routes; this also covers a claim
    /// made before a route was refused, and stores that cannot filter.
    pub fn filter(&mut self, batch: Vec<OutboundMessage>) -> Vec<OutboundMessage> {
        if self.holds.is_empty() {
            return batch;
        }
        let now = Instant::now();
        let mut stopped: HashSet<(String, String, String)> = HashSet::new();
        let mut probing: HashSet<String> = HashSet::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut kept = Vec::with_capacity(batch.len());
        for msg in batch {
            let key = || {
                (
                    msg.tenant_id.clone(),
                    msg.aggregate_type.clone(),
                    msg.aggregate_id.clone(),
                )
            };
            if stopped.contains(&key()) {
                continue;
            }
            let route = self.route(&msg);
            if let Some(h) = self.holds.get_mut(&route) {
                seen.insert(route.clone());
                h.oldest_event = h.oldest_event.min(msg.created_at);
                h.aggregates.insert(key());
                if h.until > now || !probing.insert(route) {
                    stopped.insert(key());
                    continue;
                }
            }
            kept.push(msg);
        }
        // A route whose back-off ended long ago and that no claim brought back has nothing
        // pending here any more (published by another relay, purged): forget it.
        let stale = self.cap * 4;
        self.holds
            .retain(|r, h| seen.contains(r) || now.saturating_duration_since(h.until) < stale);
        self.gauges();
        kept
    }

    /// Records a batch's outcomes: `refused` are the messages a route refused (with the broker's
    /// words), `delivered` those the broker acknowledged. Logs each route held or released.
    pub fn record(
        &mut self,
        refused: &[(&OutboundMessage, &str)],
        delivered: &[&OutboundMessage],
    ) -> Recorded {
        let mut out = Recorded::default();
        let now = Instant::now();
        let mut this_batch: HashMap<String, usize> = HashMap::new();
        for (msg, error) in refused {
            let route = self.route(msg);
            let n = this_batch.entry(route.clone()).or_default();
            *n += 1;
            if *n > 1 {
                // Several messages of the route refused in one batch count as one refusal.
                if let Some(h) = self.holds.get_mut(&route) {
                    h.oldest_event = h.oldest_event.min(msg.created_at);
                    h.aggregates.insert(agg_key(msg));
                }
                continue;
            }
            let h = self.holds.entry(route.clone()).or_insert_with(|| Hold {
                until: now,
                refusals: 0,
                since: Utc::now(),
                oldest_event: msg.created_at,
                last_error: String::new(),
                aggregates: HashSet::new(),
            });
            h.aggregates.insert(agg_key(msg));
            h.refusals += 1;
            let wait = back_off(h.refusals, self.cap);
            h.until = now + wait;
            h.oldest_event = h.oldest_event.min(msg.created_at);
            h.last_error = error.to_string();
            out.changed = true;
            tracing::warn!(
                route = %route,
                refusals = h.refusals,
                retry_in_ms = wait.as_millis() as u64,
                error = %error,
                "the broker refused a route; its events wait, the other routes flow"
            );
        }
        for msg in delivered {
            if self.holds.is_empty() {
                break;
            }
            let route = self.route(msg);
            if this_batch.contains_key(&route) {
                continue;
            }
            if let Some(h) = self.holds.remove(&route) {
                out.changed = true;
                tracing::info!(route = %route, refusals = h.refusals, "a refused route takes messages again");
            }
        }
        if self.holds.len() > self.limit {
            tracing::warn!(
                routes = self.holds.len(),
                limit = self.limit,
                "more routes refused than the limit: treating it as a broker-wide outage"
            );
            self.holds.clear();
            out.broker_wide = true;
            out.changed = true;
        }
        self.gauges();
        out
    }

    /// The holds as written for `outbox status`.
    pub fn rows(&self) -> Vec<RouteHoldRow> {
        let now = Instant::now();
        let wall = Utc::now();
        self.holds
            .iter()
            .map(|(route, h)| RouteHoldRow {
                route: route.clone(),
                refusals: i32::try_from(h.refusals).unwrap_or(i32::MAX),
                since: h.since,
                until: wall
                    + chrono::Duration::from_std(h.until.saturating_duration_since(now))
                        .unwrap_or_default(),
                oldest_event_at: h.oldest_event,
                last_error: h.last_error.clone(),
            })
            .collect()
    }

    /// Sets the two gauges.
    pub fn gauges(&self) {
        metrics::gauge!(m::ROUTES_REFUSED).set(self.holds.len() as f64);
        let age = self
            .holds
            .values()
            .map(|h| h.oldest_event)
            .min()
            .map(|t| (Utc::now() - t).to_std().unwrap_or_default().as_secs_f64())
            .unwrap_or(0.0);
        metrics::gauge!(m::OLDEST_ROUTE_HELD_AGE).set(age);
    }
}

fn agg_key(m: &OutboundMessage) -> AggKey {
    (
        m.tenant_id.clone(),
        m.aggregate_type.clone(),
        m.aggregate_id.clone(),
    )
}

/// The back-off after `refusals` refusals in a row: 100 ms doubling, capped.
pub fn back_off(refusals: u32, cap: Duration) -> Duration {
    let ms = 100u64.saturating_mul(1u64 << refusals.saturating_sub(1).min(16));
    Duration::from_millis(ms).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: i64, agg: &str, topic: &str) -> OutboundMessage {
        let mut m = crate::publisher::test_message(id, agg, 0);
        m.topic = topic.into();
        m
    }

    fn ids(b: &[OutboundMessage]) -> Vec<i64> {
        b.iter().map(|m| m.id).collect()
    }

    #[test]
    fn a_held_route_and_what_follows_it_in_its_aggregate_stay_out() {
        let mut h = RouteHolds::new("{topic}", Duration::from_secs(5), 8);
        let full = msg(1, "a", "full");
        let r = h.record(&[(&full, "nack")], &[]);
        assert!(r.changed && !r.broker_wide);
        assert_eq!(h.active().aggregate_ids, vec!["a".to_string()]);
        let batch = vec![
            msg(1, "a", "full"),
            msg(2, "b", "ok"),
            msg(3, "a", "ok"),
            msg(4, "c", "full"),
            msg(5, "c", "ok"),
            msg(6, "b", "ok"),
        ];
        assert_eq!(ids(&h.filter(batch)), vec![2, 6]);
        let mut held = h.active().aggregate_ids;
        held.sort();
        assert_eq!(held, vec!["a", "c"], "c learnt from the batch");
    }

    #[test]
    fn one_probe_after_the_back_off_then_released_or_held_longer() {
        let mut h = RouteHolds::new("{topic}", Duration::from_secs(5), 8);
        let full = msg(1, "a", "full");
        h.record(&[(&full, "nack")], &[]);
        std::thread::sleep(Duration::from_millis(120));
        assert!(h.active().is_empty(), "back-off over");
        let batch = vec![msg(1, "a", "full"), msg(4, "c", "full"), msg(5, "c", "ok")];
        assert_eq!(ids(&h.filter(batch)), vec![1], "one probe only");
        h.record(&[(&full, "nack")], &[]);
        let until = h.holds["full"].until;
        assert!(
            until > Instant::now() + Duration::from_millis(150),
            "second back-off is longer"
        );
        std::thread::sleep(Duration::from_millis(220));
        let r = h.record(&[], &[&full]);
        assert!(
            r.changed && h.is_empty(),
            "an acknowledgement releases the route"
        );
    }

    #[test]
    fn more_routes_than_the_limit_is_a_broker_wide_outage() {
        let mut h = RouteHolds::new("{topic}", Duration::from_secs(5), 2);
        let (a, b, c) = (msg(1, "a", "x"), msg(2, "b", "y"), msg(3, "c", "z"));
        assert!(!h.record(&[(&a, "e"), (&b, "e")], &[]).broker_wide);
        assert!(h.record(&[(&c, "e")], &[]).broker_wide);
        assert!(h.is_empty());
    }
}
