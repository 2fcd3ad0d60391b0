"""End-to-end: shardpush's Prometheus metrics, read with the official Python client's text-format
parser (prometheus_client) after a scripted workload, checked against what the workload did.

The workload uses the `pusher` PyPI library for the HTTP API and plain WebSocket clients.
"""
import json
import socket
import time
import urllib.error
import urllib.request

import pusher
import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

import shardpush_e2e

APP_A, KEY_A, SECRET_A = "1001", "key-a", "secret-a"
APP_B, KEY_B, SECRET_B = "1002", "key-b", "secret-b"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    metrics_port = free_port()
    toml = f"""host = "127.0.0.1"
port = 0
shards = 2
metrics_port = {metrics_port}
[[apps]]
id = "{APP_A}"
key = "{KEY_A}"
secret = "{SECRET_A}"
enable_client_messages = true
max_client_events_per_second = 1
[[apps]]
id = "{APP_B}"
key = "{KEY_B}"
secret = "{SECRET_B}"
"""
    with shardpush_e2e.running_shardpush(toml) as (_, port):
        yield port, metrics_port


def scrape(metrics_port):
    """Every sample of a scrape, by (name, frozenset of labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def recv_until(sock, event):
    """The raw bytes of the next message of `event` on `sock`, skipping the others."""
    while True:
        raw = sock.ws.recv()
        if json.loads(raw)["event"] == event:
            return raw.encode()


def settle():
    """Lets the shards finish handling what the clients sent (their counts are then final)."""
    time.sleep(0.3)


def test_metrics_match_a_scripted_workload(server):
    port, metrics_port = server
    api_a = shardpush_e2e.http_api(port, APP_A, KEY_A, SECRET_A)
    before = scrape(metrics_port)
    assert value(before, "shardpush_ready") == 1
    assert value(before, "shardpush_shards") == 2
    assert value(before, "shardpush_connections", app=APP_A) == 0
    assert value(before, "process_resident_memory_bytes") > 0

    a1 = shardpush_e2e.Socket(port, KEY_A, SECRET_A)
    a2 = shardpush_e2e.Socket(port, KEY_A, SECRET_A)
    a3 = shardpush_e2e.Socket(port, KEY_A, SECRET_A)
    b1 = shardpush_e2e.Socket(port, KEY_B, SECRET_B)
    for s in (a1, a2):
        s.subscribe("news")
        s.subscribe("private-chat")
    a3.subscribe("presence-room", user_id="u1")
    b1.subscribe("b-news")
    # A connection refused at admission: an unknown key (4001).
    refused = websocket.create_connection(f"ws://127.0.0.1:{port}/app/no-such-key?protocol=7", timeout=5)
    assert json.loads(refused.recv())["event"] == "pusher:error"
    refused.close()

    # HTTP API: 5 single events, one batch of 3, a channel list, a bad signature, an unknown app.
    for i in range(5):
        api_a.trigger("news", "tick", str(i))
    api_a.trigger_batch([{"channel": "news", "name": "batch", "data": str(i)} for i in range(3)])
    assert set(api_a.channels_info()["channels"]) == {"news", "private-chat", "presence-room"}
    wrong = shardpush_e2e.http_api(port, APP_A, KEY_A, "not-the-secret")
    with pytest.raises(pusher.errors.PusherBadAuth):
        wrong.trigger("news", "tick", "x")
    unknown = shardpush_e2e.http_api(port, "9999", KEY_A, SECRET_A)
    with pytest.raises(pusher.errors.PusherError):
        unknown.trigger("news", "tick", "x")

    # Client events at 1 per second: the first of three goes, the next two hit the limit.
    for i in range(3):
        a1.send({"event": "client-typing", "channel": "private-chat", "data": {"n": i}})
    recv_until(a2, "client-typing")
    settle()
    during = scrape(metrics_port)

    assert value(during, "shardpush_connections", app=APP_A) == 3
    assert value(during, "shardpush_connections", app=APP_B) == 1
    assert value(during, "shardpush_connections_opened_total") - value(before, "shardpush_connections_opened_total") == 4
    assert value(during, "shardpush_connections_refused_total", code="4001") == 1
    assert value(during, "shardpush_subscriptions", app=APP_A) == 5
    assert value(during, "shardpush_subscriptions", app=APP_B) == 1
    assert value(during, "shardpush_channels", app=APP_A) == 3
    assert value(during, "shardpush_channels", app=APP_B) == 1
    assert value(during, "shardpush_presence_members", app=APP_A) == 1
    assert value(during, "shardpush_events_published_total") == 8
    assert value(during, "shardpush_http_requests_total", route="events", status="200") == 5
    assert value(during, "shardpush_http_requests_total", route="batch_events", status="200") == 1
    assert value(during, "shardpush_http_requests_total", route="channels", status="200") == 1
    assert value(during, "shardpush_http_requests_total", route="events", status="401") == 1
    assert value(during, "shardpush_http_requests_total", route="events", status="404") == 1
    assert value(during, "shardpush_client_events_total") == 1
    assert value(during, "shardpush_client_events_rate_limited_total") == 2
    # 4 subscribes in app A, 1 presence subscribe, 1 in app B, 3 client events.
    assert value(during, "shardpush_client_messages_total") == 9
    for shard in ("0", "1"):
        assert value(during, "shardpush_mesh_queue_depth", shard=shard) == 0

    # One more event to the two subscribers of "news": exactly two frames, and the bytes of
    # exactly those two frames (a server frame under 126 bytes has a 2-byte header).
    api_a.trigger("news", "exact", "x")
    # Before it, a1 and a2 have the earlier events (and a1 its rate-limit errors) to read.
    frames = [recv_until(s, "exact") for s in (a1, a2)]
    assert frames[0] == frames[1] and len(frames[0]) < 126
    sent = 2 + len(frames[0])
    settle()
    after = scrape(metrics_port)
    delta = lambda name: value(after, name) - value(during, name)
    assert delta("shardpush_frames_delivered_total") == 2
    assert delta("shardpush_websocket_sent_bytes_total") == 2 * sent
    assert delta("shardpush_events_published_total") == 1

    # The presence member leaves with a clean close: its channel and member are gone, and the
    # close is counted by its code.
    a3.ws.close(status=1000)
    time.sleep(0.5)
    closed = scrape(metrics_port)
    assert value(closed, "shardpush_connections", app=APP_A) == 2
    assert value(closed, "shardpush_presence_members", app=APP_A) == 0
    assert value(closed, "shardpush_channels", app=APP_A) == 2
    assert value(closed, "shardpush_connections_closed_total", code="1000") == 1
    for s in (a1, a2, b1):
        s.close()


def test_health_on_both_ports(server):
    port, metrics_port = server
    for p in (port, metrics_port):
        for path in ("/up", "/ready"):
            with urllib.request.urlopen(f"http://127.0.0.1:{p}{path}", timeout=5) as r:
                assert (r.status, r.read()) == (200, b"OK")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/elsewhere", timeout=5)
    assert e.value.code == 404
