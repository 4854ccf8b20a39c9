//! Destinations. Kafka is the only one; the relay talks to it through [`kafka::KafkaSink`].
pub mod classify;
pub mod kafka;
pub mod positions;
