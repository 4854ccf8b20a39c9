//! A TCP proxy of the tests' own, for network faults on loopback: `black_hole` stops moving
//! bytes in both directions without closing anything — what a silently failed network path
//! looks like to both peers (the kernel buffers fill, nothing arrives, no RST, no FIN).
//! Lifting it lets the held bytes flow again, as TCP retransmission would. `hold_existing`
//! black-holes only the connections open now: a client that opens a new one gets through
//! (what a half-dead path to one peer, or a client stuck on one connection, looks like).
//! `set_latency` delays every byte by a fixed time each way, as a distant broker does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Proxy {
    pub port: u16,
    held: Arc<Held>,
    stop: Arc<AtomicBool>,
}

/// What is held: every connection, or those accepted before a generation.
#[derive(Default)]
struct Held {
    all: AtomicBool,
    /// Connections numbered below this are held.
    below: AtomicU64,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// One-way delay of every byte, in microseconds.
    latency_us: AtomicU64,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        Self::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), target)
    }

    /// Forwards every connection `listener` accepts to `target`.
    pub fn start_on(listener: TcpListener, target: SocketAddr) -> Proxy {
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Held::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (held.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let n = h.accepted.fetch_add(1, Ordering::SeqCst);
                for (from, to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    let (h, st) = (h.clone(), st.clone());
                    std::thread::spawn(move || pump(from, to, n, &h, &st));
                }
            }
        });
        Proxy { port, held, stop }
    }

    /// Stops (true) or resumes (false) moving bytes, on every connection.
    pub fn black_hole(&self, on: bool) {
        self.held.all.store(on, Ordering::SeqCst);
    }

    /// Delays every byte by `one_way` in each direction (on connections open and new).
    pub fn set_latency(&self, one_way: Duration) {
        self.held
            .latency_us
            .store(one_way.as_micros() as u64, Ordering::SeqCst);
    }

    /// Stops moving bytes on the connections open now, for good; new ones flow.
    pub fn hold_existing(&self) {
        let n = self.held.accepted.load(Ordering::SeqCst);
        self.held.below.store(n, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, to: TcpStream, n: u64, held: &Arc<Held>, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    // The writer sends each chunk when its time has come: latency without a bandwidth cap.
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        let mut to = to;
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        if held.all.load(Ordering::SeqCst) || n < held.below.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let delay = Duration::from_micros(held.latency_us.load(Ordering::SeqCst));
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    drop(tx);
    let _ = writer.join();
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
