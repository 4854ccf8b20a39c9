//! Debezium's PostgreSQL connector on Kafka Connect (`bench/debezium/debezium.sh`), run
//! beside outboxd by the comparison tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// A Kafka Connect worker running Debezium's connector. Stopped on drop.
pub struct Debezium {
    dir: PathBuf,
}

impl Debezium {
    /// Debezium on `db` with its own `slot` and publication, routing to
    /// `<prefix>${routedByValue}`; `extra` connector properties are appended.
    pub fn start(
        db: &TestDb,
        slot: &str,
        publication: &str,
        prefix: &str,
        extra: &[&str],
    ) -> Debezium {
        let dir = std::env::temp_dir().join(unique("debezium"));
        let port = db.socket_addr().port().to_string();
        let mut args = vec![
            "start".to_string(),
            dir.display().to_string(),
            kafka_brokers(),
            format!("database.port={port}"),
            format!("database.dbname={}", db.name),
            format!("slot.name={slot}"),
            format!("publication.name={publication}"),
            format!("transforms.outbox.route.topic.replacement={prefix}${{routedByValue}}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/debezium/debezium.sh");
        let status = Command::new(script).args(&args).status().unwrap();
        assert!(status.success(), "debezium.sh start failed");
        Debezium { dir }
    }

    pub fn stop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/debezium/debezium.sh");
        let _ = Command::new(script)
            .args(["stop", self.dir.to_str().unwrap()])
            .status();
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        self.stop();
    }
}
