// Starts a shardpush of the test's own with the given TOML configuration (port 0: any free
// port), resolving to the child process with its `port` once it listens. SHARDPUSH_BIN names
// the binary (default: the debug build).
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

function startShardpush(toml) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'shardpush-e2e-'));
  const config = path.join(dir, 'config.toml');
  fs.writeFileSync(config, toml);
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

module.exports = { startShardpush };
