// shardpush debug console. The app's secret stays in this page: each request is signed here with
// it, exactly as Pusher's HTTP API is signed (HMAC-SHA256 of "METHOD\npath\nsorted query", with
// body_md5 for a body). SHA-256 and MD5 are computed in plain JavaScript, because WebCrypto is
// missing on pages served over plain HTTP from another host, and has no MD5 at all.
"use strict";

// ---- hashing ------------------------------------------------------------------------------

const utf8 = (text) => new TextEncoder().encode(text);
const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
const ror = (x, n) => (x >>> n) | (x << (32 - n));
const rol = (x, n) => (x << n) | (x >>> (32 - n));

// The message with the 0x80 byte, zeros, and its bit length in the last 8 bytes.
function padded(bytes, bigEndian) {
  const out = new Uint8Array(((bytes.length + 9 + 63) >> 6) << 6);
  out.set(bytes);
  out[bytes.length] = 0x80;
  const view = new DataView(out.buffer);
  const bits = bytes.length * 8;
  const low = bits >>> 0;
  const high = Math.floor(bits / 4294967296);
  if (bigEndian) {
    view.setUint32(out.length - 8, high);
    view.setUint32(out.length - 4, low);
  } else {
    view.setUint32(out.length - 8, low, true);
    view.setUint32(out.length - 4, high, true);
  }
  return view;
}

const SHA256_K = [
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

function sha256(bytes) {
  const view = padded(bytes, true);
  const h = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
  const w = new Uint32Array(64);
  for (let off = 0; off < view.byteLength; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(off + i * 4);
    for (let i = 16; i < 64; i++) {
      const s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, k] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (k + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + SHA256_K[i] + w[i]) >>> 0;
      const t2 = ((ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      k = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    [a, b, c, d, e, f, g, k].forEach((v, i) => { h[i] = (h[i] + v) >>> 0; });
  }
  const out = new DataView(new ArrayBuffer(32));
  h.forEach((v, i) => out.setUint32(i * 4, v));
  return new Uint8Array(out.buffer);
}

function hmacSha256(key, message) {
  let block = key.length > 64 ? sha256(key) : key;
  const full = new Uint8Array(64);
  full.set(block);
  const inner = new Uint8Array(64 + message.length);
  const outer = new Uint8Array(64 + 32);
  for (let i = 0; i < 64; i++) {
    inner[i] = full[i] ^ 0x36;
    outer[i] = full[i] ^ 0x5c;
  }
  inner.set(message, 64);
  outer.set(sha256(inner), 64);
  return sha256(outer);
}

const MD5_S = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];
const MD5_T = Array.from({ length: 64 }, (_, i) => Math.floor(Math.abs(Math.sin(i + 1)) * 4294967296) >>> 0);

function md5(bytes) {
  const view = padded(bytes, false);
  let a0 = 0x67452301, b0 = 0xefcdab89, c0 = 0x98badcfe, d0 = 0x10325476;
  const m = new Uint32Array(16);
  for (let off = 0; off < view.byteLength; off += 64) {
    for (let i = 0; i < 16; i++) m[i] = view.getUint32(off + i * 4, true);
    let a = a0, b = b0, c = c0, d = d0;
    for (let i = 0; i < 64; i++) {
      let f, g;
      if (i < 16) { f = (b & c) | (~b & d); g = i; }
      else if (i < 32) { f = (d & b) | (~d & c); g = (5 * i + 1) % 16; }
      else if (i < 48) { f = b ^ c ^ d; g = (3 * i + 5) % 16; }
      else { f = c ^ (b | ~d); g = (7 * i) % 16; }
      f = (f + a + MD5_T[i] + m[g]) >>> 0;
      a = d; d = c; c = b;
      b = (b + rol(f, MD5_S[(i >> 4) * 4 + (i % 4)])) >>> 0;
    }
    a0 = (a0 + a) >>> 0; b0 = (b0 + b) >>> 0; c0 = (c0 + c) >>> 0; d0 = (d0 + d) >>> 0;
  }
  const out = new DataView(new ArrayBuffer(16));
  [a0, b0, c0, d0].forEach((v, i) => out.setUint32(i * 4, v, true));
  return new Uint8Array(out.buffer);
}

// ---- signed requests ----------------------------------------------------------------------

let app = null; // { id, key, secret }

function signedTarget(method, path, params, body) {
  const query = Object.assign({}, params, {
    auth_key: app.key,
    auth_timestamp: String(Math.floor(Date.now() / 1000)),
    auth_version: "1.0",
  });
  if (body) query.body_md5 = hex(md5(utf8(body)));
  const names = Object.keys(query).sort();
  const canonical = names.map((n) => `${n}=${query[n]}`).join("&");
  const signature = hex(hmacSha256(utf8(app.secret), utf8(`${method}\n${path}\n${canonical}`)));
  const encoded = names.map((n) => `${encodeURIComponent(n)}=${encodeURIComponent(query[n])}`);
  return `${path}?${encoded.join("&")}&auth_signature=${signature}`;
}

async function signedFetch(method, path, params, body) {
  const init = { method, headers: {} };
  if (body) {
    init.body = body;
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(signedTarget(method, path, params, body), init);
  const text = await response.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { /* not JSON */ }
  return { status: response.status, json, text };
}

// ---- the page -----------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const MAX_ROWS = 500;
let next = 0;
let timer = null;

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`;
}

// An event's data as sent: a JSON string is shown as its text.
function shownData(data) {
  try {
    const value = JSON.parse(data);
    return typeof value === "string" ? value : data;
  } catch (_) {
    return data;
  }
}

function addRow(event) {
  const row = document.createElement("tr");
  const cell = (text, className) => {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    row.appendChild(td);
    return td;
  };
  cell(new Date(event.time_ms).toLocaleTimeString([], { hour12: false }) + "." + String(event.time_ms % 1000).padStart(3, "0"));
  const type = cell("", "type");
  const badge = document.createElement("span");
  badge.className = event.type;
  badge.textContent = event.type;
  type.appendChild(badge);
  cell(event.channel || "");
  cell(event.event || "");
  const details = [];
  if (event.data) details.push(shownData(event.data));
  if (event.user_id) details.push(`user ${event.user_id}`);
  if (event.socket_id) details.push(`socket ${event.socket_id}`);
  cell(details.join("\n"), "details");
  const body = $("log").tBodies[0];
  body.insertBefore(row, body.firstChild);
  while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
}

async function poll() {
  timer = null;
  if (!app) return;
  try {
    const { status, json, text } = await signedFetch("GET", `/console/apps/${encodeURIComponent(app.id)}/feed`, { since: String(next) });
    if (status !== 200 || !json) {
      setStatus(`error ${status}: ${json && json.error ? json.error : text}`, "error");
      if (status === 401 || status === 404) return; // wrong app, key or secret: stop asking
    } else {
      setStatus("live", "live");
      for (const name of ["connections", "channels", "subscriptions", "presence_members"]) {
        $(name).textContent = json[name];
      }
      json.events.forEach(addRow);
      next = json.next;
      $("not-shown").textContent = json.not_shown ? `(${json.not_shown} not shown: over the console's rate)` : "";
    }
  } catch (error) {
    setStatus(`cannot reach the server: ${error.message}`, "error");
  }
  if (app) timer = setTimeout(poll, 1000);
}

function open(credentials) {
  app = credentials;
  sessionStorage.setItem("shardpush-console", JSON.stringify(credentials));
  next = 0;
  $("log").tBodies[0].replaceChildren();
  $("login").hidden = true;
  $("app").hidden = false;
  document.title = `shardpush debug console: ${credentials.id}`;
  setStatus("connecting", "idle");
  poll();
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  open({ id: form.get("app_id").trim(), key: form.get("key").trim(), secret: form.get("secret") });
});

$("logout").addEventListener("click", () => {
  app = null;
  if (timer) clearTimeout(timer);
  sessionStorage.removeItem("shardpush-console");
  $("app").hidden = true;
  $("login").hidden = false;
  setStatus("not connected", "idle");
});

$("send").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  const body = JSON.stringify({ name: form.get("event"), channel: form.get("channel"), data: form.get("data") });
  const result = $("send-result");
  result.textContent = "sending…";
  try {
    const { status, text } = await signedFetch("POST", `/apps/${encodeURIComponent(app.id)}/events`, {}, body);
    result.textContent = status === 200 ? "sent" : `refused (${status}): ${text}`;
  } catch (error) {
    result.textContent = `failed: ${error.message}`;
  }
});

const saved = sessionStorage.getItem("shardpush-console");
if (saved) {
  try { open(JSON.parse(saved)); } catch (_) { sessionStorage.removeItem("shardpush-console"); }
}
