//! RabbitMQ names a test made, removed when it ends.

use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

/// AMQP URL of the shared RabbitMQ (`TEST_AMQP_URL`, default the local guest account).
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Deletes `queues`, then `exchanges`, on the broker at `url`, best effort (a name that is gone
/// already is fine). Callable from `Drop`, inside or outside a Tokio runtime: it runs on a thread
/// of its own, and gives up after 5 s if the broker does not answer.
pub fn delete_names(url: &str, queues: Vec<String>, exchanges: Vec<String>) {
    let url = url.to_string();
    crate::block_on_own_thread(async move {
        let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await
        else {
            return;
        };
        let Ok(ch) = c.create_channel().await else {
            return;
        };
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in exchanges {
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = c.close(200, "test done".into()).await;
    });
}
