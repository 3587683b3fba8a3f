//! The `outbox` binary's pieces, shared with services that run the relay in-process: relay and
//! broker flags, the metrics/health HTTP endpoints, logging set-up, and the operator commands.

pub mod args;
pub mod broker;
pub mod databases;
pub mod fleet;
pub mod http;
pub mod logging;
pub mod ops_cmd;
pub mod relay_cmd;
pub mod topology_cmd;
