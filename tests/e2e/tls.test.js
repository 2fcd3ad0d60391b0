// End-to-end over TLS (tls_cert/tls_key): pusher-js 8 with forceTLS (wss://) receives an event
// that the `pusher` npm library triggers with useTLS (https://), against a certificate signed by
// a CA the test makes with openssl. pusher-js under Node opens its sockets with the default TLS
// options (it passes none to faye-websocket), so it trusts the test's CA only through
// NODE_EXTRA_CA_CERTS, which Node reads at startup: the client runs in a child process.
const test = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const https = require('node:https');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const PusherServer = require('pusher');
const { startShardpush, makeCertificates } = require('./helpers');

const APP = { appId: 'tls-app', key: 'tls-key', secret: 'tls-secret' };


// The pusher-js client, in a child process trusting `ca`: prints one JSON line per happening
// (state changes, the subscription, each `hello` event).
const CLIENT = `
const Pusher = require('pusher-js');
const [key, port] = process.argv.slice(1);
const say = (o) => console.log(JSON.stringify(o));
const c = new Pusher(key, { cluster: 'mt1', wsHost: '127.0.0.1', wssPort: Number(port), forceTLS: true,
  enabledTransports: ['ws'], disableStats: true });
c.connection.bind('state_change', (s) => say({ state: s.current }));
c.connection.bind('error', (e) => say({ error: JSON.stringify(e) }));
const channel = c.subscribe('tls-news');
channel.bind('pusher:subscription_succeeded', () => say({ subscribed: c.connection.socket_id }));
channel.bind('hello', (data) => say({ hello: data }));
process.on('message', () => { c.disconnect(); process.exit(0); });
`;

function startClient(ca, port) {
  const child = spawn(process.execPath, ['-e', CLIENT, APP.key, String(port)], {
    cwd: __dirname,
    env: { ...process.env, NODE_EXTRA_CA_CERTS: ca },
    stdio: ['ignore', 'pipe', 'inherit', 'ipc'],
  });
  const lines = [];
  const waiters = [];
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    const message = JSON.parse(line);
    lines.push(message);
    for (const w of waiters.splice(0)) w();
  });
  // Resolves to the first line (from the start) for which `pick` returns a value.
  child.next = (what, pick) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timeout waiting for ${what}: ${JSON.stringify(lines)}`)), 10000);
    const check = () => {
      for (const m of lines) {
        const v = pick(m);
        if (v !== undefined) {
          clearTimeout(timer);
          resolve(v);
          return;
        }
      }
      waiters.push(check);
    };
    check();
  });
  return child;
}

test('pusher-js over wss:// receives an event the pusher library triggers over https://', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'shardpush-tls-e2e-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const files = makeCertificates(dir);
  const server = await startShardpush(`host = "127.0.0.1"\nport = 0\nshards = 2\ntls_cert = ${JSON.stringify(files.cert)}\ntls_key = ${JSON.stringify(files.key)}\n[[apps]]\nid = "${APP.appId}"\nkey = "${APP.key}"\nsecret = "${APP.secret}"\n`);
  t.after(() => server.kill('SIGTERM'));

  const client = startClient(files.ca, server.port);
  t.after(() => { if (client.exitCode === null) client.kill(); });
  const socketId = await client.next('the subscription', (m) => m.subscribed);
  assert.match(socketId, /^\d+\.\d+$/);

  const api = new PusherServer({
    ...APP,
    host: '127.0.0.1',
    port: String(server.port),
    useTLS: true,
    agent: new https.Agent({ ca: fs.readFileSync(files.ca) }),
  });
  await api.trigger('tls-news', 'hello', { over: 'tls', text: 'héllo' });
  assert.deepEqual(await client.next('the event', (m) => m.hello), { over: 'tls', text: 'héllo' });

  // The HTTP API answers queries over https too.
  const info = await api.get({ path: '/channels/tls-news', params: { info: 'subscription_count' } });
  assert.equal(info.status, 200);
  assert.deepEqual(await info.json(), { occupied: true, subscription_count: 1 });

  // Without the CA the pusher library refuses the server's certificate.
  const untrusting = new PusherServer({ ...APP, host: '127.0.0.1', port: String(server.port), useTLS: true });
  await assert.rejects(untrusting.trigger('tls-news', 'hello', {}),
    (e) => /certificate/i.test(String(e.error && e.error.message)));
  client.send('stop');
});
