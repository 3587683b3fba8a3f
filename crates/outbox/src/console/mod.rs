//! What the browser console (`outbox console`, crate `outbox-console`) shows and does, as plain
//! queries and actions over the outbox and consumer tables: no HTTP here.
//!
//! Every query is written to answer in milliseconds on a large outbox (a million pending and a
//! million published rows, a hundred thousand dead letters): counts beyond [`estimate::EXACT_UP_TO`]
//! are the planner's estimates and say so ([`estimate::Count::Estimate`]), backlog breakdowns of a
//! large table come from a sample and say so, listings walk an index with a limit. Actions have a
//! dry run ([`actions::preview_dead`]) and apply to the set it showed
//! ([`actions::apply_dead`]): what was dead-lettered after the dry run is left out, and what left
//! meanwhile is reported as the difference.

pub mod actions;
pub mod dead_groups;
pub mod estimate;
pub mod event;
pub mod overview;
pub mod parked;
