//! WebSocket protocol rules, checked against the real server (2 shards) over loopback.

mod common;
use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tungstenite::client::IntoClientRequest;

#[test]
fn handshake_sends_string_data_with_socket_id_and_activity_timeout() {
    let server = Server::start();
    let mut a = server.ws();
    let hello = a.recv();
    assert_eq!(hello["event"], "pusher:connection_established");
    let data = data_of(&hello);
    let socket_id = data["socket_id"].as_str().unwrap();
    let (left, right) = socket_id.split_once('.').unwrap();
    assert!(
        !left.is_empty() && left.bytes().all(|b| b.is_ascii_digit()),
        "{socket_id}"
    );
    assert!(
        !right.is_empty() && right.bytes().all(|b| b.is_ascii_digit()),
        "{socket_id}"
    );
    assert_eq!(data["activity_timeout"], 120);
    let ids: std::collections::HashSet<String> =
        (0..20).map(|_| server.connect().socket_id).collect();
    assert_eq!(ids.len(), 20, "socket ids are unique");
    assert!(
        a.subprotocol.is_none(),
        "no subprotocol when none was offered"
    );
}

#[test]
fn echoes_the_ios_subprotocol_and_serves_protocol_5_pings_without_data() {
    let server = Server::start();
    let url = format!(
        "ws://127.0.0.1:{}/app/{KEY}?client=java-client&protocol=5&version=2.4.0",
        server.port
    );
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "pusher-channels-protocol-7".parse().unwrap(),
    );
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (socket, response) = tungstenite::client(request, stream).unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "pusher-channels-protocol-7"
    );
    let mut c = Client {
        socket,
        socket_id: String::new(),
        subprotocol: None,
    };
    assert_eq!(c.recv()["event"], "pusher:connection_established");
    c.send_text(r#"{"event": "pusher:ping"}"#);
    let pong = c.recv();
    assert_eq!(pong["event"], "pusher:pong");
    assert_eq!(pong["data"], "{}");
    c.send_json(json!({"event":"pusher:ping","data":{}}));
    assert_eq!(c.recv()["event"], "pusher:pong");
}

fn expect_rejection(server: &Server, path: &str, code: u64) -> String {
    let mut c = server.ws_path(path);
    let error = c.recv();
    assert_eq!(error["event"], "pusher:error", "{path}");
    assert!(error["data"].is_object(), "pusher:error data is an object");
    assert_eq!(error["data"]["code"], code, "{path}");
    assert_eq!(c.expect_close(), Some(code as u16), "{path}");
    error["data"]["message"].as_str().unwrap().to_owned()
}

#[test]
fn rejections_send_an_error_then_close_with_the_same_code() {
    let more = "[[apps]]\nid = \"off\"\nkey = \"off-key\"\nsecret = \"s\"\nenabled = false\n\
                [[apps]]\nid = \"small\"\nkey = \"small-key\"\nsecret = \"s\"\nmax_connections = 1\n";
    let server = Server::with_config(&config_toml("allow_missing_protocol = true", "", more));
    let message = expect_rejection(&server, "/app/nope?protocol=7", 4001);
    assert!(message.contains("nope"));
    expect_rejection(&server, "/wrong/path", 4005);
    expect_rejection(&server, &format!("/app/{KEY}?protocol=3"), 4007);
    expect_rejection(&server, &format!("/app/{KEY}?protocol=8"), 4007);
    expect_rejection(&server, &format!("/app/{KEY}?protocol=seven"), 4007);
    expect_rejection(&server, "/app/off-key?protocol=7", 4003);
    let mut first = server.ws_path("/app/small-key?protocol=7");
    assert_eq!(first.recv()["event"], "pusher:connection_established");
    expect_rejection(&server, "/app/small-key?protocol=7", 4004);
    // A missing protocol is accepted (treated as 7) in the default lenient mode.
    let mut lenient = server.ws_path(&format!("/app/{KEY}"));
    assert_eq!(lenient.recv()["event"], "pusher:connection_established");
    // A path prefix before /app/{key} is accepted.
    let mut prefixed = server.ws_path(&format!("/ws/app/{KEY}?protocol=7"));
    assert_eq!(prefixed.recv()["event"], "pusher:connection_established");
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let mut again = server.ws_path("/app/small-key?protocol=7");
    assert_eq!(
        again.recv()["event"],
        "pusher:connection_established",
        "quota is released on disconnect"
    );
}

#[test]
fn strict_protocol_mode_answers_4008_and_capacity_4100() {
    let server = Server::with_config(&config_toml(
        "allow_missing_protocol = false\nmax_connections = 2",
        "",
        "",
    ));
    expect_rejection(&server, &format!("/app/{KEY}"), 4008);
    let _a = server.connect();
    let _b = server.connect();
    expect_rejection(&server, &format!("/app/{KEY}?protocol=7"), 4100);
}

#[test]
fn public_subscribe_confirms_with_string_data_and_is_idempotent() {
    let server = Server::start();
    let mut c = server.connect();
    let ok = c.subscribe("news");
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(ok["channel"], "news");
    assert_eq!(ok["data"], "{}");
    let again = c.subscribe("news");
    assert_eq!(again["event"], "pusher_internal:subscription_succeeded");
    let (status, body) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels/news"),
        &[("info", "subscription_count")],
        "",
    );
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        info["subscription_count"], 1,
        "a duplicate subscribe does not double-count"
    );
    // Unsubscribing an unknown channel is ignored: no reply, connection fine.
    c.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"never"}}));
    c.send_json(json!({"event":"pusher:ping"}));
    assert_eq!(c.recv()["event"], "pusher:pong");
    // Data given as a JSON string (double-encoded) is accepted too.
    c.send_json(json!({"event":"pusher:subscribe","data":"{\"channel\":\"other\"}"}));
    assert_eq!(c.recv()["channel"], "other");
}

#[test]
fn invalid_channel_names_are_refused_without_closing() {
    let server = Server::start();
    let mut c = server.connect();
    for name in ["bad name", "", &"a".repeat(165), "#server-to-user-1"] {
        let e = c.subscribe(name);
        assert_eq!(e["event"], "pusher:error", "{name}");
    }
    assert_eq!(
        c.subscribe(&"a".repeat(164))["event"],
        "pusher_internal:subscription_succeeded"
    );
}

#[test]
fn private_channels_check_signatures_and_keep_the_connection() {
    let server = Server::start();
    let mut c = server.connect();
    let ok = c.subscribe_private("private-orders");
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(ok["data"], "{}");
    c.send_json(json!({"event":"pusher:subscribe","data":{"auth":format!("{KEY}:deadbeef"),"channel":"private-other"}}));
    let e = c.recv();
    assert_eq!(e["event"], "pusher:error");
    assert!(e["data"]["code"].is_null());
    let msg = e["data"]["message"].as_str().unwrap();
    assert!(msg.starts_with("Invalid signature"), "{msg}");
    assert!(msg.contains(&format!("{}:private-other", c.socket_id)));
    c.send_json(
        json!({"event":"pusher:subscribe","data":{"auth":"wrong-key:abc","channel":"private-x"}}),
    );
    let e = c.recv();
    assert_eq!(
        e["data"]["message"],
        "Invalid key in subscription auth data: 'wrong-key'"
    );
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":"private-noauth"}}));
    assert_eq!(c.recv()["event"], "pusher:error");
    // A signature made for another socket does not work here.
    let other = server.connect();
    let stolen = other.auth_for("private-y", None);
    c.send_json(json!({"event":"pusher:subscribe","data":{"auth":stolen,"channel":"private-y"}}));
    assert_eq!(c.recv()["event"], "pusher:error");
    // Still connected; failed channels got nothing.
    server.trigger("private-other", "e", "x");
    server.trigger("private-orders", "e", "y");
    assert_eq!(c.recv()["data"], "y");
}

#[test]
fn presence_members_count_users_not_sockets() {
    let server = Server::start();
    let ch = "presence-room";
    let mut ann1 = server.connect();
    let first = ann1.subscribe_presence(ch, "ann", json!({"name":"Ann"}));
    assert_eq!(first["event"], "pusher_internal:subscription_succeeded");
    let p = data_of(&first)["presence"].clone();
    assert_eq!(
        p,
        json!({"ids":["ann"],"hash":{"ann":{"name":"Ann"}},"count":1})
    );

    let mut bob = server.connect();
    let p = data_of(&bob.subscribe_presence(ch, "bob", json!({"name":"Bob"})))["presence"].clone();
    assert_eq!(p["count"], 2);
    for id in p["ids"].as_array().unwrap() {
        assert!(
            p["hash"].get(id.as_str().unwrap()).is_some(),
            "every id is in hash"
        );
    }
    let added = ann1.recv();
    assert_eq!(added["event"], "pusher_internal:member_added");
    assert_eq!(
        data_of(&added),
        json!({"user_id":"bob","user_info":{"name":"Bob"}})
    );

    // Ann's second socket: no member_added for anyone, count unchanged.
    let mut ann2 = server.connect();
    let p =
        data_of(&ann2.subscribe_presence(ch, "ann", json!({"name":"Ann2"})))["presence"].clone();
    assert_eq!(p["count"], 2);
    assert_eq!(
        p["hash"]["ann"]["name"], "Ann",
        "the first socket's info is kept"
    );
    assert!(bob.try_recv(Duration::from_millis(300)).is_none());

    let (_, users) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels/{ch}/users"),
        &[],
        "",
    );
    let users: serde_json::Value = serde_json::from_str(&users).unwrap();
    let mut ids: Vec<&str> = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["ann", "bob"]);
    let (_, info) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels/{ch}"),
        &[("info", "user_count,subscription_count")],
        "",
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info,
        json!({"occupied":true,"user_count":2,"subscription_count":3})
    );

    // Closing one of Ann's sockets removes nobody; the last one removes her, never telling herself.
    drop(ann1);
    assert!(bob.try_recv(Duration::from_millis(300)).is_none());
    ann2.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":ch}}));
    let removed = bob.recv();
    assert_eq!(removed["event"], "pusher_internal:member_removed");
    assert_eq!(data_of(&removed), json!({"user_id":"ann"}));
    assert!(ann2.try_recv(Duration::from_millis(200)).is_none());
}

#[test]
fn presence_limits_numeric_ids_and_bad_channel_data() {
    let server = Server::with_config(&config_toml(
        "",
        "max_presence_members = 2\nmax_presence_member_size_bytes = 50",
        "",
    ));
    let ch = "presence-small";
    let mut a = server.connect();
    let p = data_of(&a.subscribe_presence(ch, "1", json!(null)))["presence"].clone();
    assert_eq!(
        p["hash"]["1"],
        serde_json::Value::Null,
        "missing user_info is written as null"
    );
    let mut b = server.connect();
    let channel_data = r#"{"user_id":2,"user_info":{"n":1}}"#;
    let auth = b.auth_for(ch, Some(channel_data));
    b.send_json(json!({"event":"pusher:subscribe","data":{"auth":auth,"channel":ch,"channel_data":channel_data}}));
    let p = data_of(&b.recv())["presence"].clone();
    assert!(
        p["ids"].as_array().unwrap().contains(&json!("2")),
        "numeric ids become strings"
    );
    let mut c = server.connect();
    let e = c.subscribe_presence(ch, "3", json!({}));
    assert_eq!(
        e["event"], "pusher:error",
        "the member limit refuses a third user"
    );
    let e = c.subscribe_presence("presence-big", "4", json!({"bio": "x".repeat(100)}));
    assert_eq!(e["event"], "pusher:error", "user_info over the size limit");
    let bad = "not json";
    let auth = c.auth_for("presence-z", Some(bad));
    c.send_json(json!({"event":"pusher:subscribe","data":{"auth":auth,"channel":"presence-z","channel_data":bad}}));
    assert_eq!(c.recv()["event"], "pusher:error");
    c.send_json(json!({"event":"pusher:ping"}));
    assert_eq!(c.recv()["event"], "pusher:pong");
}

#[test]
fn client_events_follow_the_rules() {
    let server = Server::with_config(&config_toml("", "max_client_events_per_second = 10", ""));
    let mut a = server.connect();
    let mut b = server.connect();
    let mut outsider = server.connect();
    a.subscribe_private("private-chat");
    b.subscribe_private("private-chat");
    a.send_json(json!({"event":"client-typing","channel":"private-chat","data":{"x":1}}));
    let got = b.recv();
    assert_eq!(got["event"], "client-typing");
    assert_eq!(
        got["data"], r#"{"x":1}"#,
        "object data is forwarded as a compact JSON string"
    );
    assert!(
        got.get("user_id").is_none(),
        "no user_id on private channels"
    );
    assert!(
        a.try_recv(Duration::from_millis(200)).is_none(),
        "never echoed to the sender"
    );

    outsider.send_json(json!({"event":"client-x","channel":"private-chat","data":"{}"}));
    assert_eq!(outsider.recv()["data"]["code"], 4009);
    a.subscribe("public");
    a.send_json(json!({"event":"client-x","channel":"public","data":"{}"}));
    assert_eq!(a.recv()["event"], "pusher:error");

    // Presence: user_id comes from the server's record.
    a.subscribe_presence("presence-p", "alice", json!({}));
    b.subscribe_presence("presence-p", "bob", json!({}));
    a.recv_event("pusher_internal:member_added");
    a.send_json(
        json!({"event":"client-hi","channel":"presence-p","data":"\"str\"","user_id":"forged"}),
    );
    let got = b.recv_event("client-hi");
    assert_eq!(got["user_id"], "alice");
    assert_eq!(
        got["data"], "\"str\"",
        "string data is forwarded as received"
    );

    // Rate limit: 10 per second, then 4301; the connection stays open.
    std::thread::sleep(Duration::from_millis(1100));
    for i in 0..12 {
        a.send_json(json!({"event":"client-n","channel":"private-chat","data":i.to_string()}));
    }
    let mut errors = 0;
    while let Some(m) = a.try_recv(Duration::from_millis(300)) {
        if m["event"] == "pusher:error" {
            assert_eq!(m["data"]["code"], 4301);
            errors += 1;
        }
    }
    assert!(errors >= 1, "over-rate client events are rejected");
    let mut delivered = 0;
    while let Some(m) = b.try_recv(Duration::from_millis(300)) {
        if m["event"] == "client-n" {
            delivered += 1;
        }
    }
    assert_eq!(delivered + errors, 12);
    assert!(delivered >= 10);
}

#[test]
fn client_events_can_be_switched_off_per_app() {
    let server = Server::with_config(&config_toml("", "", "").replace(
        "enable_client_messages = true",
        "enable_client_messages = false",
    ));
    let mut a = server.connect();
    a.subscribe_private("private-chat");
    a.send_json(json!({"event":"client-typing","channel":"private-chat","data":{}}));
    let e = a.recv();
    assert_eq!(e["event"], "pusher:error");
    assert!(e["data"]["message"]
        .as_str()
        .unwrap()
        .contains("not have client messaging enabled"));
}

#[test]
fn publishes_reach_subscribers_on_every_shard_exactly_once_in_order() {
    let server = Server::start();
    let mut clients: Vec<Client> = (0..24).map(|_| server.connect()).collect();
    let shards: std::collections::HashSet<u64> = clients.iter().map(Client::shard).collect();
    assert_eq!(
        shards.len(),
        2,
        "SO_REUSEPORT spread the sockets over both shards"
    );
    for c in clients.iter_mut() {
        assert_eq!(
            c.subscribe("fanout")["event"],
            "pusher_internal:subscription_succeeded"
        );
    }
    for i in 0..50 {
        let (status, _) = server.trigger("fanout", "tick", &i.to_string());
        assert_eq!(status, 200);
    }
    for c in clients.iter_mut() {
        for i in 0..50 {
            let m = c.recv();
            assert_eq!(m["event"], "tick");
            assert_eq!(m["channel"], "fanout");
            assert_eq!(m["data"], i.to_string());
        }
        assert!(
            c.try_recv(Duration::from_millis(50)).is_none(),
            "no duplicates"
        );
    }
}

#[test]
fn bad_input_gets_an_error_and_the_connection_stays_open() {
    let server = Server::start();
    let mut c = server.connect();
    c.send_text("{not json");
    assert_eq!(c.recv()["event"], "pusher:error");
    c.send_text(r#"{"no_event":1}"#);
    assert_eq!(c.recv()["event"], "pusher:error");
    c.socket
        .send(tungstenite::Message::binary(vec![1u8, 2, 3]))
        .unwrap();
    assert_eq!(c.recv()["event"], "pusher:error");
    c.send_text(&format!(
        "{{\"event\":\"client-x\",\"data\":\"{}\"}}",
        "x".repeat(70_000)
    ));
    let e = c.recv();
    assert!(
        e["data"]["message"].as_str().unwrap().contains("limit"),
        "{e}"
    );
    c.send_text(r#"{"event":"unknown:event","data":{}}"#);
    c.send_text(r#"{"event":"pusher:subscribe","data":5}"#);
    assert_eq!(c.recv()["event"], "pusher:error");
    c.send_json(json!({"event":"pusher:ping"}));
    assert_eq!(c.recv()["event"], "pusher:pong");
}

/// A raw WebSocket client that never answers pings.
fn raw_connect(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    s
}

#[test]
fn idle_connections_are_pinged_and_closed_with_4201_without_a_reply() {
    let server = Server::with_config(&config_toml(
        "activity_timeout = 1\npong_timeout = 1",
        "",
        "",
    ));
    let mut s = raw_connect(server.port);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    assert!(
        seen.windows(2).any(|w| w == [0x89, 0x00]),
        "a WebSocket ping frame was sent"
    );
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("\"code\":4201"),
        "pusher:error 4201 before the close"
    );
    let close = seen
        .windows(4)
        .any(|w| w[0] == 0x88 && w[2..4] == 4201u16.to_be_bytes());
    assert!(close, "close frame with 4201");
}

#[test]
fn answered_pings_keep_the_connection() {
    let server = Server::with_config(&config_toml(
        "activity_timeout = 1\npong_timeout = 1",
        "",
        "",
    ));
    let mut c = server.connect();
    // tungstenite answers ping frames while reading.
    assert!(c.try_recv(Duration::from_millis(3500)).is_none());
    c.send_json(json!({"event":"pusher:ping"}));
    assert_eq!(c.recv()["event"], "pusher:pong");
}

#[test]
fn slow_consumers_are_closed_with_4100() {
    let server = Server::with_config(&config_toml("max_outbound_queue_bytes = 65536", "", ""));
    let mut slow = server.connect();
    slow.subscribe("firehose");
    let mut fast = server.connect();
    fast.subscribe("firehose");
    let payload = "y".repeat(9000);
    // Far more than the kernel buffers plus the 64 KiB queue: the slow socket reads nothing.
    for _ in 0..60 {
        let batch: Vec<_> = (0..10)
            .map(|_| json!({"channel":"firehose","name":"big","data":payload}))
            .collect();
        let body = json!({ "batch": batch }).to_string();
        assert_eq!(
            server
                .api("POST", &format!("/apps/{APP_ID}/batch_events"), &[], &body)
                .0,
            200
        );
        for _ in 0..10 {
            assert_eq!(
                fast.recv()["event"],
                "big",
                "other subscribers are not held back"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut saw_error = false;
    let code = loop {
        match slow.socket.read() {
            Ok(tungstenite::Message::Text(t)) if t.contains("\"code\":4100") => saw_error = true,
            Ok(tungstenite::Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    };
    assert!(saw_error);
    assert_eq!(code, Some(4100));
}

#[test]
fn sigterm_closes_every_connection_with_4200_and_exits() {
    let mut server = Server::start();
    let mut clients: Vec<Client> = (0..6).map(|_| server.connect()).collect();
    server.signal(libc::SIGTERM);
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close(), Some(4200));
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("server exits after SIGTERM");
    assert!(status.success());
}
