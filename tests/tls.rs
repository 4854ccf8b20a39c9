//! TLS to PostgreSQL with libpq's sslmode semantics, on the SQL connections and the
//! replication connection: a cluster of the test's own with `ssl=on`, a throwaway CA made by
//! `scripts/stack.sh tls-certs`, and a pg_hba.conf that accepts TCP only over TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

struct TlsCluster {
    cluster: PrivateCluster,
    certs: PathBuf,
}

fn tls_cluster() -> TlsCluster {
    let name = unique("tlscluster");
    let certs = std::env::temp_dir().join(format!("{name}-certs"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
    let out = Command::new(script)
        .args(["tls-certs", certs.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let options = format!(
        "-c ssl=on -c ssl_cert_file={0}/server.pem -c ssl_key_file={0}/server.key",
        certs.display()
    );
    let hba =
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n\
               hostnossl all all 0.0.0.0/0 reject\nhostnossl all all ::/0 reject";
    let cluster = PrivateCluster::start_with(name, &options, Some(hba));
    TlsCluster { cluster, certs }
}

impl TlsCluster {
    fn ca(&self) -> String {
        self.certs.join("ca.pem").display().to_string()
    }

    /// A database of its own, and the URL to reach it over TCP with `params`.
    async fn database(&self, prefix: &str, host: &str, params: &str) -> (TestDb, String) {
        let name = unique(prefix).to_lowercase();
        let admin = self.cluster.local_client("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        let url = format!(
            "postgres://postgres@{host}:{}/{name}?{params}",
            self.cluster.port
        );
        let dir = std::env::temp_dir().join(format!("outboxd-test-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        (
            TestDb {
                name,
                url: url.clone(),
                dir,
            },
            url,
        )
    }
}

/// The TLS state of the relay's sessions: (application_name, ssl) for each.
async fn sessions_tls(cluster: &PrivateCluster, db: &str) -> Vec<(String, bool)> {
    let c = cluster.local_client("postgres").await;
    c.query(
        "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.application_name LIKE 'outboxd%' ORDER BY 1",
        &[&db],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_relays_over_tls_in_logical_and_polling_mode() {
    let brokers = kafka_brokers();
    let tls = tls_cluster();
    let params = format!("sslmode=verify-full&sslrootcert={}", tls.ca());
    for mode in ["logical", "polling"] {
        let (db, _) = tls
            .database(&format!("tls_{mode}"), "localhost", &params)
            .await;
        let config = db.config(&brokers, &format!("mode = \"{mode}\"\n"));
        migrate(&config);
        let mut client = tls.cluster.local_client(&db.name).await;
        create_aggregates_table(&client).await;
        let relay = Relay::start(&config);
        let written = write_txn(&mut client, &[("order".into(), "a".into())], false)
            .await
            .unwrap();
        let mut written_all = written;
        written_all.extend(
            write_txn(&mut client, &[("order".into(), "a".into())], false)
                .await
                .unwrap(),
        );
        if mode == "polling" {
            fill_polling_order(
                &TestDb {
                    url: format!(
                        "host={} port={} user=postgres dbname={}",
                        tls.cluster.dir.join("pg").display(),
                        tls.cluster.port,
                        db.name
                    ),
                    ..db.clone()
                },
                &mut written_all,
            )
            .await;
        }
        let received = consume(
            &brokers,
            &[db.topic("order")],
            &ids(&written_all),
            Duration::from_secs(30),
            Duration::from_millis(200),
        );
        assert_exactly_written(&written_all, &received);
        let sessions = sessions_tls(&tls.cluster, &db.name).await;
        assert!(
            sessions.iter().all(|(_, ssl)| *ssl) && !sessions.is_empty(),
            "{mode}: every relay session must be TLS: {sessions:?}; log:\n{}",
            relay.log_text()
        );
        if mode == "logical" {
            assert!(
                sessions.iter().any(|(app, _)| app == "outboxd-replication"),
                "the replication connection is among them: {sessions:?}"
            );
        }
    }
}

/// `outboxd migrate` with `url` (and the slot named after the database): (exit code, stderr).
fn migrate_with(url: &str) -> (Option<i32>, String) {
    let db = url.split('?').next().unwrap().rsplit('/').next().unwrap();
    let out = outboxd(
        &["migrate"],
        &[
            ("OUTBOXD_POSTGRES_URL", url),
            ("OUTBOXD_SLOT", db),
            ("OUTBOXD_KAFKA_BROKERS", "127.0.0.1:9"),
        ],
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_or_host_name_exits_2_with_one_clear_line() {
    let tls = tls_cluster();
    let other_ca = tls.certs.join("other-ca.pem").display().to_string();
    let (_, url) = tls
        .database(
            "tls_wrongca",
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={other_ca}"),
        )
        .await;
    let (code, err) = migrate_with(&url);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("certificate") && err.contains("sslrootcert"),
        "{err}"
    );

    // The certificate names `localhost`, not 127.0.0.1: verify-full refuses, verify-ca (chain
    // only) accepts — so the host name is what failed.
    let (db, url) = tls
        .database(
            "tls_wronghost",
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={}", tls.ca()),
        )
        .await;
    let (code, err) = migrate_with(&url);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("certificate") && err.contains("verify-full"),
        "{err}"
    );
    let (code, err) = migrate_with(&db.url.replace("verify-full", "verify-ca"));
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_exits_2() {
    // The shared stack's cluster runs without TLS.
    let db = TestDb::new("tls_require").await;
    let (code, err) = migrate_with(&format!("{}?sslmode=require", db.url));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("does not accept TLS"), "{err}");
    // prefer falls back to plaintext, as libpq does.
    let (code, err) = migrate_with(&format!("{}?sslmode=prefer", db.url));
    assert_eq!(code, Some(0), "{err}");
}
