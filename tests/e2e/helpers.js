// What the end-to-end test files share: starting a shardpush, a pusher-js client of it,
// authorizing channels as a user, and waiting for a subscription or a condition.
//
// startShardpush: starts a shardpush of the test's own with the given TOML configuration (port 0: any free
// port), resolving to the child process with its `port` once it listens. SHARDPUSH_BIN names
// the binary (default: the debug build). With `{ captureStderr: true }` the server's stderr is
// collected in `child.stderrText` (and still copied to this process's stderr) instead of inherited.
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const PusherClient = require('pusher-js');

function startShardpush(toml, { captureStderr = false } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'shardpush-e2e-'));
  const config = path.join(dir, 'config.toml');
  fs.writeFileSync(config, toml);
  const bin = process.env.SHARDPUSH_BIN || path.join(__dirname, '../../target/debug/shardpush');
  const stderr = captureStderr ? 'pipe' : 'inherit';
  const child = spawn(bin, ['--config', config], { stdio: ['ignore', 'pipe', stderr] });
  if (captureStderr) {
    child.stderrText = '';
    child.stderr.on('data', (chunk) => {
      child.stderrText += chunk;
      process.stderr.write(chunk);
    });
  }
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

// A pusher-js client of app `key` on the shardpush at `port` (plain ws, no stats); `options` adds
// to (or overrides) the connection settings.
function pusherClient(key, port, options = {}) {
  return new PusherClient(key, {
    cluster: 'mt1',
    wsHost: '127.0.0.1',
    wsPort: port,
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    ...options,
  });
}

// pusher-js `channelAuthorization` signing with `api` (a `pusher` server library) as `userId`,
// who joins presence channels with `{name: "User <id>"}`.
function authorizeAs(api, userId) {
  return {
    customHandler: ({ socketId, channelName }, callback) => {
      const presence = channelName.startsWith('presence-')
        ? { user_id: userId, user_info: { name: `User ${userId}` } }
        : undefined;
      callback(null, api.authorizeChannel(socketId, channelName, presence));
    },
  };
}

// Resolves to the members (presence) once the channel is subscribed; rejects on an error or
// after 5 s.
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

// Waits until `predicate` (sync or async) holds, checking every 20 ms, or throws after `ms`.
async function waitFor(what, predicate, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timeout waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

// A CA and a server certificate for 127.0.0.1/localhost in `dir`.
function makeCertificates(dir) {
  const openssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key',
    '-out', 'ca.pem', '-days', '2', '-subj', '/CN=shardpush-e2e-ca');
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'srv.key',
    '-out', 'srv.csr', '-subj', '/CN=localhost');
  fs.writeFileSync(path.join(dir, 'ext.cnf'),
    'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n');
  openssl('x509', '-req', '-in', 'srv.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-out', 'srv.pem', '-days', '2', '-extfile', 'ext.cnf');
  return { ca: path.join(dir, 'ca.pem'), cert: path.join(dir, 'srv.pem'), key: path.join(dir, 'srv.key') };
}

module.exports = { startShardpush, pusherClient, authorizeAs, subscribed, waitFor, makeCertificates };
