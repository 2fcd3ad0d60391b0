//! A webhook receiver for measuring delivery: answers every request 200 at once, checks its
//! signature, and counts requests and events (loopback only, bounded in time).

use crate::measure::{r2, Report};
use crate::pusher::hmac_hex;
use memchr::memmem;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
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
    // One thread with epoll and non-blocking sockets: a server without a bound on its requests
    // in flight (soketi) opens tens of thousands of connections at once.
    use std::collections::HashMap;
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, a.listen_port)).unwrap_or_else(|e| {
        eprintln!(
            "loadtest: cannot listen on 127.0.0.1:{}: {e}",
            a.listen_port
        );
        std::process::exit(2);
    });
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    // SAFETY: re-listen on our own listening socket to raise its backlog.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let counts = Counts::default();
    let secret = a.secret.clone();
    // SAFETY: a new epoll descriptor owned here.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epfd >= 0, "epoll_create1 failed");
    let add = |fd: i32, events: u32| {
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        // SAFETY: fd is open; ev is valid.
        unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    };
    let lfd = listener.as_raw_fd();
    add(lfd, libc::EPOLLIN as u32);
    struct Conn {
        stream: TcpStream,
        buf: Vec<u8>,
        out: Vec<u8>,
    }
    let mut conns: HashMap<i32, Conn> = HashMap::new();
    let (mut accepted, mut max_open) = (0u64, 0usize);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut chunk = vec![0u8; 64 * 1024];
    println!("webhook-sink listening on 127.0.0.1:{}", a.listen_port);
    let deadline = Instant::now() + Duration::from_secs(a.duration);
    while Instant::now() < deadline {
        // SAFETY: events is a valid buffer of its length.
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, 50) };
        for ev in events.iter().take(n.max(0) as usize) {
            let fd = ev.u64 as i32;
            if fd == lfd {
                while let Ok((stream, _)) = listener.accept() {
                    let _ = stream.set_nonblocking(true);
                    let _ = stream.set_nodelay(true);
                    let cfd = stream.as_raw_fd();
                    add(cfd, (libc::EPOLLIN | libc::EPOLLRDHUP) as u32);
                    let conn = Conn {
                        stream,
                        buf: Vec::new(),
                        out: Vec::new(),
                    };
                    conns.insert(cfd, conn);
                    accepted += 1;
                    max_open = max_open.max(conns.len());
                }
                continue;
            }
            let mut close = false;
            if let Some(c) = conns.get_mut(&fd) {
                loop {
                    match c.stream.read(&mut chunk) {
                        Ok(0) => {
                            close = true;
                            break;
                        }
                        Ok(k) => c.buf.extend_from_slice(&chunk[..k]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            close = true;
                            break;
                        }
                    }
                }
                let answered = serve_buffer(&mut c.buf, &counts, &secret);
                for _ in 0..answered {
                    c.out
                        .extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                }
                while !c.out.is_empty() && !close {
                    match c.stream.write(&c.out) {
                        Ok(k) => {
                            c.out.drain(..k);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            // Loopback and 38-byte answers: wait briefly rather than track EPOLLOUT.
                            std::thread::sleep(Duration::from_micros(50));
                        }
                        Err(_) => close = true,
                    }
                }
            }
            if close {
                if let Some(c) = conns.remove(&fd) {
                    // SAFETY: fd is still open (owned by c.stream, closed on drop below).
                    unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
                    drop(c);
                }
            }
        }
    }
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
    r.add("connections_accepted", accepted);
    r.add("connections_max_open", max_open as u64);
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

/// Handles the complete requests at the start of `buf` (parsed by their Content-Length, as the
/// connection's bytes): checks signatures, counts, drains them; returns how many to answer.
fn serve_buffer(buf: &mut Vec<u8>, counts: &Counts, secret: &str) -> usize {
    let mut answered = 0;
    while let Some((head_end, length)) = request_at(buf) {
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
        // `"name":` anywhere (a key: inside a string it would be escaped); sockudo's event
        // objects do not keep "name" as their first key.
        let events = memmem::find_iter(body, b"\"name\":").count() as u64;
        counts.events.fetch_add(events, Ordering::Relaxed);
        counts.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut span) = counts.span.lock() {
            let now = Instant::now();
            *span = Some(span.map_or((now, now), |(first, _)| (first, now)));
        }
        buf.drain(..head_end + length);
        answered += 1;
    }
    answered
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
