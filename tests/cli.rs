//! The binary's contract with operators: bad input gives one clear line and exit code 2;
//! an unreachable database is retried, not fatal; migrate is idempotent; secrets stay out of
//! the output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_value_exits_2_naming_the_key() {
    let dir = std::env::temp_dir().join(unique("badcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        "[postgres]\nurl = \"postgres://u@localhost/db\"\nheartbeat_interval_ms = 0\n[kafka]\nbrokers = \"k:9092\"\n",
    )
    .unwrap();
    let out = outboxd(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("postgres.heartbeat_interval_ms"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
}

/// The relay confirms its source on the broker's acknowledgements: a producer setting that
/// makes an acknowledgement weaker than "in every in-sync replica's log" (or lets retries
/// reorder a key) is refused, not quietly obeyed.
/// Bad `[cdc]` settings (and a CDC-only pipeline without tables): exit 2, one line, the key.
#[test]
fn bad_cdc_config_exits_2_with_one_line_naming_the_key() {
    let dir = std::env::temp_dir().join(unique("cdccfg"));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (section, key)) in [
        ("[postgres]\noutbox = false\n", "postgres.outbox"),
        ("[cdc]\ntables = [\"public\"]\n", "cdc.tables"),
        (
            "[cdc]\ntables = [\"public.t\"]\ncolumn_exclude = [\"public.t\"]\n",
            "cdc.column_exclude",
        ),
        (
            "[cdc]\ntables = [\"public.t\"]\nskipped_operations = [\"x\"]\n",
            "cdc.skipped_operations",
        ),
        (
            "[cdc]\ntables = [\"public.t\"]\ntoast = \"drop\"\n",
            "cdc.toast",
        ),
        (
            "[cdc]\ntables = [\"public.t\"]\ntopic_template = \"{prefix}.{type}\"\n",
            "cdc.topic_template",
        ),
        (
            "[cdc]\ntables = [\"public.t\"]\ndecimal_handling_mode = \"exact\"\n",
            "cdc.decimal_handling_mode",
        ),
        (
            "mode = \"polling\"\n[cdc]\ntables = [\"public.t\"]\n",
            "cdc.tables",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.join(format!("{i}.toml"));
        let text = format!(
            "{section}[postgres]\nurl = \"postgres://u@localhost/db\"\n[kafka]\nbrokers = \"k:9092\"\n"
        );
        // `section` may open [postgres] itself: merge the two.
        let text = text.replacen(
            "[postgres]\noutbox = false\n[postgres]\n",
            "[postgres]\noutbox = false\n",
            1,
        );
        std::fs::write(&path, text).unwrap();
        let out = outboxd(&["check-config", "--config", path.to_str().unwrap()], &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{key}: {err}");
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    }
}

#[test]
fn producer_properties_that_weaken_acknowledgements_exit_2() {
    let dir = std::env::temp_dir().join(unique("acks"));
    std::fs::create_dir_all(&dir).unwrap();
    for (prop, value) in [
        ("acks", "1"),
        ("acks", "0"),
        ("request.required.acks", "1"),
        ("enable.idempotence", "false"),
    ] {
        let path = dir.join(format!("{prop}-{value}.toml"));
        std::fs::write(
            &path,
            format!(
                "[postgres]\nurl = \"postgres://u@localhost/db\"\n[kafka]\nbrokers = \"k:9092\"\n\
                 [kafka.properties]\n\"{prop}\" = \"{value}\"\n"
            ),
        )
        .unwrap();
        let out = outboxd(&["check-config", "--config", path.to_str().unwrap()], &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{prop} = {value}: {err}");
        assert!(
            err.contains("kafka.properties") && err.contains(prop),
            "{prop}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    }
}

#[test]
fn unknown_config_key_exits_2_naming_it() {
    let dir = std::env::temp_dir().join(unique("badkey"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, "[kafka]\nbrokerz = \"k:9092\"\n").unwrap();
    let out = outboxd(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("brokerz"), "{}", stderr(&out));
}

#[test]
fn missing_postgres_url_exits_2_naming_key_and_env_var() {
    let out = outboxd(&["run"], &[("OUTBOXD_KAFKA_BROKERS", "k:9092")]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("postgres.url") && err.contains("OUTBOXD_POSTGRES_URL"),
        "{err}"
    );
}

#[test]
fn missing_config_file_exits_2_naming_the_file() {
    let out = outboxd(&["run", "--config", "/nonexistent/outboxd.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/outboxd.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn environment_alone_configures_outboxd_and_secrets_are_redacted() {
    let out = outboxd(
        &["check-config"],
        &[
            (
                "OUTBOXD_POSTGRES_URL",
                "postgres://app:TopSecret42@db:5432/app",
            ),
            ("OUTBOXD_KAFKA_BROKERS", "k1:9092,k2:9092"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("k1:9092,k2:9092"), "{text}");
    assert!(text.contains("postgres://app:***@db:5432/app"), "{text}");
    assert!(!text.contains("TopSecret42"), "password leaked: {text}");
}

#[tokio::test]
async fn wrong_password_exits_2_naming_the_problem_without_leaking_it() {
    let db = TestDb::new("wrongpw").await;
    let admin = db.client().await;
    let role = unique("app").to_lowercase();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'right-pw'"
        ))
        .await
        .unwrap();
    let base = pg_admin_url();
    let hostport = base.split('@').nth(1).unwrap().split('/').next().unwrap();
    let url = format!("postgres://{role}:Wr0ngSecret@{hostport}/{}", db.name);
    // A port of its own: the default (127.0.0.1:9465) is the one tests/http.rs checks the
    // relay binds without http.addr — run at the same time, one of the two could not listen.
    let addr = format!("127.0.0.1:{}", free_port());
    let out = outboxd(
        &["run"],
        &[
            ("OUTBOXD_POSTGRES_URL", url.as_str()),
            ("OUTBOXD_KAFKA_BROKERS", &kafka_brokers()),
            ("OUTBOXD_HTTP_ADDR", &addr),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(err.contains("fix:"), "{err}");
    assert!(!err.contains("Wr0ngSecret"), "password leaked: {err}");
}

#[tokio::test]
async fn role_without_replication_exits_2_naming_the_privilege() {
    let db = TestDb::new("norepl").await;
    let config = db.config(&kafka_brokers(), "");
    migrate(&config);
    let admin = db.client().await;
    let role = unique("app").to_lowercase();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw'; GRANT SELECT ON outbox TO {role}"
        ))
        .await
        .unwrap();
    let base = pg_admin_url();
    let hostport = base.split('@').nth(1).unwrap().split('/').next().unwrap();
    let url = format!("postgres://{role}:pw@{hostport}/{}", db.name);
    let out = outboxd(
        &["run", "--config", config.to_str().unwrap()],
        &[("OUTBOXD_POSTGRES_URL", url.as_str())],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("REPLICATION"), "{}", stderr(&out));
}

#[tokio::test]
async fn run_without_migrate_exits_2_pointing_to_migrate() {
    let db = TestDb::new("nomigrate").await;
    let config = db.config(&kafka_brokers(), "");
    let out = outboxd(&["run", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("outboxd migrate"), "{}", stderr(&out));
}

#[tokio::test]
async fn migrate_is_idempotent_and_reports_what_existed() {
    let db = TestDb::new("migrate").await;
    let config = db.config(&kafka_brokers(), "");
    let first = outboxd(&["migrate", "--config", config.to_str().unwrap()], &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(
        text.contains("table \"public\".\"outbox\": created"),
        "{text}"
    );
    assert!(text.contains("publication \"outboxd\": created"), "{text}");
    assert!(
        text.contains(&format!("replication slot '{}': created", db.slot())),
        "{text}"
    );
    let second = outboxd(&["migrate", "--config", config.to_str().unwrap()], &[]);
    assert!(second.status.success(), "{}", stderr(&second));
    let text = String::from_utf8_lossy(&second.stdout);
    assert_eq!(text.matches("already exists").count(), 6, "{text}");
    assert!(
        text.contains("dead-letter table")
            && text.contains("redrive log")
            && text.contains("function"),
        "{text}"
    );
    assert!(!text.contains("created"), "{text}");
}

#[tokio::test]
async fn migrate_quotes_configured_identifiers() {
    let db = TestDb::new("quoted").await;
    let config = db.config(
        &kafka_brokers(),
        "[postgres]\ntable = \"Weird Schema.Out\\\"box\"\npublication = \"My Pub\"\n",
    );
    let out = outboxd(&["migrate", "--config", config.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'My Pub' AND schemaname = 'Weird Schema' AND tablename = 'Out\"box'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
}

#[test]
fn unreachable_postgres_is_retried_with_backoff_and_logged() {
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let dir = std::env::temp_dir().join(unique("unreach"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[postgres]\nurl = \"postgres://u:Secr3t@127.0.0.1:{port}/db\"\n[kafka]\nbrokers = \"127.0.0.1:1\"\n[retry]\ninitial_backoff_ms = 50\nmax_backoff_ms = 200\n[http]\naddr = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut relay = Relay::start(&path);
    std::thread::sleep(Duration::from_secs(3));
    relay.assert_running();
    let status = relay.terminate(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    let log = relay.log_text();
    let attempts = log.matches("relay interrupted; retrying").count();
    assert!(
        attempts >= 3,
        "expected repeated logged retries, got {attempts}:\n{log}"
    );
    assert!(
        log.contains("Connection refused") || log.contains("connection refused"),
        "{log}"
    );
    assert!(!log.contains("Secr3t"), "password leaked into logs:\n{log}");
}

#[test]
fn multi_host_url_exits_2_naming_the_key() {
    // The leadership lock and the replication stream must be on one server.
    for url in [
        "postgres://u:secret@db1:5432,db2:5432/app?target_session_attrs=read-write",
        "host=db1,db2 user=u password=secret dbname=app",
    ] {
        let out = outboxd(
            &["check-config"],
            &[
                ("OUTBOXD_POSTGRES_URL", url),
                ("OUTBOXD_KAFKA_BROKERS", "k:9092"),
            ],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{url}: {err}");
        assert!(
            err.contains("postgres.url") && err.contains("several hosts"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
    }
}

#[test]
fn check_config_never_prints_a_password_however_it_is_written() {
    for (url, password) in [
        ("postgres://u:s%2Fe%3Fc%23r@h:5432/db", "s/e?c#r"),
        ("postgres://u@h/db?password=top%20secret%3F", "top secret?"),
        (
            "host=h user=u password='two words\\'quote' dbname=db",
            "two words'quote",
        ),
        ("host=h user=u password = hunter2x dbname=db", "hunter2x"),
    ] {
        let out = outboxd(
            &["check-config"],
            &[
                ("OUTBOXD_POSTGRES_URL", url),
                ("OUTBOXD_KAFKA_BROKERS", "k:9092"),
            ],
        );
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(out.status.success(), "{url}: {text}");
        for spelling in [password, url.split("password").nth(1).unwrap_or("\u{0}")] {
            let bare = spelling.trim_start_matches([' ', '=', '\'']);
            if bare.len() >= 6 && !bare.contains("dbname") {
                assert!(!text.contains(bare), "{url}: `{bare}` printed:\n{text}");
            }
        }
        assert!(!text.contains(password), "{url}: password printed:\n{text}");
    }
}

/// A mistyped secret property (`sasl.pasword`) is a property librdkafka does not know, and its
/// value is the secret: `check-config` and the exit-2 line name the key, never the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_secret_kafka_property_exits_2_and_its_value_is_never_printed() {
    let db = TestDb::new("typo").await;
    let config = db.config(
        &kafka_brokers(),
        "[kafka.properties]\n\"sasl.pasword\" = \"hunter2-typo\"\n",
    );
    migrate(&config);
    let check = outboxd(&["check-config", "--config", config.to_str().unwrap()], &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        stderr(&check)
    );
    assert!(
        !text.contains("hunter2"),
        "check-config printed the value:\n{text}"
    );
    let mut relay = Relay::start(&config);
    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("sasl.pasword"), "the key is named:\n{log}");
    assert!(!log.contains("hunter2"), "the value was printed:\n{log}");
}

/// An operator's problem is an error, not an outage: on a cluster whose replication slots are
/// all taken (SQLSTATE 53400), `migrate` exits 2 at once with the fix, where it used to call
/// the server "not reachable" and retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_with_every_replication_slot_taken_exits_2_with_the_fix() {
    let cluster = PrivateCluster::start("-c max_replication_slots=1");
    let db = cluster.db("slotsfull");
    db.client()
        .await
        .batch_execute("SELECT pg_create_logical_replication_slot('somebody_elses', 'pgoutput')")
        .await
        .unwrap();
    let config = db.config(&kafka_brokers(), "");
    let started = std::time::Instant::now();
    let out = outboxd(&["migrate", "--config", config.to_str().unwrap()], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("53400") && err.contains("max_replication_slots"),
        "{err}"
    );
    assert!(!err.contains("not reachable"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "retried for {:?}",
        started.elapsed()
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
