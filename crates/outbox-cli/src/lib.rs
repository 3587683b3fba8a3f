//! The `outbox` binary's operator commands. The pieces it shares with services (flags, broker
//! selection, metrics/health, logging, the relay runner) live in `outbox-runtime`; they are
//! re-exported here under their former paths.

pub use outbox_runtime::{args, broker, http, logging, relay_cmd};

pub mod console_cmd;
pub mod consumer_cmd;
pub mod databases;
pub mod fleet;
pub mod ops_cmd;
pub mod topology_cmd;
