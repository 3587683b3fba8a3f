//! `wake::CommitNotifier` against the real PostgreSQL: commits signalled in a burst share one
//! wake-up, and every signal is followed by a notification sent after it.

use std::time::Duration;

use outbox::enqueue::NOTIFY_CHANNEL;
use outbox::wake::CommitNotifier;
use sqlx::postgres::PgListener;
use testkit::TestDb;

/// Notifications received within `wait`.
async fn received(listener: &mut PgListener, wait: Duration) -> usize {
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(Some(_))) = tokio::time::timeout_at(deadline, listener.try_recv()).await {
        n += 1;
    }
    n
}

#[tokio::test]
async fn a_burst_of_commits_shares_one_wake_up_and_the_last_is_never_missed() {
    let db = TestDb::new().await;
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(NOTIFY_CHANNEL).await.unwrap();
    let window = Duration::from_millis(200);
    let notifier = CommitNotifier::spawn(db.pool.clone(), window);

    // 1000 commits signalled at once: the first is notified at once, the rest share one more
    // notification after the window.
    for _ in 0..1000 {
        notifier.committed();
    }
    let n = received(&mut listener, window * 3).await;
    assert!(
        (1..=2).contains(&n),
        "1000 signals in a burst gave {n} notifications"
    );

    // A signal long after the burst: notified again, within the window and a round trip.
    notifier.committed();
    let n = received(&mut listener, window * 3).await;
    assert_eq!(n, 1, "a later commit is notified once");

    // A signal arriving while the task waits out its window is notified after the window.
    notifier.committed();
    tokio::time::sleep(window / 4).await;
    notifier.committed();
    let n = received(&mut listener, window * 3).await;
    assert_eq!(
        n, 2,
        "the signal within the window gets its own notification after it"
    );
}
