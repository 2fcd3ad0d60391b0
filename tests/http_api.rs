//! The signed HTTP API against the real server (2 shards).

mod common;
use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn events_path() -> String {
    format!("/apps/{APP_ID}/events")
}

fn json_of(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

#[test]
fn trigger_forwards_data_byte_exact_and_excludes_socket_id() {
    let server = Server::start();
    let mut a = server.connect();
    let mut b = server.connect();
    a.subscribe("room");
    b.subscribe("room");
    let data = "{\"msg\":\"héllo \\\"quoted\\\" \\\\ ☃\",\"n\":1}";
    let body =
        json!({"name":"App\\Events\\Chat","channels":["room"],"data":data,"socket_id":a.socket_id})
            .to_string();
    let (status, resp) = server.api("POST", &events_path(), &[], &body);
    assert_eq!((status, resp.as_str()), (200, "{}"));
    let got = b.recv();
    assert_eq!(got["event"], "App\\Events\\Chat");
    assert_eq!(got["data"].as_str().unwrap(), data);
    assert!(
        a.try_recv(Duration::from_millis(300)).is_none(),
        "socket_id is excluded"
    );
    // Non-string data is sent on as a compact JSON string.
    let body = json!({"name":"obj","channel":"room","data":{"a":[1, 2]}}).to_string();
    assert_eq!(server.api("POST", &events_path(), &[], &body).0, 200);
    assert_eq!(b.recv()["data"], "{\"a\":[1,2]}");
}

#[test]
fn trigger_to_many_channels_with_info() {
    let server = Server::start();
    let mut a = server.connect();
    a.subscribe("c1");
    a.subscribe_presence("presence-c2", "u1", json!({}));
    let body = json!({"name":"e","channels":["c1","presence-c2","c3"],"data":"d","info":"user_count,subscription_count"}).to_string();
    let (status, resp) = server.api("POST", &events_path(), &[], &body);
    assert_eq!(status, 200);
    assert_eq!(
        json_of(&resp),
        json!({"channels":{"c1":{"subscription_count":1},"presence-c2":{"user_count":1,"subscription_count":1},"c3":{"subscription_count":0}}})
    );
    let mut got: Vec<String> = (0..2)
        .map(|_| a.recv()["channel"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    assert_eq!(got, ["c1", "presence-c2"]);
    let channels: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    let body = json!({"name":"e","channels":channels,"data":"d"}).to_string();
    assert_eq!(server.api("POST", &events_path(), &[], &body).0, 400);
}

#[test]
fn trigger_validation_errors() {
    let server = Server::start();
    let cases = [
        (json!({"channel":"a","data":"d"}), 400),
        (json!({"name":"e","channel":"a"}), 400),
        (json!({"name":"e","data":"d"}), 400),
        (json!({"name":"pusher:x","channel":"a","data":"d"}), 400),
        (json!({"name":"e","channel":"bad name","data":"d"}), 400),
        (
            json!({"name":"e","channels":["private-encrypted-a","b"],"data":"d"}),
            400,
        ),
        (
            json!({"name":"e","channel":"a","data":"d","socket_id":"abc"}),
            400,
        ),
        (
            json!({"name":"e","channel":"a","data":"x".repeat(10 * 1024 + 1)}),
            413,
        ),
        (
            json!({"name":"x".repeat(201),"channel":"a","data":"d"}),
            400,
        ),
    ];
    for (body, expected) in cases {
        let (status, resp) = server.api("POST", &events_path(), &[], &body.to_string());
        assert_eq!(status, expected, "{body} -> {resp}");
        assert!(json_of(&resp)["error"].is_string());
    }
    assert_eq!(server.api("POST", &events_path(), &[], "{not json").0, 400);
    let ok = json!({"name":"e","channel":"private-encrypted-a","data":"x".repeat(10 * 1024)});
    assert_eq!(
        server.api("POST", &events_path(), &[], &ok.to_string()).0,
        200
    );
}

#[test]
fn batch_events_in_order_with_limits_and_info() {
    let server = Server::start();
    let mut a = server.connect();
    a.subscribe("b1");
    let batch: Vec<_> = (0..10)
        .map(|i| json!({"channel":"b1","name":"e","data":i.to_string()}))
        .collect();
    let (status, resp) = server.api(
        "POST",
        &format!("/apps/{APP_ID}/batch_events"),
        &[],
        &json!({"batch":batch}).to_string(),
    );
    assert_eq!((status, resp.as_str()), (200, "{}"));
    for i in 0..10 {
        assert_eq!(a.recv()["data"], i.to_string());
    }
    let batch: Vec<_> = (0..11)
        .map(|_| json!({"channel":"b1","name":"e","data":"x"}))
        .collect();
    let (status, _) = server.api(
        "POST",
        &format!("/apps/{APP_ID}/batch_events"),
        &[],
        &json!({"batch":batch}).to_string(),
    );
    assert_eq!(status, 400);
    assert!(
        a.try_recv(Duration::from_millis(200)).is_none(),
        "a refused batch publishes nothing"
    );
    let batch = json!({"batch":[{"channel":"b1","name":"e","data":"x","info":"subscription_count"},{"channel":"b2","name":"e","data":"y"}]});
    let (status, resp) = server.api(
        "POST",
        &format!("/apps/{APP_ID}/batch_events"),
        &[],
        &batch.to_string(),
    );
    assert_eq!(status, 200);
    assert_eq!(
        json_of(&resp),
        json!({"batch":[{"subscription_count":1},{}]})
    );
}

#[test]
fn channel_queries_are_exact_across_shards() {
    let server = Server::start();
    let mut clients: Vec<Client> = (0..8).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.subscribe("pub-a");
        c.subscribe_presence("presence-x", &format!("u{}", i % 3), json!({}));
    }
    clients[0].subscribe("pub-b");
    let (_, body) = server.api("GET", &format!("/apps/{APP_ID}/channels"), &[], "");
    assert_eq!(
        json_of(&body),
        json!({"channels":{"presence-x":{},"pub-a":{},"pub-b":{}}})
    );
    let (_, body) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels"),
        &[("filter_by_prefix", "pub-"), ("info", "subscription_count")],
        "",
    );
    assert_eq!(
        json_of(&body),
        json!({"channels":{"pub-a":{"subscription_count":8},"pub-b":{"subscription_count":1}}})
    );
    let (_, body) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels"),
        &[("filter_by_prefix", "presence-"), ("info", "user_count")],
        "",
    );
    assert_eq!(
        json_of(&body),
        json!({"channels":{"presence-x":{"user_count":3}}})
    );
    let (status, _) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels"),
        &[("info", "user_count")],
        "",
    );
    assert_eq!(status, 400);
    let (_, body) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels/pub-a"),
        &[("info", "subscription_count")],
        "",
    );
    assert_eq!(
        json_of(&body),
        json!({"occupied":true,"subscription_count":8})
    );
    let (_, body) = server.api("GET", &format!("/apps/{APP_ID}/channels/empty"), &[], "");
    assert_eq!(json_of(&body), json!({"occupied":false}));
    let (status, _) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels/pub-a"),
        &[("info", "user_count")],
        "",
    );
    assert_eq!(status, 400);
    let (status, _) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels/pub-a/users"),
        &[],
        "",
    );
    assert_eq!(status, 400);
    let (_, body) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels/presence-x/users"),
        &[],
        "",
    );
    assert_eq!(json_of(&body)["users"].as_array().unwrap().len(), 3);
    drop(clients);
    std::thread::sleep(Duration::from_millis(300));
    let (_, body) = server.api("GET", &format!("/apps/{APP_ID}/channels"), &[], "");
    assert_eq!(
        json_of(&body),
        json!({"channels":{}}),
        "disconnects vacate channels"
    );
}

#[test]
fn authentication_failures() {
    let more =
        "[[apps]]\nid = \"off\"\nkey = \"off-key\"\nsecret = \"off-secret\"\nenabled = false\n";
    let server = Server::with_config(&config_toml("", "", more));
    let path = format!("/apps/{APP_ID}/channels");
    let wrong_secret = signed_query("GET", &path, &[], "", KEY, "nope");
    let (status, body) = raw_http(server.port, "GET", &format!("{path}?{wrong_secret}"), "");
    assert_eq!(status, 401);
    assert!(body.contains("Invalid signature"));
    let wrong_key = signed_query("GET", &path, &[], "", "other", SECRET);
    assert_eq!(
        raw_http(server.port, "GET", &format!("{path}?{wrong_key}"), "").0,
        401
    );
    let old = format!("auth_key={KEY}&auth_timestamp=1000&auth_version=1.0");
    let sig = shardpush::auth::hmac_sha256_hex(
        SECRET.as_bytes(),
        format!("GET\n{path}\n{old}").as_bytes(),
    );
    let (status, body) = raw_http(
        server.port,
        "GET",
        &format!("{path}?{old}&auth_signature={sig}"),
        "",
    );
    assert_eq!(status, 401);
    assert!(body.contains("Timestamp expired"));
    assert_eq!(raw_http(server.port, "GET", &path, "").0, 401);
    // body_md5 must match the body actually sent.
    let q = signed_query("POST", &events_path(), &[], "{\"a\":1}", KEY, SECRET);
    assert_eq!(
        raw_http(
            server.port,
            "POST",
            &format!("{}?{q}", events_path()),
            "{\"a\":2}"
        )
        .0,
        401
    );
    // Python sends body_md5 of the empty body on GET: accepted.
    let md5 = shardpush::auth::md5_hex(b"");
    let (status, _) = server.api("GET", &path, &[("body_md5", &md5)], "");
    assert_eq!(status, 200);
    assert_eq!(server.api("GET", "/apps/unknown/channels", &[], "").0, 404);
    let q = signed_query(
        "GET",
        "/apps/off/channels",
        &[],
        "",
        "off-key",
        "off-secret",
    );
    assert_eq!(
        raw_http(server.port, "GET", &format!("/apps/off/channels?{q}"), "").0,
        403
    );
    assert_eq!(
        server
            .api("GET", &format!("/apps/{APP_ID}/nothing"), &[], "")
            .0,
        404
    );
    assert_eq!(server.api("DELETE", &events_path(), &[], "").0, 405);
}

#[test]
fn keep_alive_bounded_bodies_and_malformed_requests() {
    let server = Server::with_config(&config_toml("max_request_body_bytes = 2048", "", ""));
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..3 {
        let path = format!("/apps/{APP_ID}/channels");
        let q = signed_query("GET", &path, &[], "", KEY, SECRET);
        s.write_all(format!("GET {path}?{q} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        let (status, body) = parse_response(&buf[..n]);
        assert_eq!((status, body.as_str()), (200, "{\"channels\":{}}"));
    }
    let big = "x".repeat(4096);
    let (status, body) = raw_http(server.port, "POST", &events_path(), &big);
    assert_eq!(status, 413);
    assert!(body.contains("limit"));
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x16\x03\x01 garbage\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    assert_eq!(parse_response(&resp).0, 400);
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(20_000));
    let _ = s.write_all(huge.as_bytes());
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    assert_eq!(parse_response(&resp).0, 431);
    assert_eq!(raw_http(server.port, "GET", "/health", "").0, 200);
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_timeout() {
    let server = Server::with_config(&config_toml("http_keep_alive_timeout = 2", "", ""));
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(parse_response(&buf[..n]).0, 200);
    // Busy connections stay: a request every half second for 2.5 s.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(500));
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let n = s.read(&mut buf).unwrap();
        assert_eq!(parse_response(&buf[..n]).0, 200);
    }
    // An idle one is closed within the timeout plus the sweeper's second.
    let started = std::time::Instant::now();
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server closed the idle connection");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn separate_api_port_serves_only_the_api() {
    let toml = config_toml("", "", "");
    let api_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = Server::with_config(&toml.replacen(
        "shards = 2",
        &format!("shards = 2\napi_port = {api_port}"),
        1,
    ));
    let path = format!("/apps/{APP_ID}/channels");
    let q = signed_query("GET", &path, &[], "", KEY, SECRET);
    assert_eq!(raw_http(api_port, "GET", &format!("{path}?{q}"), "").0, 200);
    assert_eq!(
        raw_http(server.port, "GET", &format!("{path}?{q}"), "").0,
        200
    );
}
