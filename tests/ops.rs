//! Operating the server (issue 12): the operations listener (`/metrics`, `/up`, `/ready`) and
//! the graceful drain, which closes the connections with 4200 spread over
//! `shutdown_grace_period` after delivering what was already accepted.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn get(port: u16, path: &str) -> (u16, String) {
    raw_http(port, "GET", path, "")
}

fn server_with_metrics(top: &str) -> (Server, u16) {
    let metrics = free_port();
    let toml = config_toml(&format!("metrics_port = {metrics}\n{top}"), "", "");
    (Server::with_config(&toml), metrics)
}

#[test]
fn the_operations_listener_answers_health_and_metrics_and_refuses_the_rest() {
    let (server, metrics) = server_with_metrics("");
    assert_eq!(get(metrics, "/up"), (200, "OK".into()));
    assert_eq!(get(metrics, "/ready"), (200, "OK".into()));
    assert_eq!(get(server.port, "/up"), (200, "OK".into()));
    assert_eq!(get(server.port, "/ready"), (200, "OK".into()));
    let (status, text) = get(metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(
        text.contains("# TYPE shardpush_connections gauge"),
        "{text}"
    );
    assert!(text.contains("shardpush_ready 1\n"), "{text}");
    assert_eq!(get(metrics, "/nothing").0, 404);
    assert_eq!(raw_http(metrics, "POST", "/metrics", "x").0, 405);

    // Not HTTP at all: a 400, and the listener goes on serving.
    let mut s = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x00\x01\x02 garbage\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(parse_response(&answer).0, 400);
    // A head that never ends is cut at 8 KiB.
    let mut s = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(9000)).as_bytes());
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(parse_response(&answer).0, 431);
    assert_eq!(get(metrics, "/up"), (200, "OK".into()));

    // The content type Prometheus expects.
    let mut s = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{answer}"
    );
}

#[test]
fn a_drain_delivers_what_was_accepted_then_spreads_the_4200_closes_over_the_grace_period() {
    const CLIENTS: usize = 60;
    let grace = Duration::from_secs(2);
    let (mut server, metrics) = server_with_metrics("shutdown_grace_period = 2");
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| server.connect()).collect();
    for c in clients.iter_mut() {
        c.subscribe("news");
    }
    let (status, body) = server.trigger("news", "last", "accepted before the signal");
    assert_eq!(status, 200, "{body}");
    server.signal(libc::SIGTERM);
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let event = c.recv_event("last");
                assert_eq!(event["data"], "accepted before the signal");
                (c.expect_close(), Instant::now())
            })
        })
        .collect();

    // Not ready at once, still alive, and the main port takes no new client.
    eventually("/ready answers 503 after SIGTERM", || {
        get(metrics, "/ready") == (503, "draining".into())
    });
    assert_eq!(get(metrics, "/up"), (200, "OK".into()));
    let refused = match TcpStream::connect(("127.0.0.1", server.port)) {
        Err(_) => true,
        Ok(s) => {
            let url = format!("ws://127.0.0.1:{}/app/{KEY}?protocol=7", server.port);
            tungstenite::client(url.as_str(), s).is_err()
        }
    };
    assert!(refused, "a new connection was accepted during the drain");

    let mut closes: Vec<Instant> = Vec::new();
    for reader in readers {
        let (code, at) = reader
            .join()
            .expect("a client saw the event, then its close");
        assert_eq!(code, Some(4200));
        closes.push(at);
    }
    closes.sort();
    let (first, last) = (closes[0], closes[CLIENTS - 1]);
    let spread = last - first;
    assert!(
        spread >= grace / 2,
        "the closes came within {spread:?}, not spread over the {grace:?} grace period"
    );
    // Evenly: no fifth of the period holds more than a third of the closes.
    let bucket = grace / 5;
    for i in 0..5 {
        let from = first + bucket * i;
        let n = closes
            .iter()
            .filter(|&&t| t >= from && t < from + bucket)
            .count();
        assert!(
            n <= CLIENTS / 3,
            "{n} of {CLIENTS} closes in one {bucket:?}"
        );
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server exits after its drain");
    assert!(status.success(), "a graceful shutdown exits 0: {status:?}");
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once() {
    let (mut server, _) = server_with_metrics("shutdown_grace_period = 60");
    let _clients: Vec<Client> = (0..4).map(|_| server.connect()).collect();
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.wait_exit(Duration::ZERO).is_none(), "still draining");
    server.signal(libc::SIGINT);
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("the second signal ends the process");
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
}

/// An app table for a test configuration.
fn app_toml(id: &str, key: &str, extra: &str) -> String {
    format!("[[apps]]\nid = \"{id}\"\nkey = \"{key}\"\nsecret = \"{id}-secret\"\n{extra}\n")
}

/// Connects with an app's key; returns the client after `connection_established`, or the
/// close code the upgrade was refused with.
fn connect_app(server: &Server, key: &str) -> Result<Client, Option<u16>> {
    let mut c = server.ws_path(&format!("/app/{key}?protocol=7"));
    let first = c.recv();
    match first["event"].as_str() {
        Some("pusher:connection_established") => Ok(c),
        _ => Err(c.expect_close()),
    }
}

fn trigger_app(server: &Server, id: &str, key: &str, channel: &str) -> (u16, String) {
    let path = format!("/apps/{id}/events");
    let body = serde_json::json!({"name": "e", "channel": channel, "data": "d"}).to_string();
    let secret = format!("{id}-secret");
    let query = signed_query("POST", &path, &[], &body, key, &secret);
    raw_http(server.port, "POST", &format!("{path}?{query}"), &body)
}

#[test]
fn sighup_reloads_the_apps_and_keeps_them_when_the_file_is_broken() {
    let top = "host = \"127.0.0.1\"\nport = 0\nshards = 2\n";
    let before = format!(
        "{top}{}{}{}",
        app_toml("a", "ka", ""),
        app_toml("b", "kb", ""),
        app_toml("d", "kd", "")
    );
    let (mut server, stderr) = Server::spawn(&before, &[], std::process::Stdio::piped());
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    let stderr = stderr.expect("piped stderr");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let mut a = connect_app(&server, "ka").unwrap();
    a.subscribe("news");
    let mut b = connect_app(&server, "kb").unwrap();
    let mut d = connect_app(&server, "kd").unwrap();
    assert_eq!(trigger_app(&server, "c", "kc", "news").0, 404);

    // a: now limited to its one connection; b: removed; c: added; d: disabled.
    let after = format!(
        "{top}{}{}{}",
        app_toml("a", "ka", "max_connections = 1"),
        app_toml("c", "kc", ""),
        app_toml("d", "kd", "enabled = false")
    );
    std::fs::write(server.config_path(), after).unwrap();
    server.signal(libc::SIGHUP);
    assert_eq!(b.expect_close(), Some(4003), "a removed app's connection");
    assert_eq!(d.expect_close(), Some(4003), "a disabled app's connection");
    assert_eq!(connect_app(&server, "kb").err(), Some(Some(4001)));
    assert_eq!(connect_app(&server, "kd").err(), Some(Some(4003)));
    assert_eq!(connect_app(&server, "ka").err(), Some(Some(4004)));
    let mut c = connect_app(&server, "kc").expect("the added app takes connections");
    c.subscribe("news");
    assert_eq!(trigger_app(&server, "c", "kc", "news").0, 200);
    assert_eq!(c.recv_event("e")["channel"], "news");
    assert_eq!(trigger_app(&server, "a", "ka", "news").0, 200);
    assert_eq!(
        a.recv_event("e")["channel"],
        "news",
        "a's connection lives on"
    );
    assert_eq!(trigger_app(&server, "b", "kb", "news").0, 404);
    eventually("the reload is logged by app id", || {
        let out = server.stdout_text();
        out.contains("removed [\"b\"]") && out.contains("added [\"c\"]")
    });

    // A broken file: refused with its error, and everything goes on as it was.
    std::fs::write(server.config_path(), format!("{top}[[apps]]\nid = \"x\"\n")).unwrap();
    server.signal(libc::SIGHUP);
    eventually("the refusal names the file and the key", || {
        let log = log.lock().unwrap();
        log.contains("reload refused") && log.contains("apps[0].key")
    });
    assert_eq!(trigger_app(&server, "c", "kc", "news").0, 200);
    assert_eq!(c.recv_event("e")["channel"], "news");
    // An empty file (a deployment tool caught rewriting it) does not swap the apps for the
    // development app.
    std::fs::write(server.config_path(), "").unwrap();
    server.signal(libc::SIGHUP);
    eventually("the empty file is refused", || {
        log.lock().unwrap().contains("no app is configured")
    });
    assert_eq!(trigger_app(&server, "c", "kc", "news").0, 200);
    assert_eq!(connect_app(&server, "app-key").err(), Some(Some(4001)));
    let everything = log.lock().unwrap().clone() + &server.stdout_text();
    assert!(!everything.contains("-secret"), "a secret was logged");
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
}

/// The shard that homes `channel` of the first app on a 2-shard server (`ChannelKey::home`).
fn home_of(channel: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in 0u32.to_le_bytes().iter().chain(channel.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h % 2
}

#[test]
fn a_shard_without_connections_serves_the_others_until_their_drain_is_done() {
    let (mut server, _) = server_with_metrics("shutdown_grace_period = 3");
    // Both clients on shard 1, in a channel homed on shard 0 (which has no connection).
    let channel = (0..)
        .map(|i| format!("private-drain-{i}"))
        .find(|c| home_of(c) == 0)
        .unwrap();
    let mut a = server.connect_on_shard(1);
    let mut b = server.connect_on_shard(1);
    a.subscribe_private(&channel);
    b.subscribe_private(&channel);
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    a.send_json(serde_json::json!({"event": "client-late", "channel": channel, "data": {}}));
    let got = b.recv_event("client-late");
    assert_eq!(
        got["channel"],
        channel.as_str(),
        "shard 0 still routes its channel"
    );
    assert_eq!(a.expect_close(), Some(4200));
    assert_eq!(b.expect_close(), Some(4200));
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success());
}

#[test]
fn a_cluster_node_drains_on_sigterm_and_reloads_on_sighup_instead_of_dying() {
    // A cluster node logs before the server starts: the log threads must not take the signals.
    let redis = Redis::start();
    let mut node = cluster_node(&redis, "", "");
    let mut c = node.connect();
    node.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        node.wait_exit(Duration::ZERO).is_none(),
        "SIGHUP killed the node"
    );
    c.subscribe("still-here");
    node.signal(libc::SIGTERM);
    assert_eq!(c.expect_close(), Some(4200));
    let status = node.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(
        status.success(),
        "a drained cluster node exits 0: {status:?}"
    );
}

#[test]
fn silent_sockets_cannot_stop_the_operations_listener_for_long() {
    let (_server, metrics) = server_with_metrics("");
    let silent: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", metrics)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Beyond the slots: a quick 503, not a silent close.
    let (status, _) = get(metrics, "/ready");
    assert!(status == 503 || status == 200, "got {status}");
    // The silent ones are dropped after 2 s; then health answers again.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(get(metrics, "/up"), (200, "OK".into()));
    drop(silent);
}
