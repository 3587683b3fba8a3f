//! The relay: the [`engine`] loop (lease, claim, publish, settle, dead-letter, clean up), the
//! [`retry`] policy it applies to failed deliveries, and the LISTEN/NOTIFY [`wake`]-ups that start
//! a batch as soon as a transaction commits.

pub mod engine;
pub mod retry;
pub mod routes;
pub mod wake;

pub use engine::*;
