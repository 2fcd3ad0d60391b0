// End-to-end: the official pusher-js 8 client and the `pusher` server library against a real
// shardpush (2 shards). Run with `node --test` (SHARDPUSH_BIN names the binary).
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
// `pusher-js/with-encryption` is a browser build (it needs `document`); all it adds is
// `options.nacl = tweetnacl` (pusher-js's own dependency), so under Node the same client is the
// Node build (helpers.js's pusherClient) given that option.
const nacl = require('tweetnacl');
const PusherServer = require('pusher');
const { startShardpush, pusherClient, authorizeAs, subscribed, waitFor } = require('./helpers');

const APP = { appId: 'e2e-app', key: 'e2e-key', secret: 'e2e-secret' };

function startServer() {
  return startShardpush(`host = "127.0.0.1"\nport = 0\nshards = 2\n[[apps]]\nid = "${APP.appId}"\nkey = "${APP.key}"\nsecret = "${APP.secret}"\nenable_client_messages = true\nenable_watchlist_events = true\nenable_subscription_count = true\n`);
}

let server;
let api;
const clients = [];

test.before(async () => {
  server = await startServer();
  api = new PusherServer({
    ...APP,
    host: '127.0.0.1',
    port: String(server.port),
    useTLS: false,
    encryptionMasterKeyBase64: crypto.randomBytes(32).toString('base64'),
  });
});

test.after(() => {
  for (const c of clients) c.disconnect();
  server.kill('SIGTERM');
});

// A pusher-js client of the test server; `options` adds to the connection settings.
function connect(options) {
  const c = pusherClient(APP.key, server.port, options);
  clients.push(c);
  return c;
}

function client(userId) {
  return connect({ channelAuthorization: authorizeAs(api, userId) });
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

// A client that signs in as `userId` (authenticateUser) and authorizes channels without
// presence data, so presence membership comes from the sign-in.
function userClient(userId, { watchlist, encryption = false } = {}) {
  return connect({
    ...(encryption ? { nacl } : {}),
    userAuthentication: {
      customHandler: ({ socketId }, callback) => {
        const user = { id: userId, user_info: { name: `User ${userId}` } };
        if (watchlist) user.watchlist = watchlist;
        callback(null, api.authenticateUser(socketId, user));
      },
    },
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        callback(null, api.authorizeChannel(socketId, channelName));
      },
    },
  });
}

async function signedIn(c) {
  c.signin();
  await waitFor('signin_success', () => c.user.user_data);
  return c;
}

test('user authentication: sign-in, sendToUser on every connection, presence from the sign-in', async () => {
  const first = await signedIn(userClient('alice'));
  const second = await signedIn(userClient('alice'));
  assert.equal(first.user.user_data.id, 'alice');
  const got = [first, second].map((c) => new Promise((resolve) => c.user.bind('greeting', resolve)));
  await api.sendToUser('alice', 'greeting', { hi: 'there' });
  assert.deepEqual(await Promise.all(got), [{ hi: 'there' }, { hi: 'there' }]);

  const room = first.subscribe('presence-signed-in');
  const members = await subscribed(room);
  assert.equal(members.me.id, 'alice');
  assert.deepEqual(members.me.info, { name: 'User alice' });
  assert.equal(members.count, 1);
});

test('watchlist: pusher.user.watchlist gets the initial state, then online and offline', async () => {
  const watcher = userClient('watcher', { watchlist: ['friend', 'stranger'] });
  const initial = new Promise((resolve) => watcher.user.watchlist.bind('offline', resolve));
  await signedIn(watcher);
  const offline = await initial;
  assert.deepEqual([...offline.user_ids].sort(), ['friend', 'stranger']);

  const online = new Promise((resolve) => watcher.user.watchlist.bind('online', resolve));
  const friend = await signedIn(userClient('friend'));
  assert.deepEqual((await online).user_ids, ['friend']);

  const gone = new Promise((resolve) => watcher.user.watchlist.bind('offline', resolve));
  friend.disconnect();
  assert.deepEqual((await gone).user_ids, ['friend']);
});

test('terminateUserConnections closes every connection of the user with 4009', async () => {
  const doomed = await Promise.all([signedIn(userClient('doomed')), signedIn(userClient('doomed'))]);
  const survivor = await signedIn(userClient('survivor'));
  const errors = doomed.map((c) => new Promise((resolve) => c.connection.bind('error', resolve)));
  await api.terminateUserConnections('doomed');
  for (const e of await Promise.all(errors)) {
    assert.equal(e.data.code, 4009);
  }
  for (const c of doomed) {
    await waitFor('disconnected', () => c.connection.state === 'disconnected');
  }
  await new Promise((r) => setTimeout(r, 1500));
  for (const c of doomed) {
    assert.equal(c.connection.state, 'disconnected', '4009 stops reconnection');
  }
  assert.equal(survivor.connection.state, 'connected');
});

test('cache channels: cache_miss first, then the last event for later subscribers, info=cache', async () => {
  const early = client('early');
  const channel = early.subscribe('cache-weather');
  const miss = once(channel, 'pusher:cache_miss');
  await subscribed(channel);
  await miss;
  const live = once(channel, 'update');
  await api.trigger('cache-weather', 'update', { temp: 21 });
  assert.deepEqual((await live).data, { temp: 21 });

  const late = client('late');
  const lateChannel = late.subscribe('cache-weather');
  const replay = once(lateChannel, 'update');
  await subscribed(lateChannel);
  assert.deepEqual((await replay).data, { temp: 21 });

  const info = await (await api.get({ path: '/channels/cache-weather', params: { info: 'cache' } })).json();
  assert.equal(info.occupied, true);
  assert.equal(info.cache.event, 'update');
  assert.deepEqual(JSON.parse(info.cache.data), { temp: 21 });
  assert.ok(info.cache.ttl > 0 && info.cache.ttl <= 1800, `ttl ${info.cache.ttl}`);
});

test('pusher:subscription_count reaches pusher-js on each subscribe', async () => {
  const a = client('count-a');
  const channel = a.subscribe('counted-js');
  const first = once(channel, 'pusher:subscription_count');
  await subscribed(channel);
  assert.equal((await first).data.subscription_count, 1);
  const second = new Promise((resolve) => channel.bind('pusher:subscription_count', resolve));
  const b = client('count-b');
  await subscribed(b.subscribe('counted-js'));
  assert.equal((await second).subscription_count, 2);
  assert.equal(channel.subscriptionCount, 2);
});

test('pusher-js with-encryption decrypts what the pusher library encrypted', async () => {
  const c = userClient('crypto', { encryption: true });
  const channel = c.subscribe('private-encrypted-vault');
  await subscribed(channel);
  let wire;
  c.connection.bind('message', (m) => { if (m.event === 'secret') wire = m.data; });
  const got = once(channel, 'secret');
  await api.trigger('private-encrypted-vault', 'secret', { code: 'ünïcode 1234' });
  assert.deepEqual((await got).data, { code: 'ünïcode 1234' });
  // What crossed the server was the library's ciphertext, passed on byte for byte.
  assert.ok(wire.nonce && wire.ciphertext, JSON.stringify(wire));
  assert.ok(!JSON.stringify(wire).includes('1234'));
});
