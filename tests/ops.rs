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
