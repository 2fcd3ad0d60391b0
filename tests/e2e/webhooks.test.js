// End-to-end: webhooks of a real shardpush (one node, 2 shards), received by real Node HTTP and
// HTTPS servers, each request checked with the official `pusher` library's validator
// (`pusher.webhook({headers, rawBody}).isValid()`), driven by pusher-js clients. Run with
// `node --test` (SHARDPUSH_BIN names the binary).
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');
const os = require('node:os');
const path = require('node:path');
const { isDeepStrictEqual } = require('node:util');
const PusherServer = require('pusher');
const { startShardpush, pusherClient, authorizeAs, subscribed, waitFor, makeCertificates } = require('./helpers');

const APP = { appId: '424242', key: 'wh-key', secret: 'wh-secret' };
const ALL_TYPES = [
  'channel_occupied',
  'channel_vacated',
  'member_added',
  'member_removed',
  'client_event',
  'cache_miss',
  'subscription_count',
];
// The 3-second rule: a departure's webhook must not come before this (margin under 3 s)...
const NOT_BEFORE_MS = 2500;
// ...and must have come by this.
const BY_MS = 5000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const sorted = (events) => [...events].sort((a, b) => (JSON.stringify(a) < JSON.stringify(b) ? -1 : 1));

// A webhook receiver on 127.0.0.1:0 (HTTPS with `tls` = {key, cert}). Every request is kept with
// its raw body and headers, answered 200, and checked: POST, the official validator, the exact
// content type, the key, the id header, `time_ms` close to its arrival. What fails a check goes
// to `problems`, which `take` and `check` assert empty.
async function startReceiver({ tls } = {}) {
  const validator = new PusherServer(APP);
  const rx = { requests: [], problems: [], cursors: new Map() };
  const handler = (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const rawBody = Buffer.concat(chunks).toString('utf8');
      const record = { at: Date.now(), method: req.method, path: req.url, headers: req.headers, rawBody };
      const problem = (what) => rx.problems.push(`${what}: ${JSON.stringify(record)}`);
      try {
        record.body = JSON.parse(rawBody);
      } catch {
        problem('body is not JSON');
      }
      if (req.method !== 'POST') problem('not a POST');
      if (!validator.webhook({ headers: req.headers, rawBody }).isValid()) problem('pusher.webhook().isValid() is false');
      if (req.headers['content-type'] !== 'application/json') problem('content-type is not exactly application/json');
      if (req.headers['x-pusher-key'] !== APP.key) problem('wrong X-Pusher-Key');
      if (!/^\S+$/.test(req.headers['x-shardpush-webhook-id'] || '')) problem('no X-Shardpush-Webhook-Id');
      const time = record.body && record.body.time_ms;
      if (!Number.isInteger(time) || time > record.at + 100 || record.at - time > 2000) problem('time_ms not close to now');
      if (!record.body || !Array.isArray(record.body.events) || record.body.events.length === 0) problem('no events');
      rx.requests.push(record);
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('ok');
    });
  };
  const server = tls ? https.createServer(tls, handler) : http.createServer(handler);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  rx.port = server.address().port;
  rx.url = (p = '/hook') => `${tls ? 'https' : 'http'}://127.0.0.1:${rx.port}${p}`;
  // The requests to `p` (all when undefined), and their events in arrival order.
  rx.of = (p) => rx.requests.filter((r) => p === undefined || r.path === p);
  rx.events = (p) => rx.of(p).flatMap((r) => (r.body ? r.body.events : []));
  rx.check = () => assert.deepEqual(rx.problems, [], 'every webhook request is valid');
  // Waits until `n` events to `p` arrived since the last take, lets `settle` ms pass, and
  // returns exactly those `n` (failing if more came).
  rx.take = async (n, { p, within = 5000, settle = 400 } = {}) => {
    const from = rx.cursors.get(p) || 0;
    await waitFor(`${n} webhook events (got ${rx.events(p).length - from})`, () => rx.events(p).length - from >= n, within);
    await sleep(settle);
    rx.check();
    const got = rx.events(p).slice(from);
    assert.equal(got.length, n, `exactly ${n} events, got ${JSON.stringify(got)}`);
    rx.cursors.set(p, from + n);
    return got;
  };
  // Whatever arrived to `p` since the last take.
  rx.takeAll = (p) => {
    const from = rx.cursors.get(p) || 0;
    const got = rx.events(p).slice(from);
    rx.cursors.set(p, from + got.length);
    return got;
  };
  // Asserts nothing new arrived to `p` since the last take.
  rx.nothingNew = (p) => {
    const from = rx.cursors.get(p) || 0;
    assert.deepEqual(rx.events(p).slice(from), [], 'no webhook events');
  };
  rx.close = () => {
    server.closeAllConnections();
    return new Promise((resolve) => server.close(resolve));
  };
  return rx;
}

// The TOML of a one-app shardpush; `webhooks` are {url, types, filter?, headers?}.
function configToml({ webhooks, batch = false, settings = '' }) {
  const inline = (o) => `{ ${Object.entries(o).map(([k, v]) => `${JSON.stringify(k)} = ${JSON.stringify(v)}`).join(', ')} }`;
  let toml = 'host = "127.0.0.1"\nport = 0\nshards = 2\n';
  toml += `[webhooks]\n${settings}\n`;
  toml += `[[apps]]\nid = "${APP.appId}"\nkey = "${APP.key}"\nsecret = "${APP.secret}"\n`;
  toml += `enable_client_messages = true\nenable_subscription_count = true\nmax_client_events_per_second = 100\n`;
  toml += `batch_webhooks = ${batch}\n`;
  for (const hook of webhooks) {
    toml += `[[apps.webhooks]]\nurl = "${hook.url}"\nevent_types = ${JSON.stringify(hook.types)}\n`;
    if (hook.filter) toml += `filter = ${inline(hook.filter)}\n`;
    if (hook.headers) toml += `headers = ${inline(hook.headers)}\n`;
  }
  return toml;
}

// After the last subscriber of `channels` left. Whether that unsubscribe also makes a
// subscription_count webhook of 0 is not settled (the reference says one goes on every
// (un)subscribe; shardpush sends none for the last one). Either is accepted: a 0, if any, comes
// at once (within a second) and exactly so, and nothing else comes then.
async function noCountOrZero(rx, channels) {
  await sleep(1000);
  const got = rx.takeAll();
  const zeros = channels.map((channel) => ({ name: 'subscription_count', channel, subscription_count: 0 }));
  assert.ok(got.length === 0 || isDeepStrictEqual(sorted(got), sorted(zeros)), JSON.stringify(got));
}

// Per test: starts shardpush with this config, and stops it, its clients and `receivers` after
// the test. Returns helpers bound to that server.
async function setup(t, config, { receivers = [], captureStderr = false } = {}) {
  const clients = [];
  let server;
  t.after(async () => {
    for (const c of clients) c.disconnect();
    if (server) server.kill();
    for (const rx of receivers) await rx.close();
  });
  server = await startShardpush(configToml(config), { captureStderr });
  const api = new PusherServer({ ...APP, host: '127.0.0.1', port: String(server.port), useTLS: false });
  const client = (userId) => {
    const c = pusherClient(APP.key, server.port, { channelAuthorization: authorizeAs(api, userId) });
    clients.push(c);
    return c;
  };
  const join = async (c, name) => {
    const channel = c.subscribe(name);
    await subscribed(channel);
    return channel;
  };
  const connected = (c) => waitFor('connected', () => c.connection.state === 'connected');
  const occupied = async (name) => (await (await api.get({ path: `/channels/${name}` })).json()).occupied;
  const users = async (name) =>
    (await (await api.get({ path: `/channels/${name}/users` })).json()).users.map((u) => u.id).sort();
  return { server, api, client, join, connected, occupied, users };
}

test('every event type arrives signed, one per request, with exact objects and headers', async (t) => {
  const rx = await startReceiver();
  const { client, join, connected } = await setup(t, {
    webhooks: [{ url: rx.url('/all'), types: ALL_TYPES, headers: { 'X-Custom': 'v', 'X-Other-Thing': 'a b' } }],
  }, { receivers: [rx] });

  const ann = client('ann');
  await join(ann, 'private-wh');
  assert.deepEqual(sorted(await rx.take(2)), sorted([
    { name: 'channel_occupied', channel: 'private-wh' },
    { name: 'subscription_count', channel: 'private-wh', subscription_count: 1 },
  ]));

  // Presence: occupied and member_added, never a subscription_count.
  await join(ann, 'presence-wh');
  assert.deepEqual(sorted(await rx.take(2)), sorted([
    { name: 'channel_occupied', channel: 'presence-wh' },
    { name: 'member_added', channel: 'presence-wh', user_id: 'ann' },
  ]));

  // Client events: data is always a string (an object as its compact JSON); user_id on
  // presence only. No other subscriber is needed.
  const annId = ann.connection.socket_id;
  ann.channel('private-wh').trigger('client-typing', { typing: true, n: [1, 2] });
  assert.deepEqual(await rx.take(1), [
    { name: 'client_event', channel: 'private-wh', event: 'client-typing', data: '{"typing":true,"n":[1,2]}', socket_id: annId },
  ]);
  ann.channel('presence-wh').trigger('client-say', 'plain "text"');
  assert.deepEqual(await rx.take(1), [
    { name: 'client_event', channel: 'presence-wh', event: 'client-say', data: 'plain "text"', socket_id: annId, user_id: 'ann' },
  ]);

  // A cache channel with nothing cached: one cache_miss, the second subscriber within the
  // window makes none (but changes the count).
  const bob = client('bob');
  const carl = client('carl');
  await join(bob, 'cache-wh');
  assert.deepEqual(sorted(await rx.take(3)), sorted([
    { name: 'channel_occupied', channel: 'cache-wh' },
    { name: 'subscription_count', channel: 'cache-wh', subscription_count: 1 },
    { name: 'cache_miss', channel: 'cache-wh' },
  ]));
  await join(carl, 'cache-wh');
  assert.deepEqual(await rx.take(1), [{ name: 'subscription_count', channel: 'cache-wh', subscription_count: 2 }]);
  carl.unsubscribe('cache-wh');
  assert.deepEqual(await rx.take(1), [{ name: 'subscription_count', channel: 'cache-wh', subscription_count: 1 }]);

  // Ann leaves: her presence membership and both channels go after the 3 s delay. Whether the
  // last unsubscribe of private-wh also reports a count of 0 is not settled: if it does, it
  // comes at once and exactly so.
  await connected(ann);
  ann.disconnect();
  await noCountOrZero(rx, ['private-wh']);
  const departures = await rx.take(3, { within: BY_MS, settle: 600 });
  assert.deepEqual(sorted(departures), sorted([
    { name: 'member_removed', channel: 'presence-wh', user_id: 'ann' },
    { name: 'channel_vacated', channel: 'presence-wh' },
    { name: 'channel_vacated', channel: 'private-wh' },
  ]));

  rx.check();
  const requests = rx.of('/all');
  for (const r of requests) {
    assert.equal(r.body.events.length, 1, 'batching off: one event per request');
    assert.equal(r.headers['x-custom'], 'v');
    assert.equal(r.headers['x-other-thing'], 'a b');
    assert.equal(r.headers['x-pusher-key'], APP.key);
    assert.match(r.headers['x-pusher-signature'], /^[0-9a-f]{64}$/);
  }
  const ids = requests.map((r) => r.headers['x-shardpush-webhook-id']);
  assert.equal(new Set(ids).size, ids.length, `webhook ids are distinct: ${ids}`);
});

test('3 s rule for channels: a quick re-subscribe sends nothing, a real leave one vacated after ~3 s', async (t) => {
  const rx = await startReceiver();
  const { client, join, occupied } = await setup(t, {
    webhooks: [{ url: rx.url(), types: ['channel_occupied', 'channel_vacated'] }],
  }, { receivers: [rx] });

  const c = client('u1');
  await join(c, 'room');
  assert.deepEqual(await rx.take(1), [{ name: 'channel_occupied', channel: 'room' }]);

  // Leave (the server really sees the channel empty) and come back within ~1 s.
  const left = Date.now();
  c.unsubscribe('room');
  await waitFor('room empty', async () => (await occupied('room')) === false, 1000);
  await join(c, 'room');
  assert.ok(Date.now() - left < 1500, 'the return was quick');
  await sleep(left + 4000 - Date.now());
  rx.check();
  rx.nothingNew();

  // A real leave: exactly one vacated, not before ~2.5 s, by ~5 s.
  const t0 = Date.now();
  c.unsubscribe('room');
  await sleep(NOT_BEFORE_MS);
  rx.nothingNew();
  assert.deepEqual(await rx.take(1, { within: BY_MS - NOT_BEFORE_MS, settle: 1000 }), [
    { name: 'channel_vacated', channel: 'room' },
  ]);
  const delay = rx.of().at(-1).at - t0;
  assert.ok(delay >= NOT_BEFORE_MS && delay <= BY_MS, `vacated came ${delay} ms after the leave`);
  assert.equal(rx.requests.length, 2);
});

test('3 s rule for presence: a quick rejoin sends nothing, a real leave one member_removed after ~3 s', async (t) => {
  const rx = await startReceiver();
  const { client, join, connected, users } = await setup(t, {
    webhooks: [{ url: rx.url(), types: ['member_added', 'member_removed', 'channel_occupied', 'channel_vacated'] }],
  }, { receivers: [rx] });

  const ann = client('ann');
  await join(ann, 'presence-lobby');
  assert.deepEqual(sorted(await rx.take(2)), sorted([
    { name: 'channel_occupied', channel: 'presence-lobby' },
    { name: 'member_added', channel: 'presence-lobby', user_id: 'ann' },
  ]));
  const bob = client('bob');
  await join(bob, 'presence-lobby');
  assert.deepEqual(await rx.take(1), [{ name: 'member_added', channel: 'presence-lobby', user_id: 'bob' }]);

  // A second socket of bob: not a new member; closing it is not a departure.
  const bob2 = client('bob');
  await join(bob2, 'presence-lobby');
  await connected(bob2);
  bob2.disconnect();
  await sleep(300);
  rx.nothingNew();

  // Bob's connection drops; he is back (a new connection) within ~1 s.
  const left = Date.now();
  await connected(bob);
  bob.disconnect();
  await waitFor('bob gone', async () => !(await users('presence-lobby')).includes('bob'), 1000);
  const bobAgain = client('bob');
  await join(bobAgain, 'presence-lobby');
  assert.ok(Date.now() - left < 1500, 'the rejoin was quick');
  await sleep(left + 4000 - Date.now());
  rx.nothingNew();

  // Bob really leaves: one member_removed, not before ~2.5 s, by ~5 s; the channel stays.
  let t0 = Date.now();
  bobAgain.unsubscribe('presence-lobby');
  await sleep(NOT_BEFORE_MS);
  rx.nothingNew();
  assert.deepEqual(await rx.take(1, { within: BY_MS - NOT_BEFORE_MS, settle: 1000 }), [
    { name: 'member_removed', channel: 'presence-lobby', user_id: 'bob' },
  ]);
  let delay = rx.of().at(-1).at - t0;
  assert.ok(delay >= NOT_BEFORE_MS && delay <= BY_MS, `member_removed came ${delay} ms after the leave`);

  // Ann, the last one, leaves: member_removed and vacated, after the delay too.
  t0 = Date.now();
  ann.unsubscribe('presence-lobby');
  await sleep(NOT_BEFORE_MS);
  rx.nothingNew();
  assert.deepEqual(sorted(await rx.take(2, { within: BY_MS - NOT_BEFORE_MS, settle: 800 })), sorted([
    { name: 'member_removed', channel: 'presence-lobby', user_id: 'ann' },
    { name: 'channel_vacated', channel: 'presence-lobby' },
  ]));
  delay = Math.min(...rx.of().slice(-2).map((r) => r.at)) - t0;
  assert.ok(delay >= NOT_BEFORE_MS && delay <= BY_MS, `ann's departure came ${delay} ms after the leave`);
  rx.check();
});

test('batching on: bursts arrive in fewer requests, in order, every request valid', async (t) => {
  const rx = await startReceiver();
  const { client, join, connected } = await setup(t, {
    batch: true,
    settings: 'batch_window_ms = 200\nbatch_max_events = 100',
    webhooks: [{ url: rx.url(), types: ALL_TYPES, headers: { 'X-Custom': 'batched' } }],
  }, { receivers: [rx] });

  // One presence subscribe: occupied then member_added, in one request, in that order.
  const ann = client('ann');
  await join(ann, 'presence-batch');
  assert.deepEqual(await rx.take(2), [
    { name: 'channel_occupied', channel: 'presence-batch' },
    { name: 'member_added', channel: 'presence-batch', user_id: 'ann' },
  ]);
  assert.equal(rx.requests.length, 1, 'both events in one request');

  // Several channels subscribed at once, then a burst of client events.
  const names = ['private-b1', 'private-b2', 'private-b3'];
  await Promise.all(names.map((n) => join(ann, n)));
  const subs = await rx.take(6);
  assert.deepEqual(sorted(subs), sorted(names.flatMap((n) => [
    { name: 'channel_occupied', channel: n },
    { name: 'subscription_count', channel: n, subscription_count: 1 },
  ])));
  const before = rx.requests.length;
  const socketId = ann.connection.socket_id;
  for (let n = 0; n < 8; n++) ann.channel('private-b1').trigger('client-n', { n });
  const burst = await rx.take(8);
  assert.deepEqual(burst, [0, 1, 2, 3, 4, 5, 6, 7].map((n) => (
    { name: 'client_event', channel: 'private-b1', event: 'client-n', data: `{"n":${n}}`, socket_id: socketId })));
  const burstRequests = rx.requests.length - before;
  assert.ok(burstRequests < 8, `the burst came in ${burstRequests} requests`);

  // Ann's departures: member_removed before vacated for presence-batch.
  await connected(ann);
  ann.disconnect();
  await noCountOrZero(rx, names);
  const gone = await rx.take(5, { within: BY_MS, settle: 600 });
  assert.deepEqual(sorted(gone), sorted([
    { name: 'member_removed', channel: 'presence-batch', user_id: 'ann' },
    ...['presence-batch', ...names].map((n) => ({ name: 'channel_vacated', channel: n })),
  ]));
  const removedAt = gone.findIndex((e) => e.name === 'member_removed');
  const vacatedAt = gone.findIndex((e) => e.name === 'channel_vacated' && e.channel === 'presence-batch');
  assert.ok(removedAt < vacatedAt, `member_removed before vacated: ${JSON.stringify(gone)}`);

  rx.check();
  assert.ok(rx.requests.some((r) => r.body.events.length > 1), 'some request carries several events');
  assert.ok(rx.requests.length < rx.events().length, `${rx.events().length} events in ${rx.requests.length} requests`);
  for (const r of rx.requests) assert.equal(r.headers['x-custom'], 'batched');
});

test('batching off: a burst makes one request per event', async (t) => {
  const rx = await startReceiver();
  const { client, join } = await setup(t, {
    webhooks: [{ url: rx.url(), types: ['client_event', 'channel_occupied'] }],
  }, { receivers: [rx] });
  const c = client('u');
  await Promise.all(['private-x1', 'private-x2', 'private-x3'].map((n) => join(c, n)));
  await rx.take(3);
  for (let n = 0; n < 8; n++) c.channel('private-x1').trigger('client-n', String(n));
  const burst = await rx.take(8);
  assert.deepEqual(sorted(burst.map((e) => e.data)), ['0', '1', '2', '3', '4', '5', '6', '7']);
  assert.equal(rx.requests.length, 11);
  for (const r of rx.requests) assert.equal(r.body.events.length, 1);
});

test('filters and event_types choose what each webhook gets', async (t) => {
  const rx = await startReceiver();
  const { client, join, connected } = await setup(t, {
    webhooks: [
      { url: rx.url('/private'), types: ['channel_occupied', 'channel_vacated'], filter: { channel_name_starts_with: 'private-' } },
      { url: rx.url('/clients'), types: ['client_event'] },
      { url: rx.url('/vip'), types: ['channel_occupied', 'member_added'], filter: { channel_name_starts_with: 'presence-', channel_name_ends_with: '-vip' } },
    ],
  }, { receivers: [rx] });

  const c = client('zoe');
  for (const n of ['public-f', 'private-f', 'private-f-vip', 'presence-f', 'presence-f-vip']) await join(c, n);
  c.channel('private-f').trigger('client-hi', { x: 1 });
  c.channel('presence-f-vip').trigger('client-hi', 'y');
  const socketId = c.connection.socket_id;

  assert.deepEqual(sorted(await rx.take(2, { p: '/private' })), sorted([
    { name: 'channel_occupied', channel: 'private-f' },
    { name: 'channel_occupied', channel: 'private-f-vip' },
  ]));
  assert.deepEqual(sorted(await rx.take(2, { p: '/clients' })), sorted([
    { name: 'client_event', channel: 'private-f', event: 'client-hi', data: '{"x":1}', socket_id: socketId },
    { name: 'client_event', channel: 'presence-f-vip', event: 'client-hi', data: 'y', socket_id: socketId, user_id: 'zoe' },
  ]));
  assert.deepEqual(sorted(await rx.take(2, { p: '/vip' })), sorted([
    { name: 'channel_occupied', channel: 'presence-f-vip' },
    { name: 'member_added', channel: 'presence-f-vip', user_id: 'zoe' },
  ]));

  await connected(c);
  c.disconnect();
  assert.deepEqual(sorted(await rx.take(2, { p: '/private', within: BY_MS + 1000, settle: 800 })), sorted([
    { name: 'channel_vacated', channel: 'private-f' },
    { name: 'channel_vacated', channel: 'private-f-vip' },
  ]));
  rx.nothingNew('/clients');
  rx.nothingNew('/vip');
  assert.deepEqual([...new Set(rx.requests.map((r) => r.path))].sort(), ['/clients', '/private', '/vip']);
  rx.check();
});

test('https webhooks: delivered with [webhooks] ca_file, refused (and logged) without it', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'shardpush-e2e-tls-'));
  makeCertificates(dir);
  const read = (f) => fs.readFileSync(path.join(dir, f));
  const rx = await startReceiver({ tls: { key: read('srv.key'), cert: read('srv.pem') } });
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));

  const trusting = await setup(t, {
    settings: `ca_file = ${JSON.stringify(path.join(dir, 'ca.pem'))}`,
    webhooks: [{ url: rx.url('/tls'), types: ['channel_occupied', 'client_event'] }],
  }, { receivers: [rx] });
  const c = trusting.client('tls-user');
  await trusting.join(c, 'private-tls');
  c.channel('private-tls').trigger('client-secure', { ok: true });
  assert.deepEqual(sorted(await rx.take(2, { p: '/tls' })), sorted([
    { name: 'channel_occupied', channel: 'private-tls' },
    { name: 'client_event', channel: 'private-tls', event: 'client-secure', data: '{"ok":true}', socket_id: c.connection.socket_id },
  ]));

  // Without the CA: the receiver's certificate is refused; nothing arrives, the log says why.
  const url = rx.url('/untrusted');
  const untrusting = await setup(t, {
    webhooks: [{ url, types: ['channel_occupied'] }],
  }, { captureStderr: true });
  await untrusting.join(untrusting.client('tls-user'), 'refused-tls');
  // e.g. "webhooks to https://127.0.0.1:PORT/untrusted: gave up on 1 events (the last: ID,
  // refused (TLS: invalid peer certificate: UnknownIssuer), not retried)".
  const refusal = (l) => /webhook/i.test(l) && l.includes(url) && /TLS/.test(l);
  await waitFor('the refusal in the log', () => untrusting.server.stderrText.split('\n').some(refusal), 8000);
  const line = untrusting.server.stderrText.split('\n').find(refusal);
  assert.match(line, /refused|fail|gave up/i);
  assert.match(line, /certificate|issuer/i);
  await sleep(1500);
  assert.deepEqual(rx.of('/untrusted'), [], 'nothing delivered without the CA');
  assert.equal(rx.requests.length, 2);
  rx.check();
});
