//! A real HTTP/1.1 server that receives webhooks: it records each request and answers with
//! the statuses a test scripts (or drops the connection), then 200.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the receiver answers one request.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    Status(u16),
    /// Close the connection without an answer.
    Drop,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Hook {
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// The status it was answered with (None: dropped).
    pub status: Option<u16>,
}

impl Hook {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        let found = self.headers.iter().find(|(n, _)| *n == name);
        found.map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.json()["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The key and signature headers are right for this body.
    pub fn is_signed_by(&self, key: &str, secret: &str) -> bool {
        let expected = shardpush::auth::hmac_sha256_hex(secret.as_bytes(), &self.body);
        self.header("x-pusher-key") == Some(key)
            && self.header("x-pusher-signature") == Some(expected.as_str())
            && self.header("content-type") == Some("application/json")
    }
}

#[derive(Default)]
struct State {
    received: Vec<Hook>,
    script: VecDeque<Reply>,
}

pub struct Receiver {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    pub fn start() -> Receiver {
        Receiver::start_on(0)
    }

    /// On a given port (to come back where a stopped receiver was).
    pub fn start_on(port: u16) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind receiver");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        std::thread::spawn(move || accept_loop(listener, s, st));
        Receiver { port, state, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/webhooks", self.port)
    }

    /// The answers to the next requests, in order (200 after them).
    pub fn script(&self, replies: &[Reply]) {
        self.state.lock().unwrap().script.extend(replies);
    }

    /// Answers 200 from now on.
    pub fn clear_script(&self) {
        self.state.lock().unwrap().script.clear();
    }

    pub fn received(&self) -> Vec<Hook> {
        self.state.lock().unwrap().received.clone()
    }

    /// Waits until `check` holds for the requests received, or panics after `timeout`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Hook]) -> bool,
    ) -> Vec<Hook> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if check(&received) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received: {:?}",
                received
                    .iter()
                    .map(|h| String::from_utf8_lossy(&h.body).into_owned())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops listening and closes every connection.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        // Let the accept loop and the connections notice.
        std::thread::sleep(Duration::from_millis(150));
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (s, st) = (state.clone(), stop.clone());
                std::thread::spawn(move || serve(stream, s, st));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Serves one kept-alive connection.
fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if stop.load(Ordering::Relaxed) {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        // A whole request in the buffer?
        if let Some((hook, used)) = parse_request(&buf) {
            buf.drain(..used);
            let reply = {
                let mut state = state.lock().unwrap();
                let reply = state.script.pop_front().unwrap_or(Reply::Status(200));
                let status = match reply {
                    Reply::Status(s) => Some(s),
                    Reply::Drop => None,
                };
                state.received.push(Hook { status, ..hook });
                reply
            };
            match reply {
                Reply::Status(status) => {
                    let response =
                        format!("HTTP/1.1 {status} Status\r\nContent-Length: 2\r\n\r\nok");
                    if stream.write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
                Reply::Drop => {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
            continue;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A complete request at the start of `buf`, and its length.
fn parse_request(buf: &[u8]) -> Option<(Hook, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut headers = Vec::new();
    for line in head.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if buf.len() < head_end + length {
        return None;
    }
    let hook = Hook {
        headers,
        body: buf[head_end..head_end + length].to_vec(),
        at: Instant::now(),
        status: None,
    };
    Some((hook, head_end + length))
}
