//! One SIGTERM always stops the server, even when its stderr is a closed pipe or a full one that
//! nobody reads (issue 8, defect 8: the signal thread used to write stderr before setting the
//! shutdown flag, so it blocked on a full pipe or panicked on a closed one, and the first
//! SIGTERM was lost). A stalled stderr must not stall the shards either.

mod common;
use common::*;
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

/// Connects, subscribes, triggers and receives: the server is serving.
fn serves(server: &Server) {
    let mut c = server.connect();
    assert_eq!(
        c.subscribe("alive")["event"],
        "pusher_internal:subscription_succeeded"
    );
    let (status, body) = server.trigger("alive", "ping", "yes");
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.recv_event("ping")["data"], "yes");
}

fn stops_on_one_sigterm(server: &mut Server) {
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the first SIGTERM stops the server");
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
}

#[test]
fn one_sigterm_stops_a_server_whose_stderr_is_a_closed_pipe() {
    let (mut server, stderr) = Server::spawn(&config_toml("", "", ""), &[], Stdio::piped());
    drop(stderr);
    serves(&server);
    stops_on_one_sigterm(&mut server);
}

#[test]
fn a_full_stderr_stalls_neither_the_shards_nor_the_shutdown() {
    let (mut server, stderr) = Server::spawn(
        &config_toml("", "", ""),
        &[("SHARDPUSH_FAULT_INJECTION", "1")],
        Stdio::piped(),
    );
    // Never read, so it fills: each contained panic writes about 180 bytes, and a pipe holds
    // 64 KiB. 600 of them leave the server's log thread blocked on a full pipe.
    let _stderr = stderr.expect("piped stderr");
    for _ in 0..600 {
        let mut c = server.connect();
        c.send_json(json!({"event": "shardpush:test_panic", "data": {}}));
        assert!(dropped_within(&mut c, Duration::from_secs(5)));
    }
    serves(&server);
    stops_on_one_sigterm(&mut server);
}

/// Whether the server drops the connection (any way: close frame, FIN or reset) in time.
fn dropped_within(c: &mut Client, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        match c.socket.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}
