//! The relay under test: `outboxd` runs to completion, or as a process killed on drop.

use super::*;

/// The `http.addr` written into a config file by [`TestDb::config`].
pub fn http_addr(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text.lines().find(|l| l.starts_with("addr = ")).unwrap();
    line.trim_start_matches("addr = ")
        .trim_matches('"')
        .to_string()
}

/// GET `path` from a relay's HTTP listener: (status code, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_outboxd")
}

/// Runs `outboxd <args>` to completion with a clean environment.
pub fn outboxd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOXD_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

pub fn migrate(config: &Path) {
    let out = outboxd(&["migrate", "--config", config.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `outboxd run` process. Killed on drop.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
    /// The test provokes a ledger violation on purpose (`Drop` does not fail on it).
    pub expect_ledger_violation: bool,
}

impl Relay {
    pub fn start(config: &Path) -> Relay {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Relay {
        let log = config.with_extension(format!("{}.log", unique("relay")));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--config", config.to_str().unwrap()]);
        for (k, _) in std::env::vars() {
            if k.starts_with("OUTBOXD_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("OUTBOXD_LOG", "info,outboxd=debug");
        // Every relay under test checks each confirmation against its delivery ledger
        // (outboxd::ledger); `Drop` fails the test on a violation.
        cmd.env("OUTBOXD_CHECK_LEDGER", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        Relay {
            child,
            log,
            expect_ledger_violation: false,
        }
    }

    /// SIGKILL: no chance to confirm anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.wait_exit(within)
    }

    /// Waits for the relay to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay still running after {within:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("relay exited with {status}; log:\n{}", self.log_text());
        }
    }
}

/// What a relay's log says when its delivery ledger caught a confirmation that would pass an
/// undelivered event (`outboxd::ledger`).
pub const LEDGER_VIOLATION: &str = "delivery ledger violation";

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self.log_text();
        if std::thread::panicking() {
            // The test failed: what the relay said is the first thing to read.
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of the relay log {} ---", self.log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        } else if !self.expect_ledger_violation {
            if let Some(line) = log.lines().find(|l| l.contains(LEDGER_VIOLATION)) {
                panic!("the relay's delivery ledger fired: {line}");
            }
        }
    }
}

/// Readiness is about the configured broker (it was "Kafka is not reachable" for ever with
/// another sink): `/readyz` answers 200 "leader, publishing" within 20 s and `/status` says
/// the broker is reachable.
pub async fn assert_ready_with_the_broker_reachable(config: &Path) {
    let addr = http_addr(config);
    super::eventually(
        Duration::from_secs(20),
        "/readyz 200 while publishing",
        || {
            let addr = addr.clone();
            async move {
                http_get(&addr, "/readyz")
                    .is_some_and(|(code, body)| code == 200 && body.contains("leader, publishing"))
            }
        },
    )
    .await;
    let (_, status) = http_get(&addr, "/status").unwrap();
    assert!(status.contains("\"broker_reachable\":true"), "{status}");
}

/// Runs a relay (`start`), SIGKILLs it 2 s in and again 2 s after its successor started;
/// returns the third, running.
pub async fn relay_sigkilled_twice(start: impl Fn() -> Relay) -> Relay {
    let mut relay = start();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        relay.kill();
        relay = start();
    }
    relay
}
