#!/usr/bin/env python3
"""Rough first measurement (the real load tool is loadtest/, a later issue).

Opens N WebSocket connections to a running shardpush, subscribes each to one channel, and reports
(1) the server's marginal RSS per idle subscribed connection and (2) the time from one HTTP publish
until the last of the N subscribers has it. Loopback only; bounded; stops by itself.

usage: rough-measure.py PID PORT N [APP_ID KEY SECRET]
"""
import base64, hashlib, hmac, json, os, selectors, socket, sys, time, urllib.request

pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
app_id, key, secret = (sys.argv[4:7] + ["app-id", "app-key", "app-secret"][len(sys.argv[4:7]):])[:3]


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def frame(text):
    payload = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81, 0x80 | len(payload)]) if len(payload) < 126 else bytes([0x81, 0xFE]) + len(payload).to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def publish(channel, data):
    body = json.dumps({"name": "tick", "channel": channel, "data": data}).encode()
    params = {"auth_key": key, "auth_timestamp": str(int(time.time())), "auth_version": "1.0",
              "body_md5": hashlib.md5(body).hexdigest()}
    path = f"/apps/{app_id}/events"
    canon = "&".join(f"{k}={params[k]}" for k in sorted(params))
    sig = hmac.new(secret.encode(), f"POST\n{path}\n{canon}".encode(), hashlib.sha256).hexdigest()
    url = f"http://127.0.0.1:{port}{path}?{canon}&auth_signature={sig}"
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=10).read()


base = rss_kib()
socks = []
t0 = time.time()
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    k = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET /app/{key}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {k}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    socks.append(s)
for s in socks:
    buf = b""
    while b"connection_established" not in buf:
        buf += s.recv(4096)
    s.sendall(frame(json.dumps({"event": "pusher:subscribe", "data": {"channel": "rough"}})))
for s in socks:
    buf = b""
    while b"subscription_succeeded" not in buf:
        buf += s.recv(4096)
    s.setblocking(False)
opened = time.time() - t0
time.sleep(2)
after = rss_kib()
print(f"connections: {n}, opened+subscribed in {opened:.2f}s ({n / opened:.0f}/s)")
print(f"server RSS: {base} KiB before, {after} KiB after -> {(after - base) * 1024 / n:.0f} bytes per idle subscribed connection")

sel = selectors.DefaultSelector()
for s in socks:
    sel.register(s, selectors.EVENT_READ)
for round_ in range(5):
    pending = set(socks)
    start = time.time()
    publish("rough", f"r{round_}")
    deadline = start + 10
    while pending and time.time() < deadline:
        for keyobj, _ in sel.select(timeout=1):
            s = keyobj.fileobj
            try:
                if s.recv(65536):
                    pending.discard(s)
            except BlockingIOError:
                pass
    took = (time.time() - start) * 1000
    print(f"publish {round_}: last of {n} subscribers received after {took:.1f} ms ({len(pending)} missing)")
for s in socks:
    s.close()
