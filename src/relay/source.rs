//! The relay's view of a source: what the one session loop (`relay::session`) needs from
//! the logical replication slot ([`super::logical::LogicalSource`]) and from polling
//! ([`super::polling::PollingSource`]).
//!
//! A source yields events and *boundaries*: a boundary is a position that is safe to store
//! once every event yielded before it was acknowledged. Positions are `u64`s ordered as the
//! source reads: an LSN for the slot; for polling, an ordinal the source maps back to the
//! (transaction id, sequence) cursor it stands for. The loop counts acknowledgements
//! (`crate::checkpoint`), and hands the highest safe boundary back to [`Source::confirm`].
//!
//! Cancel safety: [`Source::recv`] runs inside `select!` and may be dropped at any await;
//! it only ever *receives*. What must not be interrupted — decoding a message, a catalog
//! look-up it needs — is [`Source::decode`], run to completion in the loop's handler.

use std::time::Duration;

use tokio_postgres::Client;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::event::Event;
use crate::sink::positions::{Position, Witness};

/// What a source hands the loop.
pub(super) enum Item {
    /// An event to route and publish.
    Event(Event),
    /// A table-less message that is not the outbox JSON: dead-lettered as it is.
    Malformed {
        id: Option<String>,
        reason: String,
        raw: Vec<u8>,
    },
    /// Everything yielded before is done once acknowledged: `position` may be stored.
    Boundary(u64),
}

pub(super) trait Source {
    /// What `recv` receives, before decoding.
    type Message;

    /// Where the source stands, for the start line.
    fn describe(&self) -> String;

    /// The SQL session the dead-letter table is written through.
    fn client(&self) -> &Client;

    /// The position the source resumed from (nothing at or below it is yielded).
    fn confirmed(&self) -> u64;

    /// Boundaries above this position wait until [`Source::tick`] raises the checkpoint's
    /// limit (logical: the last position the outbox was verified in the publication).
    fn limit(&self) -> u64;

    /// The commit position of the transaction the last event belongs to (exactly-once skips
    /// events of transactions below the position read back from Kafka).
    fn commit_position(&self) -> u64;

    /// The position of the event just yielded, for the delivery ledger (`crate::ledger`):
    /// confirming any position above it requires the event to be settled.
    fn event_position(&self) -> u64;

    /// How often at most a confirmation is stored (a status message to the walsender is
    /// cheap; an UPDATE of the cursor row is not).
    fn confirm_every(&self) -> Duration;

    /// The next message; waits while there is none. Cancel-safe.
    async fn recv(&mut self) -> Result<Self::Message>;

    /// The next message if one is already waiting, without waiting or starting any I/O:
    /// lets the loop take several per wake-up (`relay::session`). `None` by default.
    fn try_recv(&mut self) -> Option<Result<Self::Message>> {
        None
    }

    /// What a message means for the loop, if anything.
    async fn decode(&mut self, msg: Self::Message) -> Result<Option<Item>>;

    /// Stores `position` as the source's confirmed position.
    async fn confirm(&mut self, position: u64) -> Result<()>;

    /// Once a second: the checks that may stop the relay, and the checkpoint's limit.
    /// `quiet`: nothing was confirmed for `postgres.heartbeat_interval_ms` and nothing is in
    /// flight.
    async fn tick(&mut self, checkpoint: &mut Checkpoint, quiet: bool) -> Result<()>;

    /// Exactly-once: the record of `position` written inside the Kafka transaction, with the
    /// witness of this source's history (`sink::positions`).
    fn position(&self, position: u64) -> Result<(Position, Option<Witness>)>;

    /// Exactly-once: the position read back is proven to belong to this source's history
    /// (until then nothing is confirmed).
    fn verified(&self) -> bool {
        true
    }

    /// Stopping: one last chance to raise the checkpoint's limit.
    async fn last_check(&mut self, checkpoint: &mut Checkpoint);

    /// Stopping: stores `safe` and makes sure it was stored (else `Error::Shutdown`).
    async fn finish(self, safe: u64) -> Result<()>;
}
