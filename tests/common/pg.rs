//! PostgreSQL for the tests: the shared cluster, a database (and config file) per test,
//! clusters of a test's own.

use super::*;

/// The stack's addresses; a test run without them is a setup mistake, not a pass.
pub fn pg_admin_url() -> String {
    std::env::var("OUTBOXD_TEST_PG_URL").expect(
        "OUTBOXD_TEST_PG_URL is not set: run the tests with scripts/test.sh (it starts PostgreSQL and the broker)",
    )
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A fresh database with its own slot name and topic prefix.
#[derive(Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub dir: PathBuf,
}

impl TestDb {
    pub async fn new(prefix: &str) -> TestDb {
        let name = unique(prefix).to_lowercase();
        let admin = connect(&pg_admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        let url = db_url(&pg_admin_url(), &name);
        let dir = std::env::temp_dir().join(format!("outboxd-test-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        TestDb { name, url, dir }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// The slot is named after the database (slot names are cluster-wide).
    pub fn slot(&self) -> &str {
        &self.name
    }

    /// Topic template unique to this test: `<db>.{aggregatetype}`.
    pub fn topic(&self, aggregatetype: &str) -> String {
        format!("{}.{aggregatetype}", self.name)
    }

    /// Writes a config file for this database and the given brokers.
    pub fn config(&self, brokers: &str, extra: &str) -> PathBuf {
        let path = self.dir.join(format!("{}.toml", unique("cfg")));
        let text = format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"{slot}\"\n\n\
             [kafka]\nbrokers = \"{brokers}\"\ntopic_template = \"{db}.{{aggregatetype}}\"\n\
             delivery_timeout_ms = 5000\nshutdown_timeout_ms = 5000\n\n\
             [retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n\
             [http]\naddr = \"127.0.0.1:{port}\"\n\n{extra}\n",
            port = free_port(),
            url = self.url,
            slot = self.slot(),
            db = self.name,
        );
        // Keys of `extra` before its first table header belong at the top level.
        let (root, rest) =
            match (extra.starts_with('[').then_some(0)).or(extra.find("\n[").map(|i| i + 1)) {
                Some(i) => extra.split_at(i),
                None => (extra, ""),
            };
        let text = merge_sections(&format!("{root}\n{}", text.replace(extra, rest)));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Waits (30 s at most) until the relay's slot is active: it streams, and a change
    /// committed from now on is published.
    pub async fn streaming(&self) {
        let client = self.client().await;
        let slot = self.slot().to_string();
        super::eventually(Duration::from_secs(30), "the relay's slot is active", || {
            let (client, slot) = (&client, &slot);
            async move {
                client
                    .query_one(
                        "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1",
                        &[slot],
                    )
                    .await
                    .unwrap()
                    .get::<_, bool>(0)
            }
        })
        .await;
    }

    /// The slot's confirmed_flush_lsn as a number.
    pub async fn confirmed_lsn(&self) -> u64 {
        let c = self.client().await;
        let row = c
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot()],
            )
            .await
            .unwrap();
        parse_lsn(&row.get::<_, String>(0))
    }

    pub async fn current_lsn(&self) -> u64 {
        let c = self.client().await;
        let row = c
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap();
        parse_lsn(&row.get::<_, String>(0))
    }
}

/// Lets `extra` add or replace keys of sections the base config already has (TOML forbids
/// repeating a table header or a key).
fn merge_sections(text: &str) -> String {
    let mut order: Vec<String> = vec![String::new()];
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.to_string();
            if !sections.contains_key(&current) {
                order.push(current.clone());
            }
            sections.entry(current.clone()).or_default();
        } else if let Some((k, _)) = t.split_once('=') {
            let entries = sections.entry(current.clone()).or_default();
            let key = k.trim().to_string();
            entries.retain(|(existing, _)| *existing != key);
            entries.push((key, line.to_string()));
        }
    }
    let mut out = String::new();
    for s in order {
        if !s.is_empty() {
            out.push_str(&s);
            out.push('\n');
        }
        for (_, l) in sections.get(&s).map(Vec::as_slice).unwrap_or_default() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

pub fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

pub fn db_url(admin_url: &str, db: &str) -> String {
    let base = admin_url.rsplit_once('/').unwrap().0;
    format!("{base}/{db}")
}

pub async fn create_aggregates_table(client: &Client) {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS aggregates (id text PRIMARY KEY, seq bigint NOT NULL)",
        )
        .await
        .unwrap();
}

impl TestDb {
    /// This database reached through `port` on loopback (a [`proxy::Proxy`]).
    pub fn via_port(&self, port: u16) -> TestDb {
        let (head, db) = self.url.rsplit_once('/').unwrap();
        let (userhost, _) = head.rsplit_once(':').unwrap();
        TestDb {
            url: format!("{userhost}:{port}/{db}"),
            ..self.clone()
        }
    }

    /// The server's address, for a proxy in front of it.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        let head = self.url.rsplit_once('/').unwrap().0;
        let hostport = head.rsplit_once('@').unwrap().1;
        hostport.parse().unwrap()
    }
}

/// A PostgreSQL cluster of a test's own (`scripts/stack.sh pg-start`) with extra server
/// options and, if given, its own pg_hba.conf. Stopped and removed on drop.
pub struct PrivateCluster {
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
}

impl PrivateCluster {
    pub fn start(options: &str) -> PrivateCluster {
        Self::start_with(unique("cluster"), options, None)
    }

    pub fn start_with(name: String, options: &str, hba: Option<&str>) -> PrivateCluster {
        let dir = std::env::temp_dir().join(name);
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let mut cmd = Command::new(&script);
        cmd.args([
            "pg-start",
            dir.to_str().unwrap(),
            &port.to_string(),
            options,
        ]);
        if let Some(hba) = hba {
            cmd.env("OUTBOXD_PG_HBA", hba);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PrivateCluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            port,
        }
    }

    /// A test database of this cluster's own (its `postgres` database; `prefix` names the
    /// slot and topics).
    /// An immediate stop (crash recovery on start) and a start with the same options.
    pub fn crash_restart(&self) {
        let out = super::stack(&["pg-crash-restart", self.dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn db(&self, prefix: &str) -> TestDb {
        let name = unique(prefix).to_lowercase();
        let db = TestDb {
            dir: std::env::temp_dir().join(format!("outboxd-test-{name}-{}", self.port)),
            url: self.url.clone(),
            name,
        };
        std::fs::create_dir_all(&db.dir).unwrap();
        db
    }

    /// A superuser connection over the cluster's Unix socket (TCP may demand TLS).
    pub async fn local_client(&self, db: &str) -> Client {
        let url = format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.join("pg").display(),
            self.port
        );
        connect(&url).await
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let _ = Command::new(script)
            .args(["pg-stop", self.dir.to_str().unwrap()])
            .output();
    }
}
