//! Test harness: runs the real `shardpush` binary on an ephemeral loopback port and talks to it
//! with real WebSocket (tungstenite) and HTTP/1.1 clients.
#![allow(dead_code)]

pub mod webhook_receiver;

use shardpush::auth::{hmac_sha256_hex, md5_hex};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::{Message, WebSocket};

pub const APP_ID: &str = "test-id";
pub const KEY: &str = "test-key";
pub const SECRET: &str = "test-secret";

pub struct Server {
    child: Child,
    pub port: u16,
    _dir: TempDir,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
}

pub struct TempDir(pub std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The standard test apps plus `extra` TOML (top-level keys first, then more [[apps]]).
pub fn config_toml(top: &str, app_extra: &str, more_apps: &str) -> String {
    format!(
        "host = \"127.0.0.1\"\nport = 0\nshards = 2\n{top}\n[[apps]]\nid = \"{APP_ID}\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\nenable_client_messages = true\n{app_extra}\n{more_apps}"
    )
}

impl Server {
    pub fn start() -> Server {
        Server::with_config(&config_toml("", "", ""))
    }

    pub fn with_config(toml: &str) -> Server {
        Server::with_config_env(toml, &[])
    }

    /// Like `with_config`, with extra environment variables for the server process (e.g.
    /// `SHARDPUSH_FAULT_INJECTION=1`).
    pub fn with_config_env(toml: &str, env: &[(&str, &str)]) -> Server {
        Server::spawn(toml, env, Stdio::inherit()).0
    }

    /// Starts the server with `stderr` as given; returns the child's stderr pipe, if piped.
    pub fn spawn(
        toml: &str,
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> (Server, Option<std::process::ChildStderr>) {
        let dir = std::env::temp_dir().join(format!(
            "shardpush-test-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardpush"))
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start shardpush");
        let stderr = child.stderr.take();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap();
                break addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe; the first MiB is kept.
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let kept = stdout.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut kept = kept.lock().unwrap();
                if kept.len() < 1 << 20 {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
        });
        let server = Server {
            child,
            port,
            _dir: TempDir(dir),
            stdout,
        };
        (server, stderr)
    }

    /// What the server wrote to stdout so far (its info lines), after the line that said it
    /// listens.
    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// The configuration file the server was started with (a test may rewrite it and SIGHUP).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.0.join("config.toml")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn ws(&self) -> Client {
        self.ws_path(&format!(
            "/app/{KEY}?protocol=7&client=js&version=8.4.0&flash=false"
        ))
    }

    pub fn ws_path(&self, path: &str) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let url = format!("ws://127.0.0.1:{}{path}", self.port);
        let (socket, response) =
            tungstenite::client(url.as_str(), stream).expect("websocket handshake");
        let subprotocol = response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_owned());
        Client {
            socket,
            socket_id: String::new(),
            subprotocol,
        }
    }

    /// Connects and reads `connection_established`.
    pub fn connect(&self) -> Client {
        let mut c = self.ws();
        let hello = c.recv();
        assert_eq!(hello["event"], "pusher:connection_established");
        let data: serde_json::Value =
            serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
        c.socket_id = data["socket_id"].as_str().unwrap().to_owned();
        c
    }

    /// Connects until the kernel's SO_REUSEPORT choice puts a socket on `shard` (a socket id's
    /// second part modulo the shard count names its shard).
    pub fn connect_on_shard(&self, shard: u64) -> Client {
        for _ in 0..200 {
            let c = self.connect();
            if c.shard() == shard {
                return c;
            }
        }
        panic!("no connection landed on shard {shard} in 200 tries");
    }

    /// A signed HTTP API request; returns (status, body).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let query = signed_query(method, path, params, body, KEY, SECRET);
        raw_http(self.port, method, &format!("{path}?{query}"), body)
    }

    pub fn trigger(&self, channel: &str, event: &str, data: &str) -> (u16, String) {
        let body = serde_json::json!({"name": event, "channel": channel, "data": data}).to_string();
        self.api("POST", &format!("/apps/{APP_ID}/events"), &[], &body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shard of a socket id on a 2-shard test server: its second part modulo the shard count.
pub fn shard_of(socket_id: &str) -> u64 {
    socket_id
        .split('.')
        .nth(1)
        .and_then(|n| n.parse::<u64>().ok())
        .expect("a socket id is two numbers joined by a dot")
        % 2
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn signed_query(
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: &str,
    key: &str,
    secret: &str,
) -> String {
    signed_query_bytes(method, path, params, body.as_bytes(), key, secret)
}

/// `signed_query` for a body that need not be UTF-8.
pub fn signed_query_bytes(
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: &[u8],
    key: &str,
    secret: &str,
) -> String {
    let ts = now().to_string();
    let mut pairs: Vec<(String, String)> = vec![
        ("auth_key".into(), key.into()),
        ("auth_timestamp".into(), ts),
        ("auth_version".into(), "1.0".into()),
    ];
    if !body.is_empty() {
        pairs.push(("body_md5".into(), md5_hex(body)));
    }
    pairs.extend(params.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    pairs.sort();
    let canonical: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let canonical = canonical.join("&");
    let sig = hmac_sha256_hex(
        secret.as_bytes(),
        format!("{method}\n{path}\n{canonical}").as_bytes(),
    );
    format!("{canonical}&auth_signature={sig}")
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
pub fn raw_http(port: u16, method: &str, target: &str, body: &str) -> (u16, String) {
    raw_http_bytes(port, method, target, body.as_bytes())
}

/// `raw_http` with a body that need not be UTF-8.
pub fn raw_http_bytes(port: u16, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    parse_response(&resp)
}

pub fn parse_response(resp: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub struct Client {
    pub socket: WebSocket<TcpStream>,
    pub socket_id: String,
    pub subprotocol: Option<String>,
}

impl Client {
    pub fn send_json(&mut self, v: serde_json::Value) {
        self.socket.send(Message::text(v.to_string())).unwrap();
    }

    pub fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text.to_owned())).unwrap();
    }

    /// Next text message as JSON (panics on timeout or close).
    pub fn recv(&mut self) -> serde_json::Value {
        loop {
            match self.socket.read().expect("read a message") {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).expect("server sent JSON")
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Next text message, or None if none arrives within `wait` (pings are answered meanwhile).
    pub fn try_recv(&mut self, wait: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + wait;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            self.socket.get_mut().set_read_timeout(Some(left)).unwrap();
            match self.socket.read() {
                Ok(Message::Text(t)) => break Some(serde_json::from_str(t.as_str()).unwrap()),
                Ok(Message::Close(_)) => break None,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break None
                }
                Err(_) => break None,
            }
        };
        self.socket
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        result
    }

    /// Reads until an event named `event` (skipping others), with a 5 s timeout.
    pub fn recv_event(&mut self, event: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < deadline, "no {event} within 5 s");
            let m = self.recv();
            if m["event"] == event {
                return m;
            }
        }
    }

    pub fn subscribe(&mut self, channel: &str) -> serde_json::Value {
        self.send_json(
            serde_json::json!({"event":"pusher:subscribe","data":{"auth":"","channel":channel}}),
        );
        self.recv()
    }

    pub fn auth_for(&self, channel: &str, channel_data: Option<&str>) -> String {
        let mut to_sign = format!("{}:{channel}", self.socket_id);
        if let Some(d) = channel_data {
            to_sign.push(':');
            to_sign.push_str(d);
        }
        format!(
            "{KEY}:{}",
            hmac_sha256_hex(SECRET.as_bytes(), to_sign.as_bytes())
        )
    }

    pub fn subscribe_private(&mut self, channel: &str) -> serde_json::Value {
        let auth = self.auth_for(channel, None);
        self.send_json(
            serde_json::json!({"event":"pusher:subscribe","data":{"auth":auth,"channel":channel}}),
        );
        self.recv()
    }

    pub fn subscribe_presence(
        &mut self,
        channel: &str,
        user_id: &str,
        info: serde_json::Value,
    ) -> serde_json::Value {
        let channel_data = serde_json::json!({"user_id": user_id, "user_info": info}).to_string();
        let auth = self.auth_for(channel, Some(&channel_data));
        self.send_json(serde_json::json!({"event":"pusher:subscribe","data":{"auth":auth,"channel":channel,"channel_data":channel_data}}));
        self.recv()
    }

    /// The shard serving this connection (test servers run 2 shards).
    pub fn shard(&self) -> u64 {
        shard_of(&self.socket_id)
    }

    pub fn user_auth(&self, user_data: &str) -> String {
        let to_sign = format!("{}::user::{user_data}", self.socket_id);
        format!(
            "{KEY}:{}",
            hmac_sha256_hex(SECRET.as_bytes(), to_sign.as_bytes())
        )
    }

    /// Sends a correctly signed `pusher:signin` and returns the reply.
    pub fn signin(&mut self, user_data: &str) -> serde_json::Value {
        let auth = self.user_auth(user_data);
        self.send_json(
            serde_json::json!({"event":"pusher:signin","data":{"auth":auth,"user_data":user_data}}),
        );
        self.recv()
    }

    /// Reads messages until `wait` passes with none; returns them.
    pub fn drain(&mut self, wait: Duration) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Some(m) = self.try_recv(wait) {
            out.push(m);
        }
        out
    }

    /// Waits for the server to close; returns the close code.
    pub fn expect_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.socket.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => return None,
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    continue
                }
                Err(e) => panic!("error while waiting for close: {e}"),
            }
        }
        panic!("server did not close within 10 s");
    }
}

/// `data` of a server event, decoded from its JSON string.
pub fn data_of(m: &serde_json::Value) -> serde_json::Value {
    serde_json::from_str(m["data"].as_str().expect("data is a string"))
        .expect("data string holds JSON")
}

/// A node of a cluster on `redis` (prefix `t`), with more `[cluster]` keys in `cluster_extra`
/// and more keys of the test app in `app_extra`.
pub fn cluster_node(redis: &Redis, cluster_extra: &str, app_extra: &str) -> Server {
    Server::with_config(&cluster_toml(&redis.url(), "", cluster_extra, app_extra))
}

/// The configuration of a cluster node on the Redis at `url` (prefix `t`): `top` keys first,
/// then `[cluster]` with `cluster_extra`, then the test app with `app_extra`.
pub fn cluster_toml(url: &str, top: &str, cluster_extra: &str, app_extra: &str) -> String {
    let cluster = format!("[cluster]\nredis_url = \"{url}\"\nprefix = \"t\"\n{cluster_extra}");
    // `[cluster]` must follow the top-level keys and precede the apps.
    config_toml(top, app_extra, "").replace("\n[[apps]]", &format!("\n{cluster}\n[[apps]]"))
}

/// The next presence event of a client (`member_added` or `member_removed`) as (kind, user).
pub fn next_member_event(client: &mut Client, wait: Duration) -> Option<(String, String)> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = client.try_recv(left)?;
        let event = m["event"].as_str().unwrap_or_default();
        if let Some(kind) = event.strip_prefix("pusher_internal:member_") {
            let user = data_of(&m)["user_id"].as_str().unwrap().to_owned();
            return Some((kind.to_owned(), user));
        }
    }
}

/// A signed GET of the API that must answer 200, as JSON.
pub fn get_json(server: &Server, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
    let (status, body) = server.api("GET", path, params, "");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The user ids of a presence channel from the API, sorted.
pub fn presence_users(server: &Server, channel: &str) -> Vec<String> {
    let body = get_json(
        server,
        &format!("/apps/{APP_ID}/channels/{channel}/users"),
        &[],
    );
    let mut ids: Vec<String> = body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Waits until `check` holds (a cluster converges asynchronously), or fails after 10 s.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `redis-server` of the test's own on a free loopback port, stopped when dropped.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::start_on(port)
    }

    /// Starts on `port` (a restart on the same port), with nothing saved or loaded.
    pub fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (the test command installs it)");
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command; the first line of the reply (None if Redis is not reachable).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).ok()?;
        Some(reply.trim_end().to_owned())
    }

    /// Subscribers Redis counts on a topic (`PUBSUB NUMSUB`).
    pub fn subscribers(&self, topic: &str) -> u32 {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let request = format!(
            "*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n${}\r\n{topic}\r\n",
            topic.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        // *2 / $len / topic / :count
        let mut lines = BufReader::new(stream).lines();
        let count = lines.nth(3).unwrap().unwrap();
        count.trim_start_matches(':').parse().unwrap()
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is answered.
    pub fn pause(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    pub fn resume(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
