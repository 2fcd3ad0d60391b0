//! Webhook delivery against a real HTTP receiver: retries, refusals, an outage of the
//! receiver, batching and the memory bound. (The event bodies, the official validators, the
//! 3-second rule and TLS are in tests/e2e: webhooks.test.js and test_webhooks_python.py.)

mod common;

use common::webhook_receiver::{Hook, Receiver, Reply};
use common::*;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

/// The test app with one webhook to `receiver` for the given event types.
fn server_for(receiver: &Receiver, types: &str, app_extra: &str, top: &str) -> Server {
    let hook = format!(
        "{app_extra}\n[[apps.webhooks]]\nurl = \"{}\"\nevent_types = [{types}]\n",
        receiver.url()
    );
    Server::with_config(&config_toml(top, &hook, ""))
}

/// The channels of the `channel_occupied` events in requests answered with a 2xx.
fn delivered_occupied(hooks: &[Hook]) -> Vec<String> {
    hooks
        .iter()
        .filter(|h| h.status.is_some_and(|s| (200..300).contains(&s)))
        .flat_map(|h| h.events())
        .filter(|e| e["name"] == "channel_occupied")
        .map(|e| e["channel"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn failed_attempts_are_retried_with_backoff_and_the_same_request_until_delivered() {
    let receiver = Receiver::start();
    // 500, a connection dropped without an answer, 429, 503, then 200.
    receiver.script(&[
        Reply::Status(500),
        Reply::Drop,
        Reply::Status(429),
        Reply::Status(503),
    ]);
    let server = server_for(&receiver, "\"channel_occupied\"", "", "");
    let mut client = server.ws();
    client.subscribe("retried");
    let hooks = receiver.wait_until("5 attempts", Duration::from_secs(30), |h| h.len() >= 5);
    assert_eq!(hooks[4].status, Some(200));
    let first = &hooks[0];
    assert!(first.is_signed_by(KEY, SECRET));
    let id = first.header("x-shardpush-webhook-id").expect("id header");
    for hook in &hooks[1..] {
        assert_eq!(hook.body, first.body, "every attempt sends the same body");
        assert_eq!(hook.header("x-shardpush-webhook-id"), Some(id));
        assert!(hook.is_signed_by(KEY, SECRET));
    }
    // Backoff: 1 s, 2 s, 4 s, 8 s between attempts (less a little for scheduling).
    for (i, want) in [1.0f64, 2.0, 4.0, 8.0].iter().enumerate() {
        let gap = hooks[i + 1].at.duration_since(hooks[i].at).as_secs_f64();
        assert!(
            gap >= want * 0.9 && gap < want + 1.5,
            "attempt {} came {gap:.2} s after the one before, expected about {want} s",
            i + 2
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(receiver.received().len(), 5, "nothing after the 2xx");
}

#[test]
fn a_webhook_refused_with_a_4xx_is_not_retried_and_the_next_one_goes() {
    let receiver = Receiver::start();
    receiver.script(&[Reply::Status(400)]);
    let server = server_for(&receiver, "\"channel_occupied\"", "", "");
    let mut client = server.ws();
    client.subscribe("refused");
    receiver.wait_until("the refused attempt", Duration::from_secs(10), |h| {
        h.len() == 1
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(receiver.received().len(), 1, "a 400 is not retried");
    client.subscribe("accepted");
    let hooks = receiver.wait_until("the next webhook", Duration::from_secs(10), |h| {
        h.len() == 2
    });
    assert_eq!(delivered_occupied(&hooks), ["accepted"]);
}

#[test]
fn a_receiver_down_for_20_seconds_gets_every_webhook_once_it_is_back() {
    let receiver = Receiver::start();
    let port = receiver.port;
    let server = server_for(&receiver, "\"channel_occupied\"", "", "");
    receiver.stop();
    let mut client = server.ws();
    let channels: BTreeSet<String> = (0..40).map(|i| format!("outage-{i}")).collect();
    for channel in &channels {
        client.subscribe(channel);
    }
    std::thread::sleep(Duration::from_secs(20));
    let receiver = Receiver::start_on(port);
    // Made at 0 s and refused since, the last retries come at 31 s (1+2+4+8+16).
    let hooks = receiver.wait_until("every webhook", Duration::from_secs(40), |h| {
        delivered_occupied(h).len() >= channels.len()
    });
    let delivered = delivered_occupied(&hooks);
    assert_eq!(delivered.len(), channels.len(), "each exactly once");
    assert_eq!(delivered.into_iter().collect::<BTreeSet<_>>(), channels);
    assert!(hooks.iter().all(|h| h.is_signed_by(KEY, SECRET)));
}

#[test]
fn with_batching_events_share_requests_and_without_it_each_has_its_own() {
    for batch in [true, false] {
        let receiver = Receiver::start();
        let app_extra = format!("batch_webhooks = {batch}");
        let server = server_for(&receiver, "\"channel_occupied\"", &app_extra, "");
        let mut client = server.ws();
        // Sent in one write: the subscriptions are handled within the batch window.
        let channels: Vec<String> = (0..30).map(|i| format!("batch-{i}")).collect();
        for channel in &channels {
            client.send_json(serde_json::json!({
                "event": "pusher:subscribe", "data": {"channel": channel}
            }));
        }
        let hooks = receiver.wait_until("30 events", Duration::from_secs(10), |h| {
            delivered_occupied(h).len() == 30
        });
        assert!(hooks.iter().all(|h| h.is_signed_by(KEY, SECRET)));
        let sizes: Vec<usize> = hooks.iter().map(|h| h.events().len()).collect();
        if batch {
            assert!(
                sizes.len() < 30 && sizes.iter().any(|&n| n > 1),
                "batched: {sizes:?}"
            );
        } else {
            assert!(sizes.iter().all(|&n| n == 1), "not batched: {sizes:?}");
        }
    }
}

#[test]
fn events_over_max_pending_are_dropped_counted_and_logged() {
    let receiver = Receiver::start();
    let port = receiver.port;
    receiver.stop();
    let hook = format!(
        "[[apps.webhooks]]\nurl = \"http://127.0.0.1:{port}/webhooks\"\n\
         event_types = [\"channel_occupied\"]\n"
    );
    let toml = config_toml("[webhooks]\nmax_pending = 5", &hook, "");
    let (server, stderr) = Server::spawn(&toml, &[], Stdio::piped());
    let mut lines = BufReader::new(stderr.expect("piped")).lines();
    let mut client = server.ws();
    for i in 0..12 {
        client.subscribe(&format!("bounded-{i}"));
    }
    let logged = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("events dropped so far"));
    let line = logged.expect("the drop is logged");
    assert!(line.contains("max_pending"), "{line}");
    std::thread::spawn(move || for _ in lines {});
    // The 5 held are delivered once the receiver is back; the 7 others were dropped.
    let receiver = Receiver::start_on(port);
    let hooks = receiver.wait_until("the 5 held", Duration::from_secs(20), |h| {
        delivered_occupied(h).len() >= 5
    });
    std::thread::sleep(Duration::from_secs(2));
    let delivered = delivered_occupied(&receiver.received());
    assert_eq!(delivered.len(), 5, "{hooks:?}");
}

#[test]
fn a_server_stopping_sends_what_is_pending_before_it_exits() {
    let receiver = Receiver::start();
    let types = "\"channel_occupied\", \"channel_vacated\"";
    let mut server = server_for(&receiver, types, "", "");
    let mut client = server.ws();
    client.subscribe("stopping");
    receiver.wait_until("occupied", Duration::from_secs(10), |h| {
        delivered_occupied(h) == ["stopping"]
    });
    // The drain closes the connection; its vacate does not wait out the 3 s at exit.
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let vacated: Vec<_> = receiver
        .received()
        .iter()
        .flat_map(|h| h.events())
        .filter(|e| e["name"] == "channel_vacated")
        .collect();
    assert_eq!(vacated.len(), 1, "sent before the process exited");
    assert_eq!(vacated[0]["channel"], "stopping");
}
