//! Sources: where events come from. `logical` reads a pgoutput replication slot (`decode`,
//! `pgoutput`, `publication`, `replication_conn`, `walsender`); `polling` reads the table
//! gap-free by (transaction id, sequence), and `retention` deletes what it published. The
//! relay's view of both is `crate::relay`'s `Source` interface.
pub mod decode;
pub mod logical;
pub mod message;
pub mod pgoutput;
pub mod polling;
pub mod publication;
pub mod replication_conn;
pub mod retention;
pub mod walsender;
