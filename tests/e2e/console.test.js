// End-to-end: the debug console (`console = true`) in headless Chromium (Debian's chromium,
// driven by playwright-core). The page signs its requests with the app's key and secret in the
// browser; the test checks what it shows against what pusher-js and the pusher library do.
// SHARDPUSH_CONSOLE_SCREENSHOT=path saves a screenshot of the page (the README's).
const test = require('node:test');
const assert = require('node:assert/strict');
const { chromium } = require('playwright-core');
const PusherServer = require('pusher');
const { startShardpush, pusherClient, authorizeAs, subscribed, waitFor } = require('./helpers');

const APP_ID = '555';
const KEY = 'console-key';
const SECRET = 'console-secret';

let server;
let browser;

test.before(async () => {
  server = await startShardpush(`host = "127.0.0.1"
port = 0
shards = 2
console = true
[[apps]]
id = "${APP_ID}"
key = "${KEY}"
secret = "${SECRET}"
enable_client_messages = true
`);
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

test.after(async () => {
  if (browser) await browser.close();
  if (server) server.kill('SIGTERM');
});

const api = () => new PusherServer({ appId: APP_ID, key: KEY, secret: SECRET, host: '127.0.0.1', port: String(server.port), useTLS: false });

// Opens the console page and signs in as the app with `secret`.
async function openConsole(secret) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(`http://127.0.0.1:${server.port}/console`);
  await page.fill('input[name=app_id]', APP_ID);
  await page.fill('input[name=key]', KEY);
  await page.fill('input[name=secret]', secret);
  await page.click('#login button[type=submit]');
  return page;
}

// The rows of the page's event log, as text per cell, newest first.
const logRows = (page) =>
  page.$$eval('#log tbody tr', (rows) => rows.map((r) => Array.from(r.cells, (c) => c.textContent)));

async function waitForRow(page, what, match) {
  await waitFor(what, async () => (await logRows(page)).some(match), 10000);
}

test('the console shows counts and the app events live, and sends a test event', async () => {
  const page = await openConsole(SECRET);
  await page.waitForSelector('#status.live', { timeout: 10000 });
  assert.equal(await page.isVisible('#login'), false, 'the sign-in form is gone once the app is open');
  assert.equal(await page.isVisible('#app'), true);

  // A subscriber, a presence member, a client event, an API message: each appears in the log.
  const client = pusherClient(KEY, server.port);
  const channel = client.subscribe('test-channel');
  await subscribed(channel);
  const member = pusherClient(KEY, server.port, { channelAuthorization: authorizeAs(api(), 'ada') });
  const room = member.subscribe('presence-room');
  await subscribed(room);
  const privateA = member.subscribe('private-chat');
  await subscribed(privateA);
  const other = pusherClient(KEY, server.port, { channelAuthorization: authorizeAs(api(), 'bob') });
  const privateB = other.subscribe('private-chat');
  await subscribed(privateB);
  privateA.trigger('client-typing', { who: 'ada' });
  await api().trigger('test-channel', 'api-event', { n: 1 });

  await waitForRow(page, 'the subscription', (r) => r[1] === 'subscribed' && r[2] === 'test-channel');
  await waitForRow(page, 'the member', (r) => r[1] === 'member_added' && r[2] === 'presence-room' && r[4].includes('user ada'));
  await waitForRow(page, 'the client event', (r) => r[1] === 'client_event' && r[3] === 'client-typing' && r[4].includes('{"who":"ada"}'));
  await waitForRow(page, 'the API message', (r) => r[1] === 'api_message' && r[2] === 'test-channel' && r[3] === 'api-event' && r[4].includes('{"n":1}'));
  await waitFor('the counts', async () => (await page.textContent('#connections')) === '3' && (await page.textContent('#channels')) === '3' && (await page.textContent('#presence_members')) === '1', 10000);

  // The form sends through the signed HTTP API: the subscriber receives it.
  const received = new Promise((resolve) => channel.bind('from-console', resolve));
  await page.fill('#send input[name=channel]', 'test-channel');
  await page.fill('#send input[name=event]', 'from-console');
  await page.fill('#send textarea[name=data]', '{"hello":"browser"}');
  await page.click('#send button[type=submit]');
  assert.deepEqual(await received, { hello: 'browser' });
  await waitFor('the send result', async () => (await page.textContent('#send-result')) === 'sent', 5000);
  await waitForRow(page, 'the sent message', (r) => r[1] === 'api_message' && r[3] === 'from-console');

  // Whatever an event carries is shown as text, never as markup.
  await api().trigger('test-channel', 'markup', '<img src=x onerror="document.title=\'owned\'">');
  await waitForRow(page, 'the markup as text', (r) => r[3] === 'markup' && r[4].includes('<img src=x'));
  assert.equal(await page.$('#log img'), null);

  client.disconnect();
  await waitForRow(page, 'the disconnection', (r) => r[1] === 'disconnected');
  if (process.env.SHARDPUSH_CONSOLE_SCREENSHOT) {
    await page.screenshot({ path: process.env.SHARDPUSH_CONSOLE_SCREENSHOT });
  }
  member.disconnect();
  other.disconnect();
  await page.close();
});

test('a wrong secret gets nothing but the refusal', async () => {
  const page = await openConsole('not-the-secret');
  await page.waitForSelector('#status.error', { timeout: 10000 });
  assert.match(await page.textContent('#status'), /error 401: Invalid signature/);
  assert.equal(await page.textContent('#connections'), '0');
  await page.close();
});

test('the console is off unless switched on', async () => {
  const plain = await startShardpush(`host = "127.0.0.1"
port = 0
shards = 1
[[apps]]
id = "${APP_ID}"
key = "${KEY}"
secret = "${SECRET}"
`);
  try {
    const response = await fetch(`http://127.0.0.1:${plain.port}/console`);
    assert.equal(response.status, 404);
  } finally {
    plain.kill('SIGTERM');
  }
});
