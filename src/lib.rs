//! outboxd: a transactional-outbox relay and CDC daemon from PostgreSQL to Kafka, RabbitMQ or
//! NATS JetStream.
//!
//! Data flows one way: [`source`] decodes committed outbox rows (and, through [`cdc`], the
//! row changes of captured tables) in commit order, [`route`]
//! turns each into a Kafka record, [`sink`] publishes with many deliveries in flight, and
//! [`checkpoint`] finds the highest source position whose events Kafka all acknowledged —
//! the only position [`relay`] ever confirms. Module docs explain the operational decisions
//! where the code makes them; the README states the guarantees.

pub mod calendar;
pub mod cdc;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod contract;
pub mod dead_letter;
pub mod error;
pub mod event;
pub mod failpoint;
pub mod health;
pub mod http;
pub mod ledger;
pub mod lessons;
pub mod logging;
pub mod lsn;
pub mod metrics;
pub mod migrate;
pub mod monitor;
pub mod pg;
pub mod poison;
pub mod record;
pub mod relay;
pub mod replay;
pub mod route;
pub mod secret;
pub mod sink;
pub mod source;
pub mod status;
pub mod table_verify;
pub mod topic;
pub mod trace;
pub mod transaction;
pub mod window;

pub use error::{Error, Result};
