"""End-to-end over TLS (tls_cert/tls_key): the official `pusher` PyPI library with ssl=True against a
shardpush serving a certificate signed by a CA this test makes with openssl.

With ssl=True the library's requests backend always verifies against the CA bundle it ships
(`verify=CERT_PATH`, so REQUESTS_CA_BUNDLE is not consulted); the test's CA is trusted through the
library's `backend` option instead: its RequestsBackend, verifying against that CA. Deliveries are
checked with a WebSocket client over wss:// trusting the same CA.
"""
import json
import os
import ssl
import subprocess
import tempfile

import pusher
import pusher.requests
import pytest
import requests
import websocket

import shardpush_e2e

APP_ID, KEY, SECRET = "434343", "tls-py-key", "tls-py-secret"


def make_certificates(d):
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=shardpush-py-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf")
    return {name: os.path.join(d, f) for name, f in
            [("ca", "ca.pem"), ("cert", "srv.pem"), ("key", "srv.key")]}


@pytest.fixture(scope="module")
def tls():
    with tempfile.TemporaryDirectory() as d:
        files = make_certificates(d)
        toml = (f'host = "127.0.0.1"\nport = 0\nshards = 2\n'
                f'tls_cert = {json.dumps(files["cert"])}\ntls_key = {json.dumps(files["key"])}\n'
                f'[[apps]]\nid = "{APP_ID}"\nkey = "{KEY}"\nsecret = "{SECRET}"\n')
        with shardpush_e2e.running_shardpush(toml) as (_, port):
            yield port, files["ca"]


def trusting(ca):
    """The library's requests backend, verifying the server against `ca`."""

    class Backend(pusher.requests.RequestsBackend):
        def __init__(self, client, **options):
            super().__init__(client, **options)
            self.options["verify"] = ca

    return Backend


def api(port, ca=None):
    backend = trusting(ca) if ca else None
    return pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1", port=port, ssl=True,
                         backend=backend)


def wss(port, ca):
    ws = websocket.create_connection(f"wss://127.0.0.1:{port}/app/{KEY}?protocol=7&client=py",
                                     timeout=5, sslopt={"ca_certs": ca, "cert_reqs": ssl.CERT_REQUIRED})
    hello = json.loads(ws.recv())
    assert hello["event"] == "pusher:connection_established"
    return ws


def subscribe(ws, channel):
    ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": channel}}))
    reply = json.loads(ws.recv())
    assert reply["event"] == "pusher_internal:subscription_succeeded", reply


def test_trigger_over_https_reaches_a_wss_subscriber(tls):
    port, ca = tls
    ws = wss(port, ca)
    subscribe(ws, "py-tls")
    assert api(port, ca).trigger("py-tls", "update", {"text": "ünïcode ☃"}) == {}
    got = json.loads(ws.recv())
    assert got["event"] == "update" and got["channel"] == "py-tls"
    assert json.loads(got["data"]) == {"text": "ünïcode ☃"}
    ws.close()


def test_queries_and_batches_over_https(tls):
    port, ca = tls
    ws = wss(port, ca)
    subscribe(ws, "py-tls-batch")
    client = api(port, ca)
    client.trigger_batch([{"channel": "py-tls-batch", "name": "n", "data": str(i)} for i in range(5)])
    assert [json.loads(json.loads(ws.recv())["data"]) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert client.channel_info("py-tls-batch", ["subscription_count"]) == {
        "occupied": True, "subscription_count": 1}
    ws.close()


def test_the_certificate_is_checked(tls):
    port, _ = tls
    # The library's own CA bundle does not know the test's CA.
    with pytest.raises(requests.exceptions.SSLError):
        api(port).trigger("py-tls", "update", {})
    # Plain HTTP on the TLS port gets no HTTP answer.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
