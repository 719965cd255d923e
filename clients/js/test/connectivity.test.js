// Connectivity in browsers: online/offline and page visibility, with a fake window/document/navigator, fake
// timers and a fake server. Outside browsers (no window/document/navigator) none of this applies.
import { test, mock, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { fakeServer, fakeClient, fakeBrowser, fakeTimers, flush, record } from './fake.js';

let cleanup = [];
afterEach(() => {
  for (const fn of cleanup.reverse()) fn();
  cleanup = [];
});

/** Fake timers, a fake browser and a fake server; everything is undone after the test. */
function setup(options = {}, { browser = true } = {}) {
  const timers = fakeTimers();
  cleanup.push(() => timers.reset());
  const random = mock.method(Math, 'random', () => 0.5);
  cleanup.push(() => random.mock.restore());
  const fake = browser ? fakeBrowser() : null;
  if (fake) cleanup.push(() => fake.restore());
  const server = fakeServer(options.server);
  const client = fakeClient(server, options.client);
  cleanup.push(() => client.close());
  const log = record(client);
  return { timers, browser: fake, server, client, log };
}

test('offline: no reconnect attempts while the browser is offline; back online: at once', async () => {
  const { timers, browser, server, client, log } = setup();
  await flush();
  assert.equal(client.state, 'ready');

  browser.goOffline();
  await flush();
  // An open socket is not given up on because of the event alone: it is checked with a ping, which answers.
  assert.equal(server.last.sent.at(-1).type, 'ping');
  assert.equal(client.state, 'ready');

  server.last.serverClose(1006);
  await flush();
  assert.equal(client.state, 'offline');
  const [d] = log.of('disconnected');
  assert.equal(d.willReconnect, true);
  assert.equal(d.offline, true);
  assert.equal(d.retryInMs, undefined);

  await timers.advance(10 * 60_000, 5_000);
  assert.equal(server.sockets.length, 1, 'no attempt in 10 minutes offline');
  assert.equal(client.state, 'offline');

  browser.goOnline();
  await flush();
  assert.equal(server.sockets.length, 2, 'reconnected as soon as the browser was online');
  assert.equal(client.state, 'ready');
  assert.deepEqual(
    log.of('state').map((s) => s.state),
    ['ready', 'offline', 'connecting', 'ready'],
  );
});

test("'offline' during a backoff wait cancels the pending attempt", async () => {
  const { timers, browser, server, client } = setup({ client: { backoff: { initialMs: 10_000, maxMs: 10_000 } } });
  await flush();
  server.last.serverClose(1006);
  await flush();
  assert.equal(client.state, 'waiting');
  browser.goOffline();
  assert.equal(client.state, 'offline');
  await timers.advance(60_000, 1_000);
  assert.equal(server.sockets.length, 1);
  browser.goOnline();
  await flush();
  assert.equal(client.state, 'ready');
});

test("'online' during a long backoff wait reconnects at once", async () => {
  const { browser, server, client, log } = setup({ client: { backoff: { initialMs: 60_000, maxMs: 60_000 } } });
  await flush();
  server.last.serverClose(1006);
  await flush();
  assert.equal(client.state, 'waiting');
  assert.equal(log.of('disconnected')[0].retryInMs, 30_000);
  browser.goOnline();
  await flush();
  assert.equal(server.sockets.length, 2);
  assert.equal(client.state, 'ready');
});

test("'online' while connected checks the socket with a ping; no answer: reconnect at once", async () => {
  const { timers, browser, server, client, log } = setup({ client: { connectivity: { checkTimeoutMs: 3_000 } } });
  await flush();
  server.last.mute = true; // the old path died with the network change
  browser.goOnline();
  await flush();
  assert.equal(server.last.sent.at(-1).type, 'ping');
  await timers.advance(2_900);
  assert.equal(client.state, 'ready');
  await timers.advance(200);
  const [d] = log.of('disconnected');
  assert.equal(d.code, 4000);
  assert.match(d.reason, /no frame within 3000 ms after a check \(the network came back\)/);
  assert.equal(d.retryInMs, 0);
  await flush();
  assert.equal(server.sockets.length, 2);
  assert.equal(server.sockets[0].closedWith.code, 4000);
  assert.equal(client.state, 'ready');
});

test('visible again after a long hidden period: the socket is checked with a ping first', async () => {
  const { timers, browser, server, client, log } = setup({ client: { connectivity: { hiddenMs: 60_000, checkTimeoutMs: 2_000 } } });
  await flush();
  const pings = () => server.last.sent.filter((m) => m.type === 'ping').length;

  // Hidden briefly: nothing to check.
  browser.setVisibility('hidden');
  await timers.advance(30_000, 1_000);
  browser.setVisibility('visible');
  await flush();
  assert.equal(pings(), 0);

  // Hidden for long, the socket still answers: it is kept.
  browser.setVisibility('hidden');
  await timers.advance(5 * 60_000, 5_000);
  browser.setVisibility('visible');
  await flush();
  assert.equal(pings(), 1);
  await timers.advance(5_000);
  assert.equal(server.sockets.length, 1);
  assert.equal(client.state, 'ready');

  // Hidden for long, and the socket died meanwhile without a close: replaced at once.
  browser.setVisibility('hidden');
  await timers.advance(5 * 60_000, 5_000);
  server.last.mute = true;
  browser.setVisibility('visible');
  await flush();
  assert.equal(pings(), 2);
  await timers.advance(2_100);
  assert.match(log.of('disconnected')[0].reason, /after a check \(visible again after 300 s hidden\)/);
  await flush();
  assert.equal(server.sockets.length, 2);
  assert.equal(client.state, 'ready');
});

test('visible again after a long hidden period while waiting to retry: retries at once', async () => {
  const { timers, browser, server, client } = setup({ client: { backoff: { initialMs: 600_000, maxMs: 600_000 } } });
  await flush();
  browser.setVisibility('hidden');
  server.last.serverClose(1006);
  await flush();
  assert.equal(client.state, 'waiting'); // 300 s to wait (Math.random is 0.5)
  await timers.advance(90_000, 5_000);
  assert.equal(server.sockets.length, 1);
  browser.setVisibility('visible');
  await flush();
  assert.equal(server.sockets.length, 2);
  assert.equal(client.state, 'ready');
});

test('connectivity: false ignores the browser; close() stops listening', async () => {
  const { timers, browser, server, client } = setup({ client: { connectivity: false, backoff: { initialMs: 2_000, maxMs: 2_000 } } });
  await flush();
  browser.goOffline();
  server.last.serverClose(1006);
  await flush();
  assert.equal(client.state, 'waiting', 'still retrying although the browser says offline');
  await timers.advance(1_100);
  assert.equal(server.sockets.length, 2);

  const other = fakeClient(server);
  await flush();
  other.close();
  browser.goOnline();
  browser.setVisibility('hidden');
  await timers.advance(120_000, 5_000);
  browser.setVisibility('visible');
  await flush();
  assert.equal(server.sockets.length, 3, 'a closed client does not react to online or visibility');
  assert.equal(other.state, 'closed');
});

test('outside browsers (no window, document or navigator) the client runs without them', async () => {
  assert.equal(typeof globalThis.window, 'undefined');
  assert.equal(typeof globalThis.document, 'undefined');
  const { timers, server, client } = setup({ client: { backoff: { initialMs: 2_000, maxMs: 2_000 } } }, { browser: false });
  await flush();
  assert.equal(client.state, 'ready');
  server.last.serverClose(1006);
  await flush();
  assert.equal(client.state, 'waiting');
  await timers.advance(1_100);
  assert.equal(client.state, 'ready');
});
