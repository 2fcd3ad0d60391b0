//! A server's drain as its clients see it: N connections (each has read
//! `pusher:connection_established`), then SIGTERM to the server (its PID given by the caller who
//! started it), and when each connection's close arrived after the signal: a close frame (its
//! code) or a TCP close without one. The spread of those times is the spread of the clients'
//! reconnects to the remaining nodes.
//!
//! Close frames are timed by the kernel's receive timestamp (SO_TIMESTAMPNS): on loopback that is
//! when the server sent them, so this process reading thousands of closes late does not blur the
//! spread. A TCP close without a frame carries no timestamp and is timed when it is read.
//! Also reported: when the server exited (a pidfd), and what one new connection tried 500 ms
//! after the signal got (refused, an HTTP status, or upgraded and then closed), which is what a
//! client told to reconnect gets if it comes back to the same server.

use crate::measure::{r2, Report};
use crate::net::{now_ns, Phase, Pool, WsEvent};
use crate::{pusher, Target};
use clap::Args;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

#[derive(Args, Clone, Debug)]
pub struct DrainArgs {
    /// `--server-pid` is required: the process that gets the SIGTERM.
    #[command(flatten)]
    pub target: Target,
    /// WebSocket connections open when the signal is sent (at most 19,000: one process's files).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Seconds to wait after the signal for every close and the server's exit.
    #[arg(long, default_value_t = 30)]
    pub wait_secs: u64,
    /// Also write every close to this file, one line each: ms after the signal, the close code
    /// (`tcp` without a close frame), `kernel` or `read` (how it was timed).
    #[arg(long)]
    pub times_file: Option<std::path::PathBuf>,
}

/// Sockets this process may hold (the limit is 20,000 open files; a server process here holds
/// fewer than that too).
const MOST: usize = 19_000;

/// Where a connection is, in `Ws::step`.
const OPENING: u8 = 0;
const ESTABLISHED: u8 = 1;

/// One new connection is tried this long after the signal, as a client told to reconnect would
/// if it came back to this server: what it gets shows whether the server still accepts.
const PROBE_AFTER_MS: u64 = 500;

/// Connects to `addr`, asks for an upgrade and reads for up to 2 s: what came back.
fn try_new_connection(addr: SocketAddrV4, request: &[u8]) -> String {
    let timeout = Duration::from_secs(2);
    let mut s = match TcpStream::connect_timeout(&addr.into(), timeout) {
        Ok(s) => s,
        Err(e) => return format!("connect failed: {}", e.kind()),
    };
    let until = Instant::now() + timeout;
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let mut said = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut upgraded = false;
    loop {
        // Status line, then frames as they complete.
        if !upgraded {
            if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let status = head.lines().next().unwrap_or("").to_owned();
                if !status.starts_with("HTTP/1.1 101") {
                    return status;
                }
                said.push("101".to_owned());
                upgraded = true;
                buf.drain(..end + 4);
            }
        }
        while let Some((opcode, payload, used)) = upgraded.then(|| frame(&buf)).flatten() {
            if opcode == 0x8 {
                let code = match payload.as_slice() {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]).to_string(),
                    _ => "without a code".into(),
                };
                said.push(format!("closed {code}"));
                return said.join(", ");
            }
            if pusher::is_event(&payload, b"pusher:connection_established") {
                said.push("connection_established".into());
            } else if pusher::is_event(&payload, b"pusher:error") {
                said.push("pusher:error".into());
            }
            buf.drain(..used);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            let waited = if upgraded {
                "still open"
            } else {
                "connected, no answer"
            };
            said.push(format!("{waited} after 2 s"));
            return said.join(", ");
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                let closed = if upgraded {
                    "TCP close"
                } else {
                    "connected, TCP close"
                };
                said.push(closed.into());
                return said.join(", ");
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(e) => {
                let how = if upgraded { "" } else { "connected, " };
                said.push(format!("{how}{}", e.kind()));
                return said.join(", ");
            }
        }
    }
}

/// The first complete (unmasked) frame of `buf`: opcode, payload, bytes used.
fn frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (len, header) = match *buf.get(1)? & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(header..header + len)?.to_vec();
    Some((buf[0] & 0x0f, payload, header + len))
}

/// One connection's close.
struct Close {
    /// ns after the signal (negative: before it).
    at: i64,
    /// The close frame's code (0: a frame without one); None: a TCP close without a frame.
    code: Option<u16>,
    /// Timed by the kernel's receive timestamp, not by the read.
    stamped: bool,
    /// When this process read it, ns after the signal.
    read_at: i64,
}

fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A descriptor that becomes readable when `pid` exits (None where pidfd_open is missing).
fn pidfd(pid: u32) -> Option<i32> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    (fd >= 0).then_some(fd as i32)
}

/// Whether the process behind `fd` has exited, waiting up to `timeout_ms`.
fn exited(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one live pollfd.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

/// Whether `pid` holds a socket listening on TCP `port` (so the signal goes to the server under
/// test, not to a shell or launcher in front of it).
fn listens_on(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next());
            let listening = f.get(3) == Some(&"0A");
            if listening && local_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port) {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|link| inodes.iter().any(|i| link.as_os_str() == i.as_str()))
}

/// The value at quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[i64], q: f64) -> i64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The most values of sorted `v` within any window of `width` (a half-open interval).
fn densest(v: &[i64], width: i64) -> usize {
    let mut start = 0;
    let mut most = 0;
    for end in 0..v.len() {
        while v[end] - v[start] >= width {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

fn ms(ns: i64) -> serde_json::Value {
    r2(ns as f64 / 1e6)
}

pub fn drain(a: &DrainArgs) {
    let t = &a.target;
    let Some(pid) = t.server_pid else {
        eprintln!("loadtest drain: --server-pid is required (the server to send SIGTERM to)");
        std::process::exit(2);
    };
    if a.connections > MOST {
        eprintln!(
            "loadtest drain: at most {MOST} connections (one process may have 20,000 open files)"
        );
        std::process::exit(2);
    }
    if !listens_on(pid, t.port) {
        eprintln!(
            "loadtest drain: process {pid} does not listen on port {}: not signalling it",
            t.port
        );
        std::process::exit(2);
    }
    let app = t.app();
    let request = pusher::upgrade_request(&t.addr().to_string(), &app.key);
    let mut pool = Pool::new(t.addr(), request.clone(), t.source_base);
    pool.stamp_receives();

    // Open every connection; each counts once it has read connection_established.
    let started = now_ns();
    let deadline = started + t.timeout().as_nanos() as u64;
    let (mut asked, mut established, mut failed) = (0usize, 0usize, 0usize);
    while established + failed < a.connections && now_ns() < deadline {
        while asked < a.connections && pool.opening < t.concurrency {
            asked += 1;
            if pool.open_ws(0, now_ns()).is_none() {
                failed += 1;
            }
        }
        pool.poll(
            5,
            &mut |ws, _, event| match event {
                WsEvent::Text(text) => {
                    if ws.step == OPENING
                        && pusher::is_event(text, b"pusher:connection_established")
                    {
                        ws.step = ESTABLISHED;
                        established += 1;
                    }
                }
                WsEvent::Closed => {
                    if ws.step == ESTABLISHED {
                        established -= 1;
                    }
                    failed += 1;
                }
            },
            &mut |_, _, _| {},
        );
    }
    let open_ns = now_ns() - started;
    // Sockets still opening are left out: only established connections are timed.
    let unfinished: Vec<usize> = (0..pool.ws.len())
        .filter(|&i| pool.ws[i].phase != Phase::Closed && pool.ws[i].step == OPENING)
        .collect();
    for i in &unfinished {
        pool.close_ws(*i);
    }
    eprintln!(
        "loadtest drain: {established} connections established in {:.2} s, sending SIGTERM to {pid}",
        open_ns as f64 / 1e9
    );

    let exit_fd = pidfd(pid);
    let signal_rt = realtime_ns();
    let signal_mono = now_ns();
    // SAFETY: sends a signal to the process the caller started and named.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
        eprintln!(
            "loadtest drain: cannot signal {pid}: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    let mut closes: Vec<Close> = Vec::with_capacity(established);
    let mut error_events = 0usize;
    let mut exit_at: Option<i64> = None;
    let mut probe: Option<std::thread::JoinHandle<String>> = None;
    let end = signal_mono + a.wait_secs * 1_000_000_000;
    loop {
        let now = now_ns();
        let open = established - closes.len();
        let gone = exit_at.is_some() || exit_fd.is_none();
        let probe_due = signal_mono + PROBE_AFTER_MS * 1_000_000;
        if probe.is_none() && now >= probe_due {
            let (addr, request) = (t.addr(), request.clone());
            probe = Some(std::thread::spawn(move || {
                try_new_connection(addr, &request)
            }));
        }
        if now >= end || (open == 0 && gone && probe.is_some()) {
            break;
        }
        if open == 0 {
            // Only the exit (or the probe's time) is left to wait for.
            let next = if probe.is_none() { probe_due } else { end };
            let left = (next.saturating_sub(now) / 1_000_000).clamp(1, 100) as i32;
            match exit_fd {
                Some(fd) if exit_at.is_none() => {
                    if exited(fd, left) {
                        exit_at = Some((now_ns() - signal_mono) as i64);
                    }
                }
                _ => std::thread::sleep(Duration::from_millis(left as u64)),
            }
            continue;
        }
        pool.poll(
            10,
            &mut |ws, _, event| match event {
                WsEvent::Text(text) => {
                    if pusher::is_event(text, b"pusher:error") {
                        error_events += 1;
                    }
                }
                WsEvent::Closed => {
                    if ws.step != ESTABLISHED {
                        return;
                    }
                    let read_at = (now_ns() - signal_mono) as i64;
                    let code = ws.close_code;
                    // A frame's bytes carry the kernel's stamp; an EOF read has none.
                    let stamped = code.is_some() && ws.rx_stamp_ns > 0;
                    let at = match stamped {
                        true => ws.rx_stamp_ns as i64 - signal_rt as i64,
                        false => read_at,
                    };
                    closes.push(Close {
                        at,
                        code,
                        stamped,
                        read_at,
                    });
                }
            },
            &mut |_, _, _| {},
        );
        if exit_at.is_none() && exit_fd.is_some_and(|fd| exited(fd, 0)) {
            exit_at = Some((now_ns() - signal_mono) as i64);
        }
    }
    if let Some(fd) = exit_fd {
        // SAFETY: closes the pidfd this function opened.
        unsafe { libc::close(fd) };
    }

    if let Some(path) = &a.times_file {
        closes.sort_by_key(|c| c.at);
        let lines: String = closes
            .iter()
            .map(|c| {
                let code = c.code.map_or("tcp".into(), |code| code.to_string());
                let how = if c.stamped { "kernel" } else { "read" };
                format!("{:.3} {code} {how}\n", c.at as f64 / 1e6)
            })
            .collect();
        if let Err(e) = std::fs::write(path, lines) {
            eprintln!("loadtest drain: cannot write {}: {e}", path.display());
        }
    }
    let mut times: Vec<i64> = closes.iter().map(|c| c.at).collect();
    times.sort_unstable();
    let mut other_codes = BTreeMap::new();
    for code in closes.iter().filter_map(|c| c.code).filter(|&c| c != 4200) {
        *other_codes.entry(code.to_string()).or_insert(0usize) += 1;
    }
    let count = |f: &dyn Fn(&Close) -> bool| closes.iter().filter(|c| f(c)).count();
    let mut r = Report::new("drain", &t.addr().to_string());
    r.add("connections", a.connections);
    r.add("established", established);
    r.add("connect_failed", a.connections - established);
    r.add("open_all_s", r2(open_ns as f64 / 1e9));
    r.add("closed_4200", count(&|c| c.code == Some(4200)));
    r.add(
        "closed_other_code",
        count(&|c| c.code.is_some_and(|code| code != 4200)),
    );
    r.add("other_codes", serde_json::json!(other_codes));
    r.add("closed_tcp_only", count(&|c| c.code.is_none()));
    r.add("not_closed", established - closes.len());
    r.add("pusher_error_events", error_events);
    if !times.is_empty() {
        r.add("first_ms", ms(times[0]));
        r.add("p50_ms", ms(quantile(&times, 0.5)));
        r.add("p90_ms", ms(quantile(&times, 0.9)));
        r.add("p99_ms", ms(quantile(&times, 0.99)));
        r.add("last_ms", ms(times[times.len() - 1]));
        r.add("max_closes_in_10ms", densest(&times, 10_000_000));
        r.add("max_closes_in_100ms", densest(&times, 100_000_000));
    }
    r.add("kernel_stamped", count(&|c| c.stamped));
    if let Some(last_read) = closes.iter().map(|c| c.read_at).max() {
        r.add("last_read_ms", ms(last_read));
    }
    r.add("server_exit_ms", exit_at.map(ms));
    let probe = match probe.map(|p| p.join()) {
        Some(Ok(said)) => said,
        Some(Err(_)) => "probe failed".into(),
        None => "not sent".into(),
    };
    r.add(&format!("new_connection_at_{PROBE_AFTER_MS}ms"), probe);
    r.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[7], 0.5), 7);
    }

    #[test]
    fn frames_are_read_once_complete() {
        let close = [0x88, 2, 0x10, 0x68, 0x81];
        assert_eq!(frame(&close), Some((0x8, vec![0x10, 0x68], 4)));
        assert_eq!(frame(&close[..3]), None);
        let mut long = vec![0x81, 126, 0, 200];
        long.extend([b'x'; 200]);
        assert_eq!(
            frame(&long).map(|(_, p, used)| (p.len(), used)),
            Some((200, 204))
        );
    }

    #[test]
    fn windows_count_the_densest_stretch() {
        assert_eq!(densest(&[0, 5, 9, 10, 11, 30], 10), 4);
        assert_eq!(densest(&[0, 0, 0, 100], 10), 3);
        assert_eq!(densest(&[0, 10, 20], 10), 1);
        assert_eq!(densest(&[], 10), 0);
    }
}
