//! Sources: where events come from. `logical` reads a pgoutput replication slot.
pub mod decode;
pub mod logical;
pub mod pgoutput;
pub mod polling;
pub mod publication;
pub mod replication_conn;
pub mod walsender;
