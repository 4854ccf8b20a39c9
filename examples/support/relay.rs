//! The measured relay process — an `outboxd run` child or Debezium's Kafka Connect worker —
//! shared by the benchmark examples.

use std::path::Path;
use std::process::Command;

use anyhow::bail;

pub enum Relay {
    Outboxd(std::process::Child),
    /// Kafka Connect's pid.
    Debezium(u32),
}

/// The connector properties every benchmark gives Debezium's PostgreSQL connector: the
/// database, its own slot and publication, the topic prefix, and Kafka Connect's JSON
/// converter without schemas; `extra` comes after (a later property wins).
#[allow(dead_code)]
pub fn debezium_properties(port: &str, db: &str, extra: &[&str]) -> Vec<String> {
    [
        format!("database.port={port}"),
        format!("database.dbname={db}"),
        format!("slot.name={db}_dbz"),
        format!("publication.name={db}_dbz"),
        format!("topic.prefix={db}"),
    ]
    .into_iter()
    .chain(
        [
            "key.converter=org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable=false",
            "value.converter=org.apache.kafka.connect.json.JsonConverter",
            "value.converter.schemas.enable=false",
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .map(String::from),
    )
    .collect()
}

impl Relay {
    /// Debezium in `dir` (`bench/debezium/debezium.sh start`) with these connector
    /// properties; returns once it streams.
    pub fn debezium(dir: &Path, brokers: &str, properties: &[String]) -> anyhow::Result<Relay> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/debezium/debezium.sh");
        let status = Command::new(script)
            .arg("start")
            .arg(dir)
            .arg(brokers)
            .args(properties)
            .status()?;
        if !status.success() {
            bail!("debezium.sh start failed");
        }
        let pid = std::fs::read_to_string(dir.join("connect.pid"))?;
        Ok(Relay::Debezium(pid.trim().parse()?))
    }

    pub fn pid(&self) -> u32 {
        match self {
            Relay::Outboxd(c) => c.id(),
            Relay::Debezium(pid) => *pid,
        }
    }

    // Not every benchmark pauses its relay.
    #[allow(dead_code)]
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status();
    }

    /// SIGTERM and wait (outboxd); `debezium.sh stop` (Debezium).
    pub fn stop(self, dir: &Path) {
        match self {
            Relay::Outboxd(mut c) => {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
                let _ = c.wait();
            }
            Relay::Debezium(_) => {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/debezium/debezium.sh");
                let _ = Command::new(script).arg("stop").arg(dir).status();
            }
        }
    }
}

/// `outboxd migrate --config <config>` with the relay binary at `relay`.
#[allow(dead_code)]
pub fn migrate(relay: &Path, config: &Path) -> anyhow::Result<()> {
    let status = Command::new(relay)
        .args(["migrate", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("outboxd migrate failed");
    }
    Ok(())
}
