//! A webhook receiver for measuring delivery: answers every request 200 at once, checks its
//! signature, and counts requests and events (loopback only, bounded in time).

use crate::measure::{r2, Report};
use crate::pusher::hmac_hex;
use memchr::memmem;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct SinkArgs {
    /// Listen on 127.0.0.1 at this port.
    #[arg(long, default_value_t = 9100)]
    pub listen_port: u16,
    /// The app secret the signatures are checked with.
    #[arg(long, default_value = "app-secret")]
    pub secret: String,
    /// Seconds to listen, then report and exit.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    events: AtomicU64,
    bad_signatures: AtomicU64,
    /// When the first and the last request arrived.
    span: Mutex<Option<(Instant, Instant)>>,
}

pub fn run(a: &SinkArgs) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, a.listen_port)).unwrap_or_else(|e| {
        eprintln!(
            "loadtest: cannot listen on 127.0.0.1:{}: {e}",
            a.listen_port
        );
        std::process::exit(2);
    });
    let counts = Arc::new(Counts::default());
    let secret = Arc::new(a.secret.clone());
    let for_accept = counts.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (counts, secret) = (for_accept.clone(), secret.clone());
            std::thread::spawn(move || serve(stream, &counts, &secret));
        }
    });
    println!("webhook-sink listening on 127.0.0.1:{}", a.listen_port);
    std::thread::sleep(Duration::from_secs(a.duration));
    let requests = counts.requests.load(Ordering::Relaxed);
    let events = counts.events.load(Ordering::Relaxed);
    let span = counts.span.lock().map(|s| *s).unwrap_or(None);
    let secs = span.map_or(0.0, |(first, last)| {
        last.duration_since(first).as_secs_f64()
    });
    let mut r = Report::new("webhook-sink", &format!("127.0.0.1:{}", a.listen_port));
    r.add("requests", requests);
    r.add("events", events);
    r.add(
        "bad_signatures",
        counts.bad_signatures.load(Ordering::Relaxed),
    );
    r.add("first_to_last_secs", r2(secs));
    r.add(
        "events_per_sec",
        r2(if secs > 0.0 {
            events as f64 / secs
        } else {
            0.0
        }),
    );
    r.add(
        "requests_per_sec",
        r2(if secs > 0.0 {
            requests as f64 / secs
        } else {
            0.0
        }),
    );
    r.print();
    std::process::exit(0);
}

/// One kept-alive connection: requests parsed by their Content-Length.
fn serve(mut stream: TcpStream, counts: &Counts, secret: &str) {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some((head_end, length)) = request_at(&buf) {
            if buf.len() < head_end + length {
                break;
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let body = &buf[head_end..head_end + length];
            let signature = header(&head, "x-pusher-signature");
            let expected = hmac_hex(secret, &String::from_utf8_lossy(body));
            if signature != Some(expected.as_str()) {
                counts.bad_signatures.fetch_add(1, Ordering::Relaxed);
            }
            let events = memmem::find_iter(body, b"{\"name\":").count() as u64;
            counts.events.fetch_add(events, Ordering::Relaxed);
            counts.requests.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut span) = counts.span.lock() {
                let now = Instant::now();
                *span = Some(span.map_or((now, now), |(first, _)| (first, now)));
            }
            buf.drain(..head_end + length);
            let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
            if stream.write_all(ok).is_err() {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The end of a complete request head at the start of `buf`, and its body length.
fn request_at(buf: &[u8]) -> Option<(usize, usize)> {
    let head_end = memmem::find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length = header(&head, "content-length")?.parse().ok()?;
    Some((head_end, length))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        (n.trim() == name).then(|| v.trim())
    })
}
