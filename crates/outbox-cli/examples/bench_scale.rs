//! Drain rate of one backlog with one relay and with two relays sharing the outbox, in the same run
//! (issue 6). `cargo run --release -p outbox-cli --example bench_scale -- [backlog]` (default 100000).

use testkit::{TestDb, TestStream};

#[path = "support/mod.rs"]
mod support;
use support::{drain_with, quiet, write_backlog};

#[tokio::main]
async fn main() {
    let backlog: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("machine: {cores} cores; backlog {backlog}; relays in one process, each with its own NATS connection");
    let client = async_nats::connect(testkit::nats_url()).await.unwrap();
    let mut rates = Vec::new();
    for relays in [1usize, 2] {
        let db = TestDb::new().await;
        write_backlog(&db, backlog).await;
        let stream = TestStream::new();
        let rate = drain_with(&db, &stream, &client, backlog, None, relays).await;
        println!("{relays} relay(s): {rate:>8.0} events/s");
        rates.push(rate);
        drop(db);
        quiet().await;
    }
    println!("2 relays / 1 relay: {:.2}", rates[1] / rates[0]);
}
