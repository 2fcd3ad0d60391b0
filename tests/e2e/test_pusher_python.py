"""End-to-end: the official `pusher` PyPI library against a real shardpush (2 shards).

Deliveries are checked with a plain WebSocket client speaking the Pusher protocol.
"""
import functools
import json

import pusher
import pytest
import websocket

import shardpush_e2e

# pusher-http-python only accepts numeric app ids.
APP_ID, KEY, SECRET = "424242", "py-key", "py-secret"
# A raw Pusher protocol client of the app: Socket(port).
Socket = functools.partial(shardpush_e2e.Socket, key=KEY, secret=SECRET)


@pytest.fixture(scope="module")
def server():
    toml = f'host = "127.0.0.1"\nport = 0\nshards = 2\n[[apps]]\nid = "{APP_ID}"\nkey = "{KEY}"\nsecret = "{SECRET}"\n'
    with shardpush_e2e.running_shardpush(toml) as (_, port):
        yield port


api = shardpush_e2e.api_fixture(APP_ID, KEY, SECRET)


def test_trigger_reaches_subscriber_byte_exact(server, api):
    s = Socket(server)
    s.subscribe("py-news")
    assert api.trigger("py-news", "update", {"text": "ünïcode ☃"}) == {}
    got = s.recv()
    assert got["event"] == "update" and got["channel"] == "py-news"
    assert json.loads(got["data"]) == {"text": "ünïcode ☃"}


def test_trigger_batch_in_order(server, api):
    s = Socket(server)
    s.subscribe("py-batch")
    api.trigger_batch([{"channel": "py-batch", "name": "n", "data": str(i)} for i in range(5)])
    assert [json.loads(s.recv()["data"]) for _ in range(5)] == [0, 1, 2, 3, 4]


def test_channel_queries_with_python_get_signing(server, api):
    """pusher-http-python sends body_md5 of the empty body on GET: it must be accepted."""
    s = Socket(server)
    s.subscribe("py-info")
    channel_data = json.dumps({"user_id": "42", "user_info": {"n": 1}})
    s.subscribe("presence-py", channel_data)
    assert api.channel_info("py-info", ["subscription_count"]) == {"occupied": True, "subscription_count": 1}
    assert api.channels_info(prefix_filter="presence-", attributes=["user_count"]) == {
        "channels": {"presence-py": {"user_count": 1}}
    }
    assert api.users_info("presence-py") == {"users": [{"id": "42"}]}


def test_errors_surface_as_exceptions(server, api):
    with pytest.raises(pusher.errors.PusherBadRequest):
        api.channel_info("py-info", ["user_count"])
    bad = shardpush_e2e.http_api(server, APP_ID, KEY, "wrong")
    with pytest.raises(pusher.errors.PusherBadAuth):
        bad.trigger("x", "e", "d")


def signed_in(port, api, user_id):
    """A raw socket signed in with the library's authenticate_user (Python's own JSON spacing)."""
    s = Socket(port)
    auth = api.authenticate_user(s.socket_id, {"id": user_id, "user_info": {"via": "python"}})
    s.ws.send(json.dumps({"event": "pusher:signin", "data": auth}))
    reply = s.recv()
    assert reply["event"] == "pusher:signin_success", reply
    assert reply["data"]["user_data"] == auth["user_data"]
    return s


def test_send_to_user_then_terminate_user_connections(server, api):
    """terminate_user_connections posts to /users/{id}/... without the /apps prefix."""
    first, second = signed_in(server, api, "py-user"), signed_in(server, api, "py-user")
    other = signed_in(server, api, "py-other")
    api.send_to_user("py-user", "note", {"n": 1})
    for s in (first, second):
        got = s.recv()
        assert (got["event"], got["channel"]) == ("note", "#server-to-user-py-user")
        assert json.loads(got["data"]) == {"n": 1}

    assert api.terminate_user_connections("py-user") == {}
    for s in (first, second):
        err = s.recv()
        assert err["event"] == "pusher:error" and err["data"]["code"] == 4009, err
        opcode, frame = s.ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(frame[:2], "big") == 4009
    other.ws.send(json.dumps({"event": "pusher:ping"}))
    assert other.recv()["event"] == "pusher:pong"


def test_channel_info_with_cache(server, api):
    api.trigger("cache-py", "snapshot", {"v": 3})
    s = Socket(server)
    s.subscribe("cache-py")
    replay = s.recv()
    assert replay["event"] == "snapshot" and json.loads(replay["data"]) == {"v": 3}
    info = api.channel_info("cache-py", ["subscription_count", "cache"])
    assert info["occupied"] is True and info["subscription_count"] == 1
    assert info["cache"]["event"] == "snapshot"
    assert json.loads(info["cache"]["data"]) == {"v": 3}
    assert 0 < info["cache"]["ttl"] <= 1800


def test_raw_protocol_5_client_with_the_ios_subprotocol(server):
    """Java sends pusher:ping without data on protocol 5; iOS asks for the subprotocol."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{server}/app/{KEY}?protocol=5&client=java",
        subprotocols=["pusher-channels-protocol-7"],
        timeout=5,
    )
    assert ws.subprotocol == "pusher-channels-protocol-7"
    hello = json.loads(ws.recv())
    assert hello["event"] == "pusher:connection_established"
    assert isinstance(hello["data"], str)
    ws.send('{"event": "pusher:ping"}')
    assert json.loads(ws.recv()) == {"event": "pusher:pong", "data": "{}"}
    ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "p5"}}))
    assert json.loads(ws.recv())["event"] == "pusher_internal:subscription_succeeded"
    ws.close()
