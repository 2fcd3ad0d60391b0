// End-to-end: a cluster of 3 shardpush nodes (2 shards each) on a redis-server of the test's own,
// driven by the official pusher-js 8 client and the `pusher` server library, with the clients
// spread over the nodes and each API call made to another node than the subscriber's.
// Run with `node --test` (SHARDPUSH_BIN names the binary; redis-server must be installed).
const test = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const net = require('node:net');
const PusherServer = require('pusher');
const { startShardpush, pusherClient, authorizeAs, subscribed, waitFor } = require('./helpers');

const APP = { appId: 'e2e-app', key: 'e2e-key', secret: 'e2e-secret' };

function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

async function startRedis() {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  child.port = port;
  await new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (chunk) => {
      out += chunk;
      if (out.includes('Ready to accept connections')) resolve();
    });
    child.on('exit', (code) => reject(new Error(`redis-server exited with ${code}`)));
  });
  return child;
}

function startNode(redisPort) {
  return startShardpush([
    'host = "127.0.0.1"', 'port = 0', 'shards = 2',
    '[cluster]', `redis_url = "redis://127.0.0.1:${redisPort}"`, 'prefix = "e2e"',
    '[[apps]]', `id = "${APP.appId}"`, `key = "${APP.key}"`, `secret = "${APP.secret}"`,
    'enable_client_messages = true', 'enable_watchlist_events = true', 'enable_subscription_count = true', '',
  ].join('\n'));
}

let redis;
let nodes = [];
let apis = [];
const clients = [];

test.before(async () => {
  redis = await startRedis();
  nodes = await Promise.all([0, 1, 2].map(() => startNode(redis.port)));
  apis = nodes.map((n) => new PusherServer({ ...APP, host: '127.0.0.1', port: String(n.port), useTLS: false }));
});

test.after(() => {
  for (const c of clients) c.disconnect();
  for (const n of nodes) n.kill('SIGTERM');
  if (redis) redis.kill('SIGTERM');
});

// A pusher-js client of node `i`, authorized (and signed in) as `userId`.
function client(i, userId) {
  const api = apis[i];
  const c = pusherClient(APP.key, nodes[i].port, {
    channelAuthorization: authorizeAs(api, userId),
    userAuthentication: {
      customHandler: ({ socketId }, callback) => {
        callback(null, api.authenticateUser(socketId, { id: userId }));
      },
    },
  });
  clients.push(c);
  return c;
}

function once(emitter, event) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timeout waiting for ${event}`)), 5000);
    emitter.bind(event, (data) => {
      clearTimeout(timer);
      resolve(data);
    });
  });
}

test('a pusher-js subscriber on one node gets what the pusher library triggers on another', async () => {
  const subscribers = [0, 1, 2].map((i) => client(i, `s${i}`));
  const channels = subscribers.map((c) => c.subscribe('cluster-news'));
  await Promise.all(channels.map(subscribed));
  for (const [i, api] of apis.entries()) {
    const got = channels.map((ch) => once(ch, `from-${i}`));
    await api.trigger('cluster-news', `from-${i}`, { node: i });
    assert.deepEqual(await Promise.all(got), [{ node: i }, { node: i }, { node: i }]);
  }
  // socket_id exclusion across nodes: the excluded socket is on node 2, the trigger on node 0.
  const excluded = subscribers[2].connection.socket_id;
  const seen = [];
  channels[2].bind('excluded', () => seen.push('excluded'));
  const others = channels.slice(0, 2).map((ch) => once(ch, 'excluded'));
  await apis[0].trigger('cluster-news', 'excluded', {}, { socket_id: excluded });
  await Promise.all(others);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(seen, []);
});

test('presence across nodes: one member per user, exact counts from every node', async () => {
  const ann = client(0, 'ann');
  const annRoom = ann.subscribe('presence-cluster');
  assert.equal((await subscribed(annRoom)).count, 1);
  const added = once(annRoom, 'pusher:member_added');
  const bob = client(1, 'bob');
  const bobRoom = bob.subscribe('presence-cluster');
  const members = await subscribed(bobRoom);
  assert.equal(members.count, 2);
  assert.deepEqual(members.get('ann').info, { name: 'User ann' });
  assert.equal((await added).id, 'bob');
  // ann's second connection, on node 2: no member_added anywhere, still 2 users.
  const annAgain = client(2, 'ann');
  assert.equal((await subscribed(annAgain.subscribe('presence-cluster'))).count, 2);
  for (const api of apis) {
    const info = await (await api.get({ path: '/channels/presence-cluster', params: { info: 'user_count,subscription_count' } })).json();
    assert.deepEqual(info, { occupied: true, user_count: 2, subscription_count: 3 });
    const users = await (await api.get({ path: '/channels/presence-cluster/users' })).json();
    assert.deepEqual(users.users.map((u) => u.id).sort(), ['ann', 'bob']);
  }
  // bob leaves: ann's connections on both nodes hear it once.
  const removed = once(annRoom, 'pusher:member_removed');
  bob.disconnect();
  assert.equal((await removed).id, 'bob');
  await waitFor('user_count 1 on node 2', async () => {
    const info = await (await apis[2].get({ path: '/channels/presence-cluster', params: { info: 'user_count' } })).json();
    return info.user_count === 1;
  });
});

test('sendToUser and terminate_connections through another node', async () => {
  const on0 = client(0, 'carol');
  const on1 = client(1, 'carol');
  for (const c of [on0, on1]) {
    c.signin();
    await waitFor('signin_success', () => c.user.user_data);
  }
  const got = [on0, on1].map((c) => new Promise((resolve) => c.user.bind('note', resolve)));
  await apis[2].sendToUser('carol', 'note', { n: 1 });
  assert.deepEqual(await Promise.all(got), [{ n: 1 }, { n: 1 }]);
  const closed = [on0, on1].map((c) => new Promise((resolve) => c.connection.bind('disconnected', resolve)));
  await apis[2].terminateUserConnections('carol');
  await Promise.all(closed.map((p) => Promise.race([p, new Promise((_, r) => setTimeout(() => r(new Error('not closed')), 5000))])));
});
