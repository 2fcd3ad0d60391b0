"""What the Python end-to-end tests share: starting a shardpush, the `pusher` library's HTTP API
client of it, and a raw Pusher protocol client.

running_shardpush: starts a shardpush of the test's own with the given TOML configuration (port 0:
any free port) and gives (process, port) once it listens; stops it on leaving. SHARDPUSH_BIN names
the binary (default: the debug build).
"""
import contextlib
import hashlib
import hmac
import json
import os
import re
import subprocess
import tempfile

import pusher
import pytest
import websocket

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def running_shardpush(toml):
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "config.toml")
        with open(config, "w") as f:
            f.write(toml)
        binary = os.environ.get("SHARDPUSH_BIN", os.path.join(ROOT, "target", "debug", "shardpush"))
        proc = subprocess.Popen([binary, "--config", config], stdout=subprocess.PIPE, text=True)
        try:
            port = None
            for line in proc.stdout:
                m = re.search(r"listening on \S+:(\d+)", line)
                if m:
                    port = int(m.group(1))
                    break
            assert port, "server did not start"
            yield proc, port
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def http_api(port, app_id, key, secret):
    """The `pusher` library's client of app `app_id` on the shardpush at `port` (plain HTTP)."""
    return pusher.Pusher(app_id=app_id, key=key, secret=secret, host="127.0.0.1", port=port, ssl=False)


def api_fixture(app_id, key, secret):
    """A module-scoped fixture `api`: http_api of the app on the port the module's `server` fixture gives.

    Used as `api = shardpush_e2e.api_fixture(APP_ID, KEY, SECRET)` in a test module.
    """

    @pytest.fixture(scope="module")
    def api(server):
        return http_api(server, app_id, key, secret)

    return api


class Socket:
    """A raw Pusher protocol client of app `key` (signing with `secret`) on a shardpush at `port`."""

    def __init__(self, port, key, secret):
        self.key, self.secret = key, secret
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}/app/{key}?protocol=7&client=py", timeout=5)
        hello = self.recv()
        assert hello["event"] == "pusher:connection_established"
        self.socket_id = json.loads(hello["data"])["socket_id"]

    def recv(self):
        return json.loads(self.ws.recv())

    def send(self, message):
        self.ws.send(json.dumps(message))

    def subscribe(self, channel, channel_data=None, *, user_id=None):
        """Subscribes (signed for private and presence channels) and returns the success reply.

        A presence channel's member is given as the `channel_data` JSON text, or by `user_id`
        alone, who joins with `{"via": "py"}` as user info.
        """
        if user_id:
            channel_data = json.dumps({"user_id": user_id, "user_info": {"via": "py"}})
        data = {"channel": channel}
        if channel.startswith(("private-", "presence-")):
            to_sign = f"{self.socket_id}:{channel}" + (f":{channel_data}" if channel_data else "")
            sig = hmac.new(self.secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
            data["auth"] = f"{self.key}:{sig}"
        if channel_data:
            data["channel_data"] = channel_data
        self.send({"event": "pusher:subscribe", "data": data})
        reply = self.recv()
        assert reply["event"] == "pusher_internal:subscription_succeeded", reply
        return reply

    def close(self):
        self.ws.close()
