//! Table CDC: row changes of the tables `[cdc]` captures, as Debezium-compatible change
//! events, from the same slot, decoder, window and checkpoint as the outbox — one more kind
//! of event, not a second program.
//!
//! The flow: `source::decode` recognises a Relation message of a captured table, the relay
//! reads its key and column types from the catalog ([`catalog::describe`]), and from then on
//! each Insert, Update, Delete and Truncate of that relation becomes events through
//! [`table::CapturedTable`] — values mapped by [`types`] and [`value`], wrapped by
//! [`envelope`]. Each event carries its topic, its key (the primary key as JSON) and a dedup
//! id (`schema.table/<lsn>/<op>`, the same on every replay), and goes through the same
//! route → sink → window → checkpoint as an outbox event: per-key order in commit order,
//! at-least-once or exactly-once, dead-lettering.
//!
//! The lesson carried over from the outbox: nothing is silent. A table that leaves the
//! publication, is recreated, or is filtered stops the relay before the slot passes its rows
//! ([`catalog`]); a value that cannot be mapped is dead-lettered with its reason, never
//! nulled; an unchanged TOASTed value is never a `null`.

pub mod catalog;
pub mod envelope;
pub mod select;
pub mod snapshot;
pub mod stream;
pub mod table;
pub mod transaction;
pub mod types;
pub mod value;
