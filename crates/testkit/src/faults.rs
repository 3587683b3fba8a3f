//! Fault injection for soak tests: a tally of the faults a run injected, and the seed / duration
//! settings of a soak run. The cuttable, byte-counting proxy is [`crate::proxy::Proxy`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many faults of each kind a run injected (shared between the injector and the report).
#[derive(Debug, Clone, Default)]
pub struct FaultTally(Arc<Mutex<BTreeMap<&'static str, u64>>>);

impl FaultTally {
    /// An empty tally.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one fault of `kind`.
    pub fn record(&self, kind: &'static str) {
        *self.0.lock().expect("tally lock").entry(kind).or_insert(0) += 1;
    }

    /// Faults of `kind` so far.
    pub fn get(&self, kind: &str) -> u64 {
        self.0
            .lock()
            .expect("tally lock")
            .get(kind)
            .copied()
            .unwrap_or(0)
    }

    /// Every kind with its count, `kind=n` separated by spaces, in name order.
    pub fn summary(&self) -> String {
        self.0
            .lock()
            .expect("tally lock")
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The seed of a soak run: `SOAK_SEED` when set (to replay a failure), otherwise a random one.
pub fn soak_seed() -> u64 {
    match std::env::var("SOAK_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SOAK_SEED must be an unsigned integer, got {s:?}")),
        Err(_) => rand::random(),
    }
}

/// How long the fault phase of a soak runs: `SOAK_SECONDS`, otherwise `default_secs`.
pub fn soak_duration(default_secs: u64) -> Duration {
    let secs = std::env::var("SOAK_SECONDS")
        .ok()
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("SOAK_SECONDS must be a whole number, got {s:?}"))
        })
        .unwrap_or(default_secs);
    Duration::from_secs(secs.max(1))
}
