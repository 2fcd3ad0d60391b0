"""End-to-end: a real shardpush's webhooks, received by a real HTTP server in this process and
checked with the official `pusher` PyPI library (`Pusher.validate_webhook`).

The server is driven by plain WebSocket clients speaking the Pusher protocol and by the `pusher`
library's HTTP triggers.
"""
import functools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pusher
import pytest

import shardpush_e2e

# pusher-http-python only accepts numeric app ids.
APP_ID, KEY, SECRET = "424243", "py-wh-key", "py-wh-secret"
# A raw Pusher protocol client of the app: Socket(port).
Socket = functools.partial(shardpush_e2e.Socket, key=KEY, secret=SECRET)
TYPES = ["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event", "cache_miss"]
# The 3-second rule: a departure's webhook must not come before this (a margin under 3 s)...
NOT_BEFORE = 2.5
# ...and must have come by this.
BY = 5.0


class Receiver:
    """Webhook requests as received: raw body, headers, arrival time; every one validated."""

    def __init__(self):
        self.requests = []
        self.problems = []
        self.cond = threading.Condition()
        self.validator = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.record(self.path, dict(self.headers), raw.decode("utf-8"))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def record(self, path, headers, body):
        now = time.time()
        headers = {k.lower(): v for k, v in headers.items()}
        problems = []
        data = self.validator.validate_webhook(
            key=headers.get("x-pusher-key", ""), signature=headers.get("x-pusher-signature", ""), body=body
        )
        if not isinstance(data, dict):
            problems.append("validate_webhook refused it")
        if headers.get("content-type") != "application/json":
            problems.append("content-type is not exactly application/json")
        if headers.get("x-pusher-key") != KEY:
            problems.append("wrong X-Pusher-Key")
        if not re.fullmatch(r"\S+", headers.get("x-shardpush-webhook-id", "")):
            problems.append("no X-Shardpush-Webhook-Id")
        body_json = json.loads(body)
        if not (-0.1 <= now - body_json["time_ms"] / 1000 <= 2):
            problems.append("time_ms is not close to now")
        with self.cond:
            self.problems += [f"{p}: {path} {headers} {body}" for p in problems]
            self.requests.append({"at": now, "path": path, "headers": headers, "body": body_json})
            self.cond.notify_all()

    def events(self, channel=None):
        """(arrival time, event) in arrival order, of one channel or all."""
        with self.cond:
            return [
                (r["at"], e)
                for r in self.requests
                for e in r["body"]["events"]
                if channel is None or e["channel"] == channel
            ]

    def wait(self, channel, n, timeout=5.0, settle=0.4):
        """Exactly the `n` events of `channel` once they are all there (and `settle` s later)."""
        deadline = time.time() + timeout
        with self.cond:
            while len(self.events(channel)) < n:
                left = deadline - time.time()
                assert left > 0, f"wanted {n} events of {channel}, got {self.events(channel)}"
                self.cond.wait(left)
        time.sleep(settle)
        got = self.events(channel)
        assert len(got) == n, f"exactly {n} events of {channel}: {got}"
        assert self.problems == []
        return got

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def by_name(events):
    """The events of (arrival time, event) pairs, in a fixed order (for comparing as sets)."""
    return sorted((e for _, e in events), key=lambda e: json.dumps(e, sort_keys=True))


def frame_of(message):
    return message["event"], message.get("channel")


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()
    assert r.problems == []


@pytest.fixture(scope="module")
def server(receiver):
    toml = (
        'host = "127.0.0.1"\nport = 0\nshards = 2\n'
        f'[[apps]]\nid = "{APP_ID}"\nkey = "{KEY}"\nsecret = "{SECRET}"\n'
        "enable_client_messages = true\n"
        f'[[apps.webhooks]]\nurl = "http://127.0.0.1:{receiver.port}/py-hook"\n'
        f"event_types = {json.dumps(TYPES)}\n"
    )
    with shardpush_e2e.running_shardpush(toml) as (_, port):
        yield port


api = shardpush_e2e.api_fixture(APP_ID, KEY, SECRET)


def test_presence_lifecycle_with_client_event_and_the_3_second_delay(server, receiver):
    ch = "presence-py-room"
    ann = Socket(server)
    ann.subscribe(ch, user_id="py-ann")
    assert by_name(receiver.wait(ch, 2)) == by_name([
        (0, {"name": "channel_occupied", "channel": ch}),
        (0, {"name": "member_added", "channel": ch, "user_id": "py-ann"}),
    ])
    bob = Socket(server)
    bob.subscribe(ch, user_id="py-bob")
    assert ann.recv()["event"] == "pusher_internal:member_added"
    assert [e for _, e in receiver.wait(ch, 3)][2:] == [{"name": "member_added", "channel": ch, "user_id": "py-bob"}]

    # A client event with object data (sent with Python's spacing): the webhook has its
    # compact JSON text, the sender's socket id and its presence user id.
    ann.send({"event": "client-hello", "channel": ch, "data": {"msg": "hi ☃", "n": 1}})
    got = bob.recv()
    assert (got["event"], got["channel"], got["user_id"]) == ("client-hello", ch, "py-ann")
    assert [e for _, e in receiver.wait(ch, 4)][3:] == [{
        "name": "client_event", "channel": ch, "event": "client-hello",
        "data": '{"msg":"hi ☃","n":1}', "socket_id": ann.socket_id, "user_id": "py-ann",
    }]

    # Both leave: member_removed for each and channel_vacated, after the 3 s delay.
    left = time.time()
    ann.close()
    bob.close()
    time.sleep(NOT_BEFORE)
    assert len(receiver.events(ch)) == 4, "nothing before the delay"
    departures = receiver.wait(ch, 7, timeout=BY - NOT_BEFORE, settle=0.8)[4:]
    assert by_name(departures) == by_name([
        (0, {"name": "member_removed", "channel": ch, "user_id": "py-ann"}),
        (0, {"name": "member_removed", "channel": ch, "user_id": "py-bob"}),
        (0, {"name": "channel_vacated", "channel": ch}),
    ])
    for at, _ in departures:
        assert NOT_BEFORE <= at - left <= BY, f"departure webhook {at - left:.2f} s after the leave"


def test_private_client_event_has_no_user_id(server, receiver):
    ch = "private-py-chat"
    a, b = Socket(server), Socket(server)
    a.subscribe(ch)
    b.subscribe(ch)
    a.send({"event": "client-note", "channel": ch, "data": "just \"text\""})
    got = b.recv()
    assert (got["event"], got["data"]) == ("client-note", 'just "text"')
    assert "user_id" not in got
    # One event a request, sent concurrently: their arrival order is not the events' order.
    assert by_name(receiver.wait(ch, 2)) == by_name([
        (0, {"name": "channel_occupied", "channel": ch}),
        (0, {"name": "client_event", "channel": ch, "event": "client-note", "data": 'just "text"', "socket_id": a.socket_id}),
    ])
    a.close()
    b.close()


def test_cache_miss_once_per_window_and_none_for_a_cached_channel(server, receiver, api):
    miss = "cache-py-miss"
    first = Socket(server)
    first.subscribe(miss)
    assert frame_of(first.recv()) == ("pusher:cache_miss", miss)
    assert by_name(receiver.wait(miss, 2)) == by_name([
        (0, {"name": "channel_occupied", "channel": miss}),
        (0, {"name": "cache_miss", "channel": miss}),
    ])
    # A second subscriber within the window: the client hears of the miss, no webhook does.
    second = Socket(server)
    second.subscribe(miss)
    assert frame_of(second.recv()) == ("pusher:cache_miss", miss)
    receiver.wait(miss, 2)

    # A channel with an event cached by the HTTP API: the subscriber gets it, no cache_miss.
    hit = "cache-py-hit"
    api.trigger(hit, "snapshot", {"v": 1})
    third = Socket(server)
    third.subscribe(hit)
    replay = third.recv()
    assert replay["event"] == "snapshot" and json.loads(replay["data"]) == {"v": 1}
    assert [e for _, e in receiver.wait(hit, 1)] == [{"name": "channel_occupied", "channel": hit}]
    for s in (first, second, third):
        s.close()
