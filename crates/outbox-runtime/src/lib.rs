//! What every binary built on the outbox shares (the `outbox` relay, the inventory service, the
//! read-model consumer): relay and broker flags ([`args`]), broker selection ([`broker`]), the
//! metrics/health HTTP endpoints ([`http`]), logging set-up ([`logging`]), and the in-process relay
//! runner with its shutdown signal ([`relay_cmd`]), and a consumer service's flags and runner
//! ([`consumer`]).

pub mod args;
pub mod broker;
pub mod consumer;
pub mod http;
pub mod logging;
pub mod relay_cmd;
