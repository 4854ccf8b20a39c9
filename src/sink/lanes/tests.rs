//! The lanes' tests: order through refusals, batching limits, the concurrency gate.

use super::*;
use crate::poison::PoisonKind;
use std::sync::Mutex;

/// An API whose answers the test scripts: per batch, the class of each entry's refusal
/// (`None`: stored). It records every batch it was asked to send.
struct Scripted {
    answers: Mutex<VecDeque<Vec<Option<Class>>>>,
    sent: Mutex<Vec<Vec<u32>>>,
}

impl BatchApi for Scripted {
    type Entry = u32;
    async fn send_batch(
        &self,
        _dest: &str,
        entries: Vec<u32>,
    ) -> Result<Vec<Result<(), Refusal>>, Refusal> {
        let answer = self
            .answers
            .lock()
            .map(|mut a| a.pop_front().unwrap_or_default())
            .unwrap_or_default();
        let results = (0..entries.len())
            .map(|i| match answer.get(i).copied().flatten() {
                None => Ok(()),
                Some(class) => Err(Refusal {
                    class,
                    code: "x".into(),
                    detail: "scripted".into(),
                    alone: true,
                }),
            })
            .collect();
        if let Ok(mut sent) = self.sent.lock() {
            sent.push(entries);
        }
        Ok(results)
    }
}

fn rec(key: &str) -> Record {
    Record {
        key: Some(key.into()),
        ..item("q", None, 0).record.as_ref().clone()
    }
}

/// Records 0–3 of keys a, b, a, b on one lane, in one batch (unordered) or two (ordered);
/// the first batch's second entry refused with `class`. Returns what each delivery
/// resolved to and the batches the API was asked for.
async fn run(class: Class) -> (Vec<bool>, Vec<Vec<u32>>) {
    let api = Arc::new(Scripted {
        answers: Mutex::new([vec![None, Some(class)]].into()),
        sent: Mutex::new(Vec::new()),
    });
    let limits = Limits {
        max_entries: 10,
        max_bytes: 1000,
    };
    let lanes = Lanes::start(
        api.clone(),
        1,
        limits,
        Arc::new(Concurrency::new("test", 1)),
    );
    let mut deliveries = Vec::new();
    for (i, key) in ["a", "b", "a", "b"].iter().enumerate() {
        let sent = lanes.send("q".into(), true, &rec(key), i as u32, 1);
        deliveries.push(
            sent.map_err(|_| ())
                .unwrap_or_else(|()| panic!("queue full")),
        );
    }
    let mut ok = Vec::new();
    for d in deliveries {
        ok.push(d.await.is_ok());
    }
    let sent = api.sent.lock().map(|s| s.clone()).unwrap_or_default();
    (ok, sent)
}

#[tokio::test]
async fn a_refusal_not_about_the_record_stops_its_lane_before_a_later_record_of_its_key_is_sent() {
    let (ok, sent) = run(Class::Cluster).await;
    // One record per key in an ordered batch: [a0, b1], then [a2, b3] — never sent, as
    // b1 was refused: b3 stored before b1's resend would reorder key b.
    assert_eq!(sent, vec![vec![0, 1]]);
    assert_eq!(ok, vec![true, false, false, false]);
}

#[tokio::test]
async fn a_refusal_about_the_record_alone_leaves_its_lane_running() {
    let (ok, sent) = run(Class::Record(PoisonKind::TooLarge)).await;
    assert_eq!(sent, vec![vec![0, 1], vec![2, 3]]);
    assert_eq!(ok, vec![true, false, true, true]);
}

/// An endpoint that answers every request after 10 ms — with a refusal of the whole
/// request while `failing` — and counts the requests in flight against the limit.
struct Slow {
    concurrency: Arc<Concurrency>,
    failing: AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
    over_limit: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

impl BatchApi for Slow {
    type Entry = u32;
    async fn send_batch(
        &self,
        _dest: &str,
        entries: Vec<u32>,
    ) -> Result<Vec<Result<(), Refusal>>, Refusal> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        if now > self.concurrency.limit() {
            self.over_limit.fetch_add(1, Ordering::SeqCst);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(Refusal {
                class: Class::Cluster,
                code: String::new(),
                detail: "no answer within the request timeout".into(),
                alone: false,
            });
        }
        Ok(entries.iter().map(|_| Ok(())).collect())
    }
}

/// One session of 8 lanes sending 64 records of distinct keys, one per request; the
/// deliveries' outcomes.
async fn session(api: &Arc<Slow>) -> Vec<bool> {
    let limits = Limits {
        max_entries: 1,
        max_bytes: 1000,
    };
    let lanes = Lanes::start(api.clone(), 8, limits, api.concurrency.clone());
    let mut deliveries = Vec::new();
    for i in 0..64u32 {
        loop {
            match lanes.send("q".into(), true, &rec(&format!("k{i}")), i, 1) {
                Ok(d) => break deliveries.push(d),
                Err(SendError::QueueFull) => {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await
                }
                Err(SendError::Refused(r)) => panic!("refused: {}", r.detail),
            }
        }
    }
    let mut ok = Vec::new();
    for d in deliveries {
        ok.push(d.await.is_ok());
    }
    ok
}

/// Seen with moto under load: every session ended at its first timeout and the next sent
/// as many requests at once again. Now a session whose requests failed halves the limit
/// once (not once per failed request), the next session never has more requests in
/// flight than the limit, and answered requests grow it back.
#[tokio::test]
async fn after_a_session_whose_requests_failed_the_next_sends_half_as_many_at_once() {
    let api = Arc::new(Slow {
        concurrency: Arc::new(Concurrency::new("test", 8)),
        failing: AtomicBool::new(true),
        in_flight: Default::default(),
        over_limit: Default::default(),
        peak: Default::default(),
    });
    let first = session(&api).await;
    assert!(first.iter().all(|ok| !ok), "every request failed");
    assert!(
        api.peak.load(Ordering::SeqCst) > 4,
        "the first session used its lanes"
    );
    assert_eq!(api.concurrency.limit(), 4, "halved once for the session");

    api.failing.store(false, Ordering::SeqCst);
    api.peak.store(0, Ordering::SeqCst);
    api.over_limit.store(0, Ordering::SeqCst);
    let second = session(&api).await;
    assert_eq!(second.len(), 64);
    assert!(second.iter().all(|ok| *ok), "every record delivered");
    assert_eq!(
        api.over_limit.load(Ordering::SeqCst),
        0,
        "more requests in flight than the limit"
    );
    assert!(
        api.concurrency.limit() > 4,
        "answered requests grew the limit back"
    );
}

fn item(dest: &str, key: Option<u64>, bytes: usize) -> Item<u32> {
    let (done, _) = oneshot::channel();
    Item {
        dest: dest.into(),
        key,
        entry: 0,
        bytes,
        record: Box::new(Record {
            topic: dest.into(),
            exchange: None,
            detail_type: None,
            binary: false,
            key: None,
            value: None,
            headers: Vec::new(),
            partition: None,
            timestamp_ms: None,
        }),
        done,
    }
}

#[test]
fn a_batch_is_one_destination_within_limits_one_record_per_ordered_key_never_skipping() {
    let limits = Limits {
        max_entries: 3,
        max_bytes: 100,
    };
    let mut q: VecDeque<_> = [
        item("a", Some(1), 10),
        item("a", Some(2), 10),
        item("a", Some(1), 10), // the same key again: the batch ends before it
        item("a", Some(3), 10),
    ]
    .into();
    assert_eq!(take_batch(&mut q, limits).len(), 2);
    assert_eq!(q.len(), 2);
    let mut q: VecDeque<_> = [item("a", None, 10), item("b", None, 10)].into();
    assert_eq!(take_batch(&mut q, limits).len(), 1);
    let mut q: VecDeque<_> = (0..5).map(|_| item("a", None, 40)).collect();
    assert_eq!(take_batch(&mut q, limits).len(), 2, "bytes");
    let mut q: VecDeque<_> = (0..5).map(|_| item("a", None, 1)).collect();
    assert_eq!(take_batch(&mut q, limits).len(), 3, "entries");
    // One record over the byte limit still goes, alone.
    let mut q: VecDeque<_> = [item("a", None, 500), item("a", None, 1)].into();
    assert_eq!(take_batch(&mut q, limits).len(), 1);
}
