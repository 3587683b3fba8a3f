//! Sending one batch with many acknowledgements in flight, but never two of one aggregate.
//!
//! Every broker adapter sends through [`run`]. It keeps two bounds, each closing a way in which a
//! pipelined batch broke a guarantee:
//!
//! - **At most one unacknowledged message per aggregate.** An aggregate's next event is sent only
//!   after the broker acknowledged the previous one. Pipelining across aggregates keeps throughput
//!   (a batch of a backlog usually holds many aggregates). Without this bound an aggregate could be
//!   reordered at the broker: async-nats drops its unflushed write buffer on a reconnect but still
//!   writes the commands queued after it, so X1 was lost while X2 was stored; a stream refusing X1
//!   (too large for it) accepted X2 of the same batch; and every retry of a failed X1, claimed
//!   again together with X2, recreated the race. With one in flight, X2 is never sent before the
//!   broker has X1, whatever the broker or the client does in between.
//! - **At most `window` acknowledgements outstanding.** async-nats holds one of its in-flight
//!   permits per unread acknowledgement: sending more than the permits before reading any ack
//!   waited forever. Acknowledgements are read while sending, so the window only bounds memory.
//!
//! Failures: an `Unavailable` outcome stops all further sending (the broker is away; what was not
//! sent is reported `Unavailable` too, no attempt is spent). A `RouteRefused` outcome stops
//! sending to its route (the message rendered with the route template): what was not sent to it
//! is reported `RouteRefused` too, so a full queue gets no more publishes than were already in
//! flight when its first refusal came. A `Retryable` or `Permanent` outcome stops only its
//! aggregate (as do the two above): its later events are reported as held back and are not sent. Nothing
//! is sent at or after `deadline` (the end of the relay's lease): a relay that stalled past its
//! lease must not publish what another relay may already have published after it; what was not
//! sent is reported `LeaseExpired`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::publisher::{Delivery, FailureKind, OutboundMessage, PublishFailure};

/// The broker's answer for one sent message, awaited while other messages are sent.
pub type AckFuture = BoxFuture<'static, Result<Delivery, PublishFailure>>;

/// Outcome of a message that was not sent because an earlier event of its aggregate failed.
fn held_back() -> PublishFailure {
    PublishFailure::new(
        FailureKind::Retryable,
        "held_back",
        "not sent: an earlier event of its aggregate was not published",
    )
}

/// Publishes `batch` through `send`, which hands one message to the broker and returns the future
/// of its acknowledgement (or the failure to send it). `route_template` renders a message's route
/// ([`crate::publisher::Publisher::route_template`]). Returns one outcome per message, in batch
/// order. See the module doc for the rules.
pub async fn run<'a, S, Fut>(
    batch: &'a [OutboundMessage],
    route_template: &str,
    window: usize,
    deadline: Instant,
    send: S,
) -> Vec<Result<Delivery, PublishFailure>>
where
    S: FnMut(&'a OutboundMessage) -> Fut,
    Fut: Future<Output = Result<AckFuture, PublishFailure>>,
{
    run_with(batch, route_template, window, deadline, false, send).await
}

/// [`run`] for a broker client that keeps the messages of one key in order while several are in
/// flight ([`crate::publisher::Publisher::ordered_in_flight_per_key`], Kafka's idempotent
/// producer): with `ordered_in_flight`, an aggregate's next event is handed over as soon as the
/// client accepted the previous one, not when the broker acknowledged it, so a hot aggregate is
/// not held to one round trip per event. When an event of the aggregate fails, its successors
/// not yet handed over are held back; those already handed over report what the broker said
/// (the engine then keeps any acknowledged one pending and publishes it again after its
/// predecessor, see `relay::engine::decide`).
pub async fn run_with<'a, S, Fut>(
    batch: &'a [OutboundMessage],
    route_template: &str,
    window: usize,
    deadline: Instant,
    ordered_in_flight: bool,
    mut send: S,
) -> Vec<Result<Delivery, PublishFailure>>
where
    S: FnMut(&'a OutboundMessage) -> Fut,
    Fut: Future<Output = Result<AckFuture, PublishFailure>>,
{
    let window = window.max(1);
    let mut sent = vec![false; batch.len()];
    let mut out: Vec<Option<Result<Delivery, PublishFailure>>> = vec![None; batch.len()];
    // `next[i]`: the index of the event that follows `i` in its aggregate, if any.
    let mut next: Vec<Option<usize>> = vec![None; batch.len()];
    let mut ready: VecDeque<usize> = VecDeque::new();
    let mut last: HashMap<(&str, &str, &str), usize> = HashMap::new();
    for (i, m) in batch.iter().enumerate() {
        match last.insert(m.aggregate_key(), i) {
            Some(prev) => next[prev] = Some(i),
            None => ready.push_back(i),
        }
    }
    drop(last);
    let routes: Vec<String> = batch.iter().map(|m| m.render(route_template)).collect();
    let mut in_flight = FuturesUnordered::new();
    // Why sending stopped for everyone, if it did.
    let mut stopped: Option<PublishFailure> = None;
    // Routes that refused a message in this batch, with the refusal.
    let mut refused: HashMap<&str, PublishFailure> = HashMap::new();
    loop {
        while stopped.is_none() && in_flight.len() < window {
            let Some(i) = ready.pop_front() else { break };
            if out[i].is_some() {
                // Held back behind a predecessor that failed after this one was queued.
                continue;
            }
            if let Some(f) = refused.get(routes[i].as_str()) {
                let not_sent = PublishFailure::new(
                    FailureKind::RouteRefused,
                    f.reason,
                    format!(
                        "not sent: its route {:?} refused a message ({})",
                        routes[i], f.message
                    ),
                );
                record(
                    i,
                    Err(not_sent),
                    &mut out,
                    &next,
                    &sent,
                    &mut ready,
                    &mut stopped,
                );
                continue;
            }
            if Instant::now() >= deadline {
                ready.push_front(i);
                stopped = Some(PublishFailure::new(
                    FailureKind::LeaseExpired,
                    "lease",
                    "not sent: the relay's partition lease ran out before it could be sent",
                ));
                break;
            }
            match send(&batch[i]).await {
                Ok(ack) => {
                    sent[i] = true;
                    if ordered_in_flight {
                        if let Some(n) = next[i] {
                            ready.push_back(n);
                        }
                    }
                    in_flight.push(async move { (i, ack.await) })
                }
                Err(f) => {
                    note_refusal(&routes[i], &f, &mut refused);
                    record(i, Err(f), &mut out, &next, &sent, &mut ready, &mut stopped)
                }
            }
        }
        match in_flight.next().await {
            Some((i, outcome)) => {
                if let Err(f) = &outcome {
                    note_refusal(&routes[i], f, &mut refused);
                }
                // Ordered in flight: the successor was queued when this one was handed over.
                let next = if ordered_in_flight && outcome.is_ok() {
                    &[][..]
                } else {
                    &next[..]
                };
                record(i, outcome, &mut out, next, &sent, &mut ready, &mut stopped)
            }
            None => break,
        }
    }
    let unsent = stopped.unwrap_or_else(held_back);
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| Err(unsent.clone())))
        .collect()
}

/// Remembers a route's refusal, so that nothing more of the batch is sent to it.
fn note_refusal<'r>(
    route: &'r str,
    f: &PublishFailure,
    refused: &mut HashMap<&'r str, PublishFailure>,
) {
    if f.kind == FailureKind::RouteRefused {
        refused.entry(route).or_insert_with(|| f.clone());
    }
}

/// Records message `i`'s outcome and decides what of its aggregate may follow.
fn record(
    i: usize,
    outcome: Result<Delivery, PublishFailure>,
    out: &mut [Option<Result<Delivery, PublishFailure>>],
    next: &[Option<usize>],
    sent: &[bool],
    ready: &mut VecDeque<usize>,
    stopped: &mut Option<PublishFailure>,
) {
    match &outcome {
        Ok(_) => {
            if let Some(Some(n)) = next.get(i) {
                ready.push_back(*n);
            }
        }
        Err(f) => {
            let not_sent = if f.kind == FailureKind::Unavailable {
                if stopped.is_none() {
                    *stopped = Some(PublishFailure::new(
                        FailureKind::Unavailable,
                        f.reason,
                        format!("not sent: the broker became unavailable ({})", f.message),
                    ));
                }
                stopped.clone().unwrap_or_else(held_back)
            } else {
                held_back()
            };
            let mut n = next.get(i).copied().flatten();
            while let Some(j) = n {
                // One already handed over (ordered in flight) reports its own outcome.
                if !sent[j] {
                    out[j] = Some(Err(not_sent.clone()));
                }
                n = next[j];
            }
        }
    }
    out[i] = Some(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    fn msg(i: i64, agg: &str) -> OutboundMessage {
        crate::publisher::test_message(i, agg, 0)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// A broker that acknowledges after a short delay and records, at each send, which messages
    /// were unacknowledged: no aggregate may ever have two.
    #[tokio::test]
    async fn never_two_of_one_aggregate_in_flight_and_window_bounded() {
        let batch: Vec<_> = (0..300).map(|i| msg(i, &format!("a{}", i % 7))).collect();
        let open: Arc<Mutex<Vec<String>>> = Arc::default();
        let max_open = Arc::new(Mutex::new(0usize));
        let order: Arc<Mutex<Vec<i64>>> = Arc::default();
        let out = run(&batch, "{topic}", 5, far(), |m| {
            let (open, max_open, order) = (open.clone(), max_open.clone(), order.clone());
            let agg = m.aggregate_id.clone();
            let id = m.id;
            async move {
                {
                    let mut o = open.lock().unwrap();
                    assert!(!o.contains(&agg), "two unacknowledged events of {agg}");
                    o.push(agg.clone());
                    let mut mx = max_open.lock().unwrap();
                    *mx = (*mx).max(o.len());
                    order.lock().unwrap().push(id);
                }
                let ack: AckFuture = async move {
                    tokio::time::sleep(Duration::from_micros(200 + (id as u64 % 5) * 100)).await;
                    open.lock().unwrap().retain(|a| a != &agg);
                    Ok(Delivery::Stored)
                }
                .boxed();
                Ok(ack)
            }
        })
        .await;
        assert!(out.iter().all(|o| o.is_ok()));
        assert!(*max_open.lock().unwrap() <= 5);
        // Per aggregate, sent in batch order.
        let order = order.lock().unwrap();
        for a in 0..7 {
            let ids: Vec<i64> = order.iter().copied().filter(|i| i % 7 == a).collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[tokio::test]
    async fn a_refused_event_stops_its_aggregate_and_an_outage_stops_everything() {
        let batch = vec![
            msg(1, "a"),
            msg(2, "b"),
            msg(3, "a"),
            msg(4, "b"),
            msg(5, "c"),
        ];
        let sent: Arc<Mutex<Vec<i64>>> = Arc::default();
        let out = run(&batch, "{topic}", 10, far(), |m| {
            let sent = sent.clone();
            let id = m.id;
            async move {
                sent.lock().unwrap().push(id);
                let r = if id == 1 {
                    Err(PublishFailure::new(
                        FailureKind::Permanent,
                        "too_large",
                        "x",
                    ))
                } else {
                    Ok(Delivery::Stored)
                };
                Ok(async move { r }.boxed())
            }
        })
        .await;
        assert!(out[0].is_err() && out[1].is_ok() && out[3].is_ok() && out[4].is_ok());
        assert_eq!(out[2].as_ref().unwrap_err().reason, "held_back");
        assert!(
            !sent.lock().unwrap().contains(&3),
            "event 3 must not be sent after 1 failed"
        );

        let sent: Arc<Mutex<Vec<i64>>> = Arc::default();
        let out = run(&batch, "{topic}", 1, far(), |m| {
            let sent = sent.clone();
            let id = m.id;
            async move {
                sent.lock().unwrap().push(id);
                if id == 2 {
                    return Err(PublishFailure::new(
                        FailureKind::Unavailable,
                        "disconnected",
                        "x",
                    ));
                }
                Ok(async { Ok(Delivery::Stored) }.boxed())
            }
        })
        .await;
        assert_eq!(
            *sent.lock().unwrap(),
            vec![1, 2],
            "nothing is sent after an outage"
        );
        for o in &out[1..] {
            assert_eq!(o.as_ref().unwrap_err().kind, FailureKind::Unavailable);
        }
    }

    /// Ordered in flight (Kafka): a hot aggregate has several events unacknowledged at once, sent
    /// in order; when one fails, its successors not yet handed over are held back, and one
    /// already handed over reports the broker's answer.
    #[tokio::test]
    async fn ordered_in_flight_sends_a_hot_aggregate_without_waiting_and_holds_after_a_failure() {
        let batch: Vec<_> = (1..=6).map(|i| msg(i, "hot")).collect();
        let open = Arc::new(Mutex::new(0usize));
        let max_open = Arc::new(Mutex::new(0usize));
        let order: Arc<Mutex<Vec<i64>>> = Arc::default();
        let out = run_with(&batch, "{topic}", 10, far(), true, |m| {
            let (open, max_open, order) = (open.clone(), max_open.clone(), order.clone());
            let id = m.id;
            async move {
                order.lock().unwrap().push(id);
                {
                    let mut o = open.lock().unwrap();
                    *o += 1;
                    let mut mx = max_open.lock().unwrap();
                    *mx = (*mx).max(*o);
                }
                let ack: AckFuture = async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *open.lock().unwrap() -= 1;
                    Ok(Delivery::Stored)
                }
                .boxed();
                Ok(ack)
            }
        })
        .await;
        assert!(out.iter().all(|o| o.is_ok()));
        assert_eq!(*order.lock().unwrap(), vec![1, 2, 3, 4, 5, 6]);
        assert!(
            *max_open.lock().unwrap() > 1,
            "several of one aggregate in flight"
        );

        // Event 2 is refused by the client: 3.. are never sent; 1 reports its own outcome.
        let sent: Arc<Mutex<Vec<i64>>> = Arc::default();
        let out = run_with(&batch, "{topic}", 10, far(), true, |m| {
            let sent = sent.clone();
            let id = m.id;
            async move {
                if id == 2 {
                    return Err(PublishFailure::new(
                        FailureKind::Permanent,
                        "too_large",
                        "x",
                    ));
                }
                sent.lock().unwrap().push(id);
                Ok(async { Ok(Delivery::Stored) }.boxed())
            }
        })
        .await;
        assert_eq!(*sent.lock().unwrap(), vec![1]);
        assert!(out[0].is_ok());
        assert_eq!(out[1].as_ref().unwrap_err().reason, "too_large");
        for o in &out[2..] {
            assert_eq!(o.as_ref().unwrap_err().reason, "held_back");
        }

        // Event 1 fails at the broker after 2 was handed over: 2 reports the broker's answer,
        // the later ones are held back (not sent after the failure came).
        let sent: Arc<Mutex<Vec<i64>>> = Arc::default();
        let out = run_with(&batch[..3], "{topic}", 2, far(), true, |m| {
            let sent = sent.clone();
            let id = m.id;
            async move {
                sent.lock().unwrap().push(id);
                Ok(async move {
                    if id == 1 {
                        Err(PublishFailure::new(
                            FailureKind::Permanent,
                            "too_large",
                            "x",
                        ))
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(Delivery::Stored)
                    }
                }
                .boxed())
            }
        })
        .await;
        assert_eq!(*sent.lock().unwrap(), vec![1, 2], "window 2: 3 waits");
        assert_eq!(out[0].as_ref().unwrap_err().reason, "too_large");
        assert!(
            out[1].is_ok(),
            "handed over before the failure: the broker's answer"
        );
        assert_eq!(out[2].as_ref().unwrap_err().reason, "held_back");
    }

    #[tokio::test]
    async fn nothing_is_sent_past_the_deadline() {
        let batch = vec![msg(1, "a"), msg(2, "a"), msg(3, "b")];
        let deadline = Instant::now() + Duration::from_millis(50);
        let out = run(&batch, "{topic}", 10, deadline, |m| {
            let id = m.id;
            async move {
                Ok(async move {
                    if id == 1 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(Delivery::Stored)
                }
                .boxed())
            }
        })
        .await;
        assert!(out[0].is_ok() && out[2].is_ok());
        let e = out[1].as_ref().unwrap_err();
        assert_eq!((e.kind, e.reason), (FailureKind::LeaseExpired, "lease"));
    }
}
