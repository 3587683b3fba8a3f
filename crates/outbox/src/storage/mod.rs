//! Where the outbox keeps its rows: the narrow [`store::RelayStore`] interface the relay engine
//! talks to, its PostgreSQL implementation [`pg::PgStore`], and the embedded migrations
//! ([`schema`]). Another database means another implementation of the trait, not a change to the
//! engine.

pub mod pg;
pub mod route_holds;
pub mod schema;
pub mod store;
