//! Thin binary: parse the command line, load the config, run; map errors to exit codes.
//!
//! Exit codes: 0 done (or stopped by SIGTERM/SIGINT), 1 unexpected failure, 2 bad config or a
//! problem only the operator can fix (credentials, privileges, wal_level, missing slot), 3 the
//! relay caught itself about to confirm past an undelivered event (`outboxd::ledger`: a bug).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use outboxd::cli::{Cli, Command};
use std::sync::Arc;

use outboxd::config::Config;
use outboxd::health::Health;
use outboxd::relay::Backoff;
use outboxd::replay::Selection;
use tokio::sync::watch;

/// glibc's allocator gives a thread that meets contention an arena of its own (up to 8 per
/// core), and what is freed into one arena serves only that arena. The relay's records are
/// allocated by a tokio worker and freed by another or by librdkafka's threads, so every
/// arena grows to the window's peak: in 1,000,000-event drains one arena held the anonymous
/// peak at 23–27 MiB against 29–38 MiB with glibc's default, at the same events/s and CPU
/// (BENCHMARKS.md, "Lean at every rate"; its per-thread caches keep the lock off the hot path).
/// `MALLOC_ARENA_MAX` in the environment still decides when set.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt sets one allocator parameter; it is called first thing in main,
        // before any other thread exists, and M_ARENA_MAX takes any positive value.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    one_malloc_arena();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outboxd: {e}");
            return ExitCode::from(2);
        }
    };
    outboxd::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outboxd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let log_format = cli.log_format;
    match runtime.block_on(dispatch(cli.command, config)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let permanent = e
                .downcast_ref::<outboxd::Error>()
                .map(|oe| !oe.is_transient())
                .unwrap_or(false);
            let line = match e.downcast_ref::<outboxd::Error>().and_then(|oe| oe.fix()) {
                Some(fix) => format!("{e:#}; fix: {fix}"),
                None => format!("{e:#}"),
            };
            // One line: JSON for log pipelines, plain text for people.
            if log_format == outboxd::cli::LogFormat::Json {
                tracing::error!("{line}");
            } else {
                eprintln!("outboxd: {line}");
            }
            let invariant = matches!(
                e.downcast_ref::<outboxd::Error>(),
                Some(outboxd::Error::Invariant(_))
            );
            ExitCode::from(match (invariant, permanent) {
                (true, _) => 3,
                (false, true) => 2,
                (false, false) => 1,
            })
        }
    }
}

async fn dispatch(command: Command, config: Config) -> anyhow::Result<u8> {
    match command {
        Command::CheckConfig => {
            println!("{config:#?}");
            Ok(0)
        }
        Command::Migrate => migrate(&config).await.map(|()| 0),
        Command::Run => run(config).await.map(|()| 0),
        Command::Status { json } => status(&config, json).await,
        Command::Schemas { action } => {
            use outboxd::cli::SchemasAction;
            let (dir, register) = match action {
                SchemasAction::Check { dir } => (dir, false),
                SchemasAction::Register { dir } => (dir, true),
            };
            Ok(
                outboxd::contract::registry::run(&config, dir.as_deref(), register)
                    .await
                    .context("schemas")?,
            )
        }
        Command::DeadLetters { action } => dead_letters(&config, action).await,
        Command::Replay { selection } => {
            let sel = Selection::from(selection);
            let (published, poison) = outboxd::replay::replay(&config, &sel)
                .await
                .context("replay")?;
            println!("replayed {published} events ({poison} not replayable: poison, see log)");
            Ok(0)
        }
        Command::Verify {
            table: Some(table),
            json,
            ..
        } => verify_table(&config, &table, json).await,
        Command::Snapshot {
            tables,
            filter,
            stop,
            pause,
            resume,
            wait,
        } => {
            use outboxd::cdc::snapshot::request::{self, Action};
            let action = match (stop, pause, resume) {
                (true, _, _) => Action::Stop,
                (_, true, _) => Action::Pause,
                (_, _, true) => Action::Resume,
                _ => Action::Execute,
            };
            let client = outboxd::pg::connect(&config.postgres.url, "outboxd-snapshot")
                .await
                .context("connecting to PostgreSQL")?;
            let id = request::send(&client, action, &tables, filter.as_deref())
                .await
                .context("snapshot")?;
            println!("signal {id} written; the relay acts on it when its stream reaches it (`outboxd status` shows the snapshots)");
            if !wait {
                return Ok(0);
            }
            let done = request::wait(&client, &config.postgres, &id, &tables)
                .await
                .context("following the snapshot")?;
            Ok(u8::from(!done))
        }
        Command::Verify {
            selection, json, ..
        } => {
            let sel = Selection::from(selection);
            let v = outboxd::replay::verify(&config, &sel)
                .await
                .context("verify")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).context("encoding")?);
            } else {
                println!(
                    "checked {} retained events in {} topic(s): {} missing from {}",
                    v.checked,
                    v.topics.len(),
                    v.missing.len(),
                    config.sink.as_str()
                );
                for id in &v.missing {
                    println!("missing {id}");
                }
            }
            Ok(u8::from(!v.missing.is_empty()))
        }
    }
}

async fn status(config: &Config, json: bool) -> anyhow::Result<u8> {
    let status = match outboxd::status::gather(config).await {
        Ok(s) => s,
        Err(e) => {
            // Exit code 2: cannot connect (or read the catalog).
            let line = match e.fix() {
                Some(fix) => format!("{e}; fix: {fix}"),
                None => e.to_string(),
            };
            if json {
                println!("{}", serde_json::json!({ "error": line }));
            } else {
                println!("outboxd status: cannot connect: {line}");
            }
            return Ok(2);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).context("encoding status")?
        );
    } else {
        println!("{status}");
    }
    Ok(status.exit_code())
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(&config.retry);
    let started = std::time::Instant::now();
    let report = loop {
        match outboxd::migrate::migrate(config).await {
            Ok(r) => break r,
            Err(e) if e.is_transient() && started.elapsed() < Duration::from_secs(60) => {
                let d = backoff.next_delay();
                // A server that answered is not "unreachable": say what it said.
                let what = if e.has_sqlstate() {
                    "migrate: PostgreSQL refused for now; retrying"
                } else {
                    "migrate: PostgreSQL not reachable yet; retrying"
                };
                tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "{what}");
                tokio::time::sleep(d).await;
            }
            Err(e) => return Err(e).context("migrate"),
        }
    };
    for (what, outcome) in report.items {
        let verb = match outcome {
            outboxd::migrate::Outcome::Created => "created",
            outboxd::migrate::Outcome::Existed => "already exists",
        };
        println!("{what}: {verb}");
    }
    Ok(())
}

/// `outboxd dead-letters list|show|redrive`.
async fn dead_letters(
    config: &Config,
    action: outboxd::cli::DeadLettersAction,
) -> anyhow::Result<u8> {
    use outboxd::cli::DeadLettersAction;
    use outboxd::dead_letter::redrive::{self, Filter};
    match action {
        DeadLettersAction::List { filter } => {
            let letters = redrive::list(config, &filter.into())
                .await
                .context("dead-letters list")?;
            for d in &letters {
                println!("{}", d.line());
            }
            println!("{} dead letters", letters.len());
            Ok(0)
        }
        DeadLettersAction::Show { id } => {
            let filter = Filter {
                id: Some(id.clone()),
                ..Filter::default()
            };
            let letters = redrive::list(config, &filter)
                .await
                .context("dead-letters show")?;
            if letters.is_empty() {
                println!("no dead letter of event {id}");
                return Ok(1);
            }
            for d in &letters {
                println!("{}", d.details());
            }
            Ok(0)
        }
        DeadLettersAction::Redrive { filter, all } => {
            if filter.is_empty() && !all {
                eprintln!("outboxd: dead-letters redrive needs a filter (--reason, --type, --id, --since, --until) or --all");
                return Ok(2);
            }
            let done = redrive::redrive(config, &filter.into())
                .await
                .context("dead-letters redrive")?;
            println!(
                "{} redriven, {} already redriven before, {} refused again",
                done.redriven,
                done.skipped,
                done.refused.len()
            );
            Ok(u8::from(!done.refused.is_empty()))
        }
    }
}

async fn verify_table(config: &Config, table: &str, json: bool) -> anyhow::Result<u8> {
    let v = outboxd::table_verify::verify_table(config, table)
        .await
        .context("verify --table")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).context("encoding")?);
    } else {
        println!(
            "table {}: {} rows; topic {}: {} keys; {} differ",
            v.table,
            v.rows,
            v.topic,
            v.topic_keys,
            v.differ.len()
        );
        for d in &v.differ {
            println!("{} {}", d.key, d.problem);
        }
    }
    Ok(u8::from(!v.differ.is_empty()))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = outboxd::metrics::install()
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    let health = Arc::new(Health::new(
        config.mode.as_str(),
        config.sink.as_str(),
        &config.postgres.slot,
        config.postgres.max_slot_lag_bytes,
        config.retry.unready_after,
    ));
    let listener = outboxd::http::bind(config.http.addr).await?;
    tracing::info!(addr = %config.http.addr, "serving /metrics /healthz /readyz /status");
    tokio::spawn(outboxd::http::serve(listener, health.clone(), metrics));
    tokio::spawn(outboxd::monitor::run(
        config.clone(),
        health.clone(),
        stop_rx.clone(),
    ));
    let grace = config.kafka.shutdown_timeout + Duration::from_secs(15);
    let done = health.clone();
    let signals = tokio::spawn(async move {
        tokio::select! {
            _ = wait_for_signal() => {}
            _ = done.finished() => {}
        }
        tracing::info!("shutdown requested; finishing in-flight deliveries");
        let _ = stop_tx.send(true);
    });
    let mut relay = tokio::spawn(outboxd::relay::run(config, stop_rx, health));
    let result = tokio::select! {
        r = &mut relay => r,
        _ = async {
            // Once a signal arrived, the relay gets a bounded grace period.
            let _ = (&mut { signals }).await;
            tokio::time::sleep(grace).await;
        } => {
            // Acknowledged events may not be confirmed: say so with a non-zero status.
            anyhow::bail!("the relay did not stop within the grace period (kafka.shutdown_timeout_ms + 15 s); events acknowledged since the last confirmation will be published again after a restart");
        }
    };
    result.context("relay task panicked")?.context("relay")
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
