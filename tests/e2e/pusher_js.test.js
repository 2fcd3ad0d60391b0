// End-to-end: the official pusher-js 8 client and the `pusher` server library against a real
// shardpush (2 shards). Run with `node --test` (SHARDPUSH_BIN names the binary).
const test = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const PusherClient = require('pusher-js');
const PusherServer = require('pusher');

const APP = { appId: 'e2e-app', key: 'e2e-key', secret: 'e2e-secret' };

function startServer() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'shardpush-e2e-'));
  const config = path.join(dir, 'config.toml');
  fs.writeFileSync(config, `host = "127.0.0.1"\nport = 0\nshards = 2\n[[apps]]\nid = "${APP.appId}"\nkey = "${APP.key}"\nsecret = "${APP.secret}"\nenable_client_messages = true\n`);
  const bin = process.env.SHARDPUSH_BIN || path.join(__dirname, '../../target/debug/shardpush');
  const child = spawn(bin, ['--config', config], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const m = out.match(/listening on [^\s]+:(\d+)/);
      if (m && !child.port) {
        child.port = Number(m[1]);
        resolve(child);
      }
    });
    child.on('exit', (code) => reject(new Error(`shardpush exited with ${code}`)));
  });
}

let server;
let api;
const clients = [];

test.before(async () => {
  server = await startServer();
  api = new PusherServer({ ...APP, host: '127.0.0.1', port: String(server.port), useTLS: false });
});

test.after(() => {
  for (const c of clients) c.disconnect();
  server.kill('SIGTERM');
});

function client(userId) {
  const c = new PusherClient(APP.key, {
    cluster: 'mt1',
    wsHost: '127.0.0.1',
    wsPort: server.port,
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        const presence = channelName.startsWith('presence-')
          ? { user_id: userId, user_info: { name: `User ${userId}` } }
          : undefined;
        callback(null, api.authorizeChannel(socketId, channelName, presence));
      },
    },
  });
  clients.push(c);
  return c;
}

function once(emitter, event) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timeout waiting for ${event}`)), 5000);
    emitter.bind(event, (data, meta) => {
      clearTimeout(timer);
      resolve({ data, meta });
    });
  });
}

function subscribed(channel) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no subscription to ${channel.name}`)), 5000);
    channel.bind('pusher:subscription_succeeded', (members) => {
      clearTimeout(timer);
      resolve(members);
    });
    channel.bind('pusher:subscription_error', (e) => reject(new Error(JSON.stringify(e))));
  });
}

test('pusher-js connects and receives a trigger on a public channel', async () => {
  const c = client('1');
  const channel = c.subscribe('news');
  await subscribed(channel);
  assert.match(c.connection.socket_id, /^\d+\.\d+$/);
  const got = once(channel, 'breaking');
  await api.trigger('news', 'breaking', { headline: 'héllo "world"' });
  assert.deepEqual((await got).data, { headline: 'héllo "world"' });
});

test('private channel authorized with authorizeChannel, and socket_id exclusion', async () => {
  const a = client('a');
  const b = client('b');
  const chA = a.subscribe('private-orders');
  const chB = b.subscribe('private-orders');
  await Promise.all([subscribed(chA), subscribed(chB)]);
  const gotB = once(chB, 'order');
  let aGot = false;
  chA.bind('order', () => { aGot = true; });
  await api.trigger('private-orders', 'order', { id: 7 }, { socket_id: a.connection.socket_id });
  assert.deepEqual((await gotB).data, { id: 7 });
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(aGot, false, 'the excluded socket got nothing');
});

test('presence channel members, member_added and member_removed', async () => {
  const ann = client('ann');
  const room = ann.subscribe('presence-room');
  const members = await subscribed(room);
  assert.equal(members.count, 1);
  assert.equal(members.me.id, 'ann');
  const added = once(room, 'pusher:member_added');
  const bob = client('bob');
  const bobRoom = bob.subscribe('presence-room');
  const bobMembers = await subscribed(bobRoom);
  assert.equal(bobMembers.count, 2);
  assert.deepEqual(bobMembers.get('ann').info, { name: 'User ann' });
  const member = (await added).data;
  assert.equal(member.id, 'bob');
  assert.deepEqual(member.info, { name: 'User bob' });
  const removed = once(room, 'pusher:member_removed');
  bob.unsubscribe('presence-room');
  assert.equal((await removed).data.id, 'bob');
  assert.equal(room.members.count, 1);
});

test('client events between pusher-js clients carry user_id on presence', async () => {
  const a = client('sender');
  const b = client('receiver');
  const chA = a.subscribe('presence-chat');
  await subscribed(chA);
  const chB = b.subscribe('presence-chat');
  await subscribed(chB);
  const got = once(chB, 'client-typing');
  assert.equal(chA.trigger('client-typing', { typing: true }), true);
  const { data, meta } = await got;
  assert.deepEqual(data, { typing: true });
  assert.equal(meta.user_id, 'sender');
});

test('the pusher library triggers batches and reads channel info', async () => {
  const c = client('batcher');
  const channel = c.subscribe('batch-channel');
  await subscribed(channel);
  const received = [];
  const done = new Promise((resolve) => {
    channel.bind('item', (data) => {
      received.push(data.n);
      if (received.length === 3) resolve();
    });
  });
  await api.triggerBatch([0, 1, 2].map((n) => ({ channel: 'batch-channel', name: 'item', data: { n } })));
  await done;
  assert.deepEqual(received, [0, 1, 2]);

  const info = await (await api.get({ path: '/channels/batch-channel', params: { info: 'subscription_count' } })).json();
  assert.deepEqual(info, { occupied: true, subscription_count: 1 });
  const list = await (await api.get({ path: '/channels', params: { filter_by_prefix: 'batch-' } })).json();
  assert.deepEqual(list, { channels: { 'batch-channel': {} } });
  const withInfo = await (await api.trigger('batch-channel', 'item2', 'x', { info: 'subscription_count' })).json();
  assert.deepEqual(withInfo, { channels: { 'batch-channel': { subscription_count: 1 } } });
});

test('presence users and user_count through the pusher library', async () => {
  const u = client('lister');
  await subscribed(u.subscribe('presence-list'));
  const users = await (await api.get({ path: '/channels/presence-list/users' })).json();
  assert.deepEqual(users, { users: [{ id: 'lister' }] });
  const info = await (await api.get({ path: '/channels/presence-list', params: { info: 'user_count' } })).json();
  assert.deepEqual(info, { occupied: true, user_count: 1 });
});
