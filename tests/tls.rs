//! Native TLS (issue 12): `tls_cert`/`tls_key` serve `wss://` and `https://` on the client ports.
//! The certificates are made here with `openssl` (a CA of the test's own and server certificates
//! for 127.0.0.1/localhost signed by it); the clients are rustls clients trusting that CA only.

mod common;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A CA of the test's own, in a temporary directory, and server certificates it signs.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "shardpush-tls-{}-{}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir: TempDir(dir) };
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=shardpush-test-ca",
        ]);
        std::fs::write(
            pki.path("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir.0)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A server certificate for 127.0.0.1/localhost with `cn` and `serial`, written (key and
    /// certificate) to `name.pem`/`name.key` through a rename, as a deployment would.
    fn server_cert(&self, name: &str, cn: &str, serial: u32) -> (PathBuf, PathBuf) {
        let subject = format!("/CN={cn}");
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "new.key",
            "-out",
            "new.csr",
            "-subj",
            &subject,
        ]);
        let serial = serial.to_string();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            "new.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial,
            "-out",
            "new.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        let (cert, key) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
        );
        std::fs::rename(self.path("new.key"), &key).unwrap();
        std::fs::rename(self.path("new.pem"), &cert).unwrap();
        (cert, key)
    }

    /// A rustls client configuration trusting this CA only.
    fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.path("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

fn rand_u64() -> u64 {
    let mut buf = [0u8; 8];
    unsafe { libc::getrandom(buf.as_mut_ptr().cast(), 8, 0) };
    u64::from_ne_bytes(buf)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn tls_toml(cert: &Path, key: &Path, top: &str) -> String {
    let top = format!(
        "tls_cert = {:?}\ntls_key = {:?}\n{top}",
        cert.to_str().unwrap(),
        key.to_str().unwrap()
    );
    config_toml(&top, "", "")
}

/// A TCP connection with a small receive buffer (so that the server's writes fill it quickly).
fn tcp(port: u16, rcvbuf: Option<usize>) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// A TLS connection (handshake completed) to 127.0.0.1.
fn tls_connect(port: u16, config: &Arc<ClientConfig>, rcvbuf: Option<usize>) -> Tls {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = ClientConnection::new(config.clone(), name).unwrap();
    let mut tls = StreamOwned::new(conn, tcp(port, rcvbuf));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls
}

/// The certificate the server presented.
fn peer_cert(tls: &Tls) -> Vec<u8> {
    tls.conn.peer_certificates().expect("a certificate")[0].to_vec()
}

struct WssClient {
    socket: WebSocket<Tls>,
    socket_id: String,
}

impl WssClient {
    fn connect(port: u16, config: &Arc<ClientConfig>, rcvbuf: Option<usize>) -> WssClient {
        let tls = tls_connect(port, config, rcvbuf);
        let url = format!("wss://127.0.0.1:{port}/app/{KEY}?protocol=7&client=js&version=8.4.0");
        let (socket, _) = tungstenite::client(url.as_str(), tls).expect("websocket handshake");
        let mut client = WssClient {
            socket,
            socket_id: String::new(),
        };
        let hello = client.recv();
        assert_eq!(hello["event"], "pusher:connection_established");
        client.socket_id = data_of(&hello)["socket_id"].as_str().unwrap().to_owned();
        client
    }

    fn send(&mut self, v: serde_json::Value) {
        self.socket.send(Message::text(v.to_string())).unwrap();
    }

    fn recv(&mut self) -> serde_json::Value {
        loop {
            match self.socket.read().expect("read a message") {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    fn subscribe(&mut self, channel: &str) {
        self.send(serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel}}));
        let reply = self.recv();
        assert_eq!(
            reply["event"], "pusher_internal:subscription_succeeded",
            "{reply}"
        );
    }

    fn peer_cert(&self) -> Vec<u8> {
        peer_cert(self.socket.get_ref())
    }
}

/// One HTTPS request (a connection of its own); (status, body).
fn https(
    port: u16,
    config: &Arc<ClientConfig>,
    method: &str,
    target: &str,
    body: &str,
) -> (u16, String) {
    let mut tls = tls_connect(port, config, None);
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    // The server ends with close_notify: a clean end of stream.
    tls.read_to_end(&mut response)
        .expect("response and close_notify");
    parse_response(&response)
}

/// A signed API request over HTTPS.
fn https_api(
    port: u16,
    config: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let query = signed_query(method, path, &[], body, KEY, SECRET);
    https(port, config, method, &format!("{path}?{query}"), body)
}

fn https_trigger(port: u16, config: &Arc<ClientConfig>, channel: &str, event: &str, data: &str) {
    let body = serde_json::json!({"name": event, "channel": channel, "data": data}).to_string();
    let (status, text) = https_api(
        port,
        config,
        "POST",
        &format!("/apps/{APP_ID}/events"),
        &body,
    );
    assert_eq!(status, 200, "{text}");
}

#[test]
fn wss_and_https_on_both_ports() {
    let pki = Pki::new();
    let (cert, key) = pki.server_cert("srv", "localhost", 1);
    let api_port = free_port();
    let server = Server::with_config(&tls_toml(&cert, &key, &format!("api_port = {api_port}")));
    let config = pki.client();

    let mut client = WssClient::connect(server.port, &config, None);
    client.subscribe("tls-news");
    https_trigger(server.port, &config, "tls-news", "breaking", "over https");
    let got = client.recv();
    assert_eq!(got["event"], "breaking");
    assert_eq!(got["data"], "over https");
    // The API port speaks TLS too.
    https_trigger(api_port, &config, "tls-news", "again", "api port");
    assert_eq!(client.recv()["data"], "api port");
    assert_eq!(
        https(api_port, &config, "GET", "/health", ""),
        (200, "OK".into())
    );

    // Client to server: a ping is answered over the same TLS stream.
    client.send(serde_json::json!({"event":"pusher:ping","data":{}}));
    assert_eq!(client.recv()["event"], "pusher:pong");
    // A client event on a private channel travels client -> server -> client, decrypted and
    // encrypted again.
    let mut other = WssClient::connect(server.port, &config, None);
    for c in [&mut client, &mut other] {
        let to_sign = format!("{}:private-tls", c.socket_id);
        let sig = shardpush::auth::hmac_sha256_hex(SECRET.as_bytes(), to_sign.as_bytes());
        let auth = format!("{KEY}:{sig}");
        c.send(serde_json::json!({"event":"pusher:subscribe","data":{"channel":"private-tls","auth":auth}}));
        assert_eq!(c.recv()["event"], "pusher_internal:subscription_succeeded");
    }
    client.send(serde_json::json!({"event":"client-hi","channel":"private-tls","data":{"n":1}}));
    let got = other.recv();
    assert_eq!(got["event"], "client-hi");
    assert_eq!(got["data"], r#"{"n":1}"#);
}

#[test]
fn a_large_burst_reaches_a_slow_reader_complete_and_in_order() {
    let pki = Pki::new();
    let (cert, key) = pki.server_cert("srv", "localhost", 2);
    let toml = tls_toml(&cert, &key, "max_outbound_queue_bytes = 16777216");
    let server = Server::with_config(&toml);
    let config = pki.client();
    // A small receive buffer: the server's socket fills at once, so frames wait in the queue
    // and in rustls, and go out in partial writes as the client reads.
    let mut client = WssClient::connect(server.port, &config, Some(8 * 1024));
    client.subscribe("burst");

    // 2.4 MB in 300 events of 8,000 bytes, 10 per batch, sent before the client reads any.
    let events = 300;
    let payload = |i: usize| format!("{i:06}:{}", "x".repeat(7993 - (i % 50)));
    for batch in 0..events / 10 {
        let batch: Vec<serde_json::Value> = (batch * 10..batch * 10 + 10)
            .map(|i| serde_json::json!({"name":"bulk","channel":"burst","data":payload(i)}))
            .collect();
        let body = serde_json::json!({ "batch": batch }).to_string();
        let path = format!("/apps/{APP_ID}/batch_events");
        let (status, text) = https_api(server.port, &config, "POST", &path, &body);
        assert_eq!(status, 200, "{text}");
    }
    for i in 0..events {
        let got = client.recv();
        assert_eq!(got["event"], "bulk");
        assert_eq!(got["data"].as_str().unwrap(), payload(i), "event {i}");
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Still a working connection afterwards.
    client.send(serde_json::json!({"event":"pusher:ping","data":{}}));
    assert_eq!(client.recv()["event"], "pusher:pong");
}

#[test]
fn a_tls_client_that_never_reads_is_closed_as_a_slow_consumer() {
    let pki = Pki::new();
    let (cert, key) = pki.server_cert("srv", "localhost", 3);
    let toml = tls_toml(&cert, &key, "max_outbound_queue_bytes = 65536");
    let server = Server::with_config(&toml);
    let config = pki.client();
    let mut client = WssClient::connect(server.port, &config, Some(4 * 1024));
    client.subscribe("flood");
    let data = "y".repeat(8000);
    for _ in 0..40 {
        let batch: Vec<serde_json::Value> = (0..10)
            .map(|_| serde_json::json!({"name":"e","channel":"flood","data":data}))
            .collect();
        let body = serde_json::json!({ "batch": batch }).to_string();
        let path = format!("/apps/{APP_ID}/batch_events");
        let (status, text) = https_api(server.port, &config, "POST", &path, &body);
        assert_eq!(status, 200, "{text}");
    }
    // Now it reads: what the kernel and rustls already had, then the 4100 error and close.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = 0;
    let code = loop {
        assert!(Instant::now() < deadline, "no close within 10 s");
        match client.socket.read() {
            Ok(Message::Text(t)) => {
                let m: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if m["event"] == "pusher:error" {
                    assert_eq!(m["data"]["code"], 4100, "{m}");
                } else {
                    assert_eq!(m["event"], "e");
                    events += 1;
                }
            }
            Ok(Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("read: {e}"),
        }
    };
    assert_eq!(code, Some(4100));
    assert!(events < 400, "{events} events: the queue never filled");
    // The server goes on serving.
    let mut fresh = WssClient::connect(server.port, &config, None);
    fresh.subscribe("after");
}

/// Reads until the server closes the socket; panics if it stays open for `wait`.
fn expect_closed(mut stream: TcpStream, wait: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("still open after {:?}: {e}", start.elapsed()),
        }
    }
}

fn metric(port: u16, name: &str) -> u64 {
    let (status, text) = raw_http(port, "GET", "/metrics", "");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn plain_tcp_garbage_and_silence_on_the_tls_port_are_dropped() {
    let pki = Pki::new();
    let (cert, key) = pki.server_cert("srv", "localhost", 4);
    let metrics = free_port();
    let top = format!("request_timeout = 2\nmetrics_port = {metrics}");
    let server = Server::with_config(&tls_toml(&cert, &key, &top));
    let config = pki.client();

    // A plain WebSocket upgrade: answered (if at all) by a TLS alert, never by HTTP.
    let mut plain = tcp(server.port, None);
    plain
        .write_all(
            format!(
                "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let got = expect_closed(plain, Duration::from_secs(5));
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
        "{got:?}"
    );
    // Garbage shaped like a ClientHello record, then garbage that is not even that.
    let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x80, 0x01, 0x00, 0x00, 0x7c];
    hello.extend((0..0x7c).map(|i| (i * 37 % 251) as u8));
    let mut garbage = tcp(server.port, None);
    garbage.write_all(&hello).unwrap();
    expect_closed(garbage, Duration::from_secs(5));
    let mut garbage = tcp(server.port, None);
    garbage
        .write_all(
            &(0..3000)
                .map(|i| (i * 7919 % 256) as u8)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    expect_closed(garbage, Duration::from_secs(5));
    // A handshake that never comes is given request_timeout (2 s; the sweeper checks each second).
    let start = Instant::now();
    let mut slow = tcp(server.port, None);
    slow.write_all(&hello[..20]).unwrap();
    expect_closed(slow, Duration::from_secs(6));
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );

    // Nothing else was affected.
    let mut client = WssClient::connect(server.port, &config, None);
    client.subscribe("still-fine");
    https_trigger(server.port, &config, "still-fine", "ok", "yes");
    assert_eq!(client.recv()["data"], "yes");
    eventually("the failed handshakes are counted", || {
        metric(metrics, "shardpush_tls_handshake_failures_total") >= 4
    });
}

/// Lines of the server's stderr, as they come.
fn stderr_lines(stderr: std::process::ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => panic!("no line with {needle:?} on stderr within 5 s"),
        }
    }
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_connections() {
    let pki = Pki::new();
    let (cert, key) = pki.server_cert("srv", "first.shardpush.test", 1001);
    let (server, stderr) = Server::spawn(&tls_toml(&cert, &key, ""), &[], Stdio::piped());
    let lines = stderr_lines(stderr.unwrap());
    let config = pki.client();

    let mut old = WssClient::connect(server.port, &config, None);
    old.subscribe("reload");
    let first = old.peer_cert();

    // New files (another key, CN and serial) in place, then SIGHUP.
    pki.server_cert("srv", "second.shardpush.test", 2002);
    server.signal(libc::SIGHUP);
    wait_line(&lines, "TLS certificate reloaded");
    let second = peer_cert(&tls_connect(server.port, &config, None));
    assert_ne!(
        second, first,
        "a new connection still sees the old certificate"
    );
    let fresh = WssClient::connect(server.port, &config, None);
    assert_eq!(fresh.peer_cert(), second);

    // The connection made before the reload goes on, both ways.
    https_trigger(server.port, &config, "reload", "after", "hup");
    assert_eq!(old.recv()["data"], "hup");
    old.send(serde_json::json!({"event":"pusher:ping","data":{}}));
    assert_eq!(old.recv()["event"], "pusher:pong");

    // A broken file on the next SIGHUP: said so, and the certificate in use stays.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    server.signal(libc::SIGHUP);
    let line = wait_line(&lines, "NOT reloaded");
    assert!(line.contains(cert.to_str().unwrap()), "{line}");
    assert_eq!(peer_cert(&tls_connect(server.port, &config, None)), second);
    https_trigger(server.port, &config, "reload", "still", "there");
    assert_eq!(old.recv()["data"], "there");
}

#[test]
fn unusable_tls_files_stop_startup_naming_the_key_and_file() {
    let pki = Pki::new();
    let (cert, key) = pki.server_cert("srv", "localhost", 5);
    let (_, other_key) = pki.server_cert("other", "localhost", 6);
    let missing = pki.path("missing.pem");
    let not_pem = pki.path("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let cases: [(&Path, &Path, &str, &Path); 4] = [
        (&missing, &key, "tls_cert", &missing),
        (&not_pem, &key, "tls_cert", &not_pem),
        (&cert, &not_pem, "tls_key", &not_pem),
        (&cert, &other_key, "tls_key", &other_key),
    ];
    for (cert, key, name, file) in cases {
        let path = pki.path("config.toml");
        std::fs::write(&path, tls_toml(cert, key, "")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_shardpush"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(text.contains(name), "{name} not named: {text}");
        assert!(
            text.contains(file.to_str().unwrap()),
            "{file:?} not named: {text}"
        );
    }
}
