//! `outboxd dead-letters list|show|redrive`: the way back for a dead letter once its cause is
//! fixed (the consumer that could not read it is deployed, the topic that refused it exists).
//!
//! Dead letters are read where the relay wrote them: the dead-letter topic (`kafka.dlq_topic`,
//! Kafka only) and the table `<schema>.outboxd_dead_letter`. `redrive` republishes each one
//! to the destination it was meant for (`outboxd.dlq.topic`, the table's `topic`) with its id,
//! key, headers and payload — without the `outboxd.dlq.*` headers — waits for the broker's
//! acknowledgement, and only then records it in `<schema>.outboxd_redriven`: running it twice
//! redrives nothing twice, and a dead letter refused again is said with why and left to a
//! later run. It needs a filter or `--all`: a redrive of everything is a decision, not a
//! default.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use rdkafka::message::Headers as _;
use rdkafka::Message;
use tokio_postgres::Client;

use crate::config::{quote_ident, Config, Encoding, SinkKind};
use crate::error::{Error, Result};
use crate::record::Record;
use crate::sink::broker::Broker;
use crate::sink::{SendError, Sink};

/// Which dead letters a command covers.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    /// The event's `type` header.
    pub event_type: Option<String>,
    pub id: Option<String>,
    /// Timestamp or interval back from now (as `replay`'s), on when it was dead-lettered.
    pub since: Option<String>,
    pub until: Option<String>,
}

/// One dead letter, wherever it is.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `table` or `topic:<name>`.
    pub source: String,
    /// The table's `seq`, or `partition/offset`.
    pub position: String,
    pub event_id: Option<String>,
    pub reason: String,
    pub error: String,
    /// Where it was meant to go.
    pub topic: String,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    /// The event's own headers (the `outboxd.dlq.*` ones taken off).
    pub headers: Vec<(String, Vec<u8>)>,
    /// When it was dead-lettered, ms since the epoch.
    pub at_ms: i64,
    /// When it was redriven, if it was.
    pub redriven_at: Option<String>,
}

impl DeadLetter {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// One line for `list`.
    pub fn line(&self) -> String {
        let mut out = format!(
            "{} {}  {}  {}  {}  -> {}",
            self.source,
            self.position,
            crate::event::rfc3339_ms(self.at_ms),
            self.reason,
            self.event_id.as_deref().unwrap_or("-"),
            self.topic,
        );
        if let Some(t) = self.header("type") {
            out.push_str(&format!("  type={t}"));
        }
        if let Some(at) = &self.redriven_at {
            out.push_str(&format!("  [redriven {at}]"));
        }
        let error: String = self.error.chars().take(160).collect();
        out.push_str(&format!("\n    {error}"));
        out
    }

    /// Everything, for `show`.
    pub fn details(&self) -> String {
        let mut out = format!(
            "source:      {} {}\nevent id:    {}\nreason:      {}\nerror:       {}\ndestination: {}\nkey:         {}\nwhen:        {}\nredriven:    {}\nheaders:\n",
            self.source,
            self.position,
            self.event_id.as_deref().unwrap_or("-"),
            self.reason,
            self.error,
            self.topic,
            self.key.as_deref().unwrap_or("-"),
            crate::event::rfc3339_ms(self.at_ms),
            self.redriven_at.as_deref().unwrap_or("no"),
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("  {k}: {}\n", String::from_utf8_lossy(v)));
        }
        let payload = match &self.payload {
            None => "null".to_string(),
            Some(p) => match std::str::from_utf8(p) {
                Ok(text) => text.to_string(),
                Err(_) => format!(
                    "(base64) {}",
                    base64::engine::general_purpose::STANDARD.encode(p)
                ),
            },
        };
        out.push_str(&format!("payload:\n{payload}\n"));
        out
    }

    fn matches(&self, f: &Filter, bounds: (i64, i64)) -> bool {
        f.reason.as_ref().is_none_or(|r| *r == self.reason)
            && f.id
                .as_ref()
                .is_none_or(|id| Some(id) == self.event_id.as_ref())
            && f.event_type
                .as_ref()
                .is_none_or(|t| Some(t) == self.header("type").as_ref())
            && self.at_ms >= bounds.0
            && self.at_ms < bounds.1
    }

    fn record(&self) -> Record {
        Record {
            topic: self.topic.clone(),
            exchange: None,
            detail_type: None,
            binary: false,
            key: self.key.clone(),
            value: self.payload.clone(),
            headers: self.headers.clone(),
            partition: None,
            timestamp_ms: None,
        }
    }
}

/// `[since, until)` in ms since the epoch (PostgreSQL reads the forms).
async fn bounds(client: &Client, f: &Filter) -> Result<(i64, i64)> {
    let ms = |text: Option<String>, default: i64| async move {
        match text {
            None => Ok(default),
            Some(t) => {
                let at = crate::replay::time_bound(client, &t).await?;
                let row = client
                    .query_one(
                        "SELECT (extract(epoch FROM $1::text::timestamptz) * 1000)::int8",
                        &[&at],
                    )
                    .await
                    .map_err(|e| Error::pg("reading a time bound", e))?;
                Ok::<i64, Error>(row.get(0))
            }
        }
    };
    Ok((
        ms(f.since.clone(), i64::MIN).await?,
        ms(f.until.clone(), i64::MAX).await?,
    ))
}

/// A record's headers.
type HeaderList = Vec<(String, Vec<u8>)>;

/// Headers of a dead letter: the event's own, and the `outboxd.dlq.*` ones apart.
fn split_headers(all: HeaderList) -> (HeaderList, HashMap<String, String>) {
    let mut dlq = HashMap::new();
    let mut own = Vec::new();
    for (k, v) in all {
        match k.strip_prefix("outboxd.dlq.") {
            Some(name) => {
                dlq.insert(name.to_string(), String::from_utf8_lossy(&v).into_owned());
            }
            None => own.push((k, v)),
        }
    }
    (own, dlq)
}

/// The dead-letter topic's records (Kafka only; none when it does not exist).
async fn from_topic(cfg: &Config) -> Result<Vec<DeadLetter>> {
    if cfg.sink != SinkKind::Kafka {
        return Ok(Vec::new());
    }
    let kafka = cfg.kafka.clone();
    let topic = kafka.dlq_topic.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        crate::replay::read_topics(&kafka, std::slice::from_ref(&topic), |m| {
            let headers: Vec<(String, Vec<u8>)> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            let (own, dlq) = split_headers(headers);
            let event_id = own
                .iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
            out.push(DeadLetter {
                source: format!("topic:{topic}"),
                position: format!("{}/{}", m.partition(), m.offset()),
                event_id,
                reason: dlq.get("reason").cloned().unwrap_or_default(),
                error: dlq.get("error").cloned().unwrap_or_default(),
                topic: dlq.get("topic").cloned().unwrap_or_default(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: m.payload().map(<[u8]>::to_vec),
                headers: own,
                at_ms: m.timestamp().to_millis().unwrap_or(0),
                redriven_at: None,
            });
        })?;
        Ok(out)
    })
    .await
    .map_err(|e| Error::Kafka(format!("reading the dead-letter topic: {e}")))?
}

/// The dead-letter table's rows (none when `outboxd migrate` has not made it).
async fn from_table(client: &Client, schema: &str) -> Result<Vec<DeadLetter>> {
    if !crate::migrate::relation_exists(client, schema, "outboxd_dead_letter").await? {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT seq, event_id, topic, key, payload, coalesce(headers::text, '{{}}'), reason, coalesce(error, ''), \
                (extract(epoch FROM dead_lettered_at) * 1000)::int8 \
           FROM {}.outboxd_dead_letter ORDER BY seq",
        quote_ident(schema)
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| Error::pg("reading the dead-letter table", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let headers: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(r.get::<_, &str>(5)).unwrap_or_default();
            let headers = headers
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_json::Value::String(s) => s.into_bytes(),
                        other => other.to_string().into_bytes(),
                    };
                    (k, v)
                })
                .collect();
            let (own, _) = split_headers(headers);
            DeadLetter {
                source: "table".into(),
                position: r.get::<_, i64>(0).to_string(),
                event_id: r.get(1),
                topic: r.get(2),
                key: r.get(3),
                payload: r.get(4),
                headers: own,
                reason: r.get(6),
                error: r.get(7),
                at_ms: r.get(8),
                redriven_at: None,
            }
        })
        .collect())
}

/// (source, position) → when, from the redrive log (empty when it does not exist yet).
async fn redriven(client: &Client, schema: &str) -> Result<HashMap<(String, String), String>> {
    if !crate::migrate::relation_exists(client, schema, "outboxd_redriven").await? {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT source, position, redriven_at::text FROM {}.outboxd_redriven",
        quote_ident(schema)
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| Error::pg("reading the redrive log", e))?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Every dead letter matching `f`, the topic's first, each with when it was redriven.
pub async fn list(cfg: &Config, f: &Filter) -> Result<Vec<DeadLetter>> {
    let client = crate::pg::connect(&cfg.postgres.url, "outboxd-dead-letters").await?;
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .map_err(|e| Error::pg("setting the session time zone", e))?;
    let bounds = bounds(&client, f).await?;
    let done = redriven(&client, &cfg.postgres.schema).await?;
    let mut all = from_topic(cfg).await?;
    all.extend(from_table(&client, &cfg.postgres.schema).await?);
    Ok(all
        .into_iter()
        .filter(|d| d.matches(f, bounds))
        .map(|mut d| {
            d.redriven_at = done.get(&(d.source.clone(), d.position.clone())).cloned();
            d
        })
        .collect())
}

/// What a redrive did.
#[derive(Debug, Default)]
pub struct Redrive {
    pub redriven: usize,
    /// Already redriven by an earlier run.
    pub skipped: usize,
    /// (event id, why) of those the destination refused again.
    pub refused: Vec<(String, String)>,
}

/// Republishes every matching dead letter not redriven yet (see the module doc).
pub async fn redrive(cfg: &Config, f: &Filter) -> Result<Redrive> {
    if cfg.sink != SinkKind::Kafka {
        return Err(Error::setup(
            format!("redrive republishes to Kafka, and [sink] kind is `{}`", cfg.sink.as_str()),
            "list and show work on the dead-letter table with any sink; redrive other sinks' dead letters with their own tools",
        ));
    }
    if cfg.schemas.encoding != Encoding::Json {
        return Err(Error::setup(
            "a dead letter carries the event's JSON, and schemas.encoding writes the registry's wire format",
            "redrive with schemas.encoding = \"json\" only where the destination's consumers read JSON",
        ));
    }
    let letters = list(cfg, f).await?;
    let client = crate::pg::connect(&cfg.postgres.url, "outboxd-redrive").await?;
    let schema = quote_ident(&cfg.postgres.schema);
    client
        .batch_execute(&crate::migrate::REDRIVEN_DDL.replace("{schema}", &schema))
        .await
        .map_err(|e| Error::pg("creating the redrive log", e))?;
    let insert = format!(
        "INSERT INTO {schema}.outboxd_redriven (source, position, event_id, topic) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING"
    );
    let (mut sink, _) = Broker::connect(cfg, None).await?;
    sink.replaying();
    let mut out = Redrive::default();
    for d in letters {
        if d.redriven_at.is_some() {
            out.skipped += 1;
            continue;
        }
        let id = d.event_id.clone().unwrap_or_else(|| "?".into());
        match send(&mut sink, &d.record()).await {
            Ok(()) => {
                client
                    .execute(&insert, &[&d.source, &d.position, &d.event_id, &d.topic])
                    .await
                    .map_err(|e| Error::pg("recording a redrive", e))?;
                println!("redriven {id} ({} {}) -> {}", d.source, d.position, d.topic);
                out.redriven += 1;
            }
            Err(why) => {
                println!(
                    "REFUSED AGAIN {id} ({} {}) -> {}: {why}",
                    d.source, d.position, d.topic
                );
                out.refused.push((id, why));
            }
        }
    }
    Ok(out)
}

/// Sends one record and waits for its acknowledgement; why not, as text.
async fn send(sink: &mut Broker, record: &Record) -> std::result::Result<(), String> {
    let limit = sink.delivery_timeout() + Duration::from_secs(5);
    let sent = async {
        sink.ensure_topic(record).await.map_err(|e| e.to_string())?;
        let delivery = loop {
            match sink.send(record).await {
                Ok(d) => break d,
                Err(SendError::QueueFull) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(SendError::Refused(r)) => return Err(r.detail),
            }
        };
        delivery
            .await
            .map(|_| ())
            .map_err(|failed| failed.refusal.detail)
    };
    tokio::time::timeout(limit, sent)
        .await
        .unwrap_or_else(|_| Err(format!("no acknowledgement within {} s", limit.as_secs())))
}
