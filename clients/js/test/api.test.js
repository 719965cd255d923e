// API additions, with a fake server: `since`, ready({timeout}), the 'state' event, unhandled errors on the
// console, NudgeError.closeCode, and a constructor that is safe in server-side rendering.
import { test, mock, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { NudgeClient, NudgeError } from '../src/index.js';
import { fakeServer, fakeClient, fakeTimers, flush, record } from './fake.js';

let cleanup = [];
afterEach(() => {
  for (const fn of cleanup.reverse()) fn();
  cleanup = [];
});

function track(client) {
  cleanup.push(() => client.close());
  return client;
}

const event = (seq, topic = 'post:1') => ({ type: 'event', id: 1000 + seq, seq, topic, kind: 'k', at: '2026-01-01T00:00:00.000Z', data: {} });

/** A server whose resume replays `replay` seqs and answers with `reply` fields. */
function resumingServer(replay, reply) {
  return fakeServer({
    script(socket, msg) {
      if (msg.type !== 'resume') return false;
      for (const seq of replay) socket.reply(event(seq));
      socket.reply({ type: 'resumed', since: msg.since, replayed: replay.length, ref: msg.ref, ...reply(msg) });
      return true;
    },
  });
}

test('since: the first connection resumes from the stored position (a reload), before ready', async () => {
  const server = resumingServer([42, 43], () => ({ until: 43, complete: true }));
  const c = track(fakeClient(server, { since: 41 }));
  const seen = [];
  c.subscribe('post:1', (e) => seen.push(e.seq));
  const log = record(c, ['ready', 'reconnected', 'refetch']);
  assert.equal(c.lastSeq, 41);
  await c.ready();
  const sent = server.last.sent.map((m) => m.type);
  assert.deepEqual(sent, ['auth', 'subscribe', 'resume'], 'subscribed first, then resumed');
  assert.equal(server.sent('resume')[0].since, 41);
  assert.deepEqual(seen, [42, 43], 'the replay reached the handlers before ready');
  assert.equal(c.lastSeq, 43);
  const [ready] = log.of('ready');
  assert.deepEqual(
    { reconnect: ready.reconnect, resumed: ready.resumed, complete: ready.complete, replayed: ready.replayed },
    { reconnect: false, resumed: true, complete: true, replayed: 2 },
  );
  assert.deepEqual(log.of('reconnected'), [], 'not a reconnect');
  assert.deepEqual(log.of('refetch'), []);
});

test('since: an incomplete resume on the first connection emits refetch after ready', async () => {
  const server = resumingServer([], () => ({ until: 900, complete: false }));
  const c = track(fakeClient(server, { since: 7 }));
  const log = record(c, ['ready', 'refetch']);
  await c.ready();
  await flush();
  assert.deepEqual(log.map((e) => e.name), ['ready', 'refetch']);
  assert.deepEqual(log.of('refetch')[0], { reason: 'incomplete', since: 7, until: 900 });
  assert.equal(c.lastSeq, 900);
});

test('since: without it the first connection does not resume; a bad value is refused', async () => {
  const server = fakeServer();
  const c = track(fakeClient(server));
  await c.ready();
  assert.deepEqual(server.sent('resume'), []);
  for (const since of [-1, 1.5, '12', NaN]) {
    assert.throws(() => fakeClient(server, { since, autoConnect: false }), TypeError);
  }
});

test('ready({timeout}) rejects with code timeout while the client keeps trying', async () => {
  const timers = fakeTimers();
  cleanup.push(() => timers.reset());
  const options = { refuseConnections: true };
  const server = fakeServer(options);
  const c = track(fakeClient(server, { backoff: { initialMs: 100, maxMs: 100 } }));
  const outcome = c.ready({ timeout: 2_000 }).then(
    () => 'resolved',
    (e) => e,
  );
  await timers.advance(1_900);
  assert.equal(await Promise.race([outcome, 'pending']), 'pending');
  await timers.advance(200);
  const error = await outcome;
  assert.ok(error instanceof NudgeError);
  assert.equal(error.code, 'timeout');
  assert.equal(error.fromServer, false);
  assert.match(error.message, /not ready within 2000 ms/);
  assert.notEqual(c.state, 'closed', 'the client goes on trying');

  const later = c.ready({ timeout: 10_000 });
  options.refuseConnections = false;
  await timers.advance(500);
  assert.equal((await later).user, 'alice');
  assert.equal((await c.ready({ timeout: 0 })).user, 'alice', 'at once when ready');
});

test("'state' events: every change, with the previous state", async () => {
  const timers = fakeTimers();
  cleanup.push(() => timers.reset());
  const server = fakeServer();
  const c = track(fakeClient(server, { autoConnect: false, backoff: { initialMs: 100, maxMs: 100 } }));
  const states = [];
  c.on('state', (s) => states.push(`${s.previous}->${s.state}`));
  c.connect();
  await flush();
  server.last.serverClose(1006);
  await timers.advance(200);
  c.close();
  assert.deepEqual(states, ['idle->connecting', 'connecting->ready', 'ready->waiting', 'waiting->connecting', 'connecting->ready', 'ready->closed']);
});

test('errors without an error listener are written to the console, once per code', async () => {
  const consoleError = mock.method(console, 'error', () => {});
  cleanup.push(() => consoleError.mock.restore());
  const server = fakeServer();
  const c = track(fakeClient(server));
  await c.ready();
  server.last.reply({ type: 'error', code: 'rate_limited', message: 'slow down' });
  server.last.reply({ type: 'error', code: 'rate_limited', message: 'slow down' });
  server.last.reply({ type: 'error', code: 'bad_request', message: 'what?' });
  assert.equal(consoleError.mock.callCount(), 2);
  const [text, error] = consoleError.mock.calls[0].arguments;
  assert.match(text, /unhandled 'rate_limited' error/);
  assert.match(text, /client\.on\('error'/);
  assert.equal(error.code, 'rate_limited');

  // With a listener nothing goes to the console.
  const other = track(fakeClient(server));
  const errors = [];
  other.on('error', (e) => errors.push(e));
  await other.ready();
  server.last.reply({ type: 'error', code: 'forbidden', message: 'no' });
  assert.equal(errors.length, 1);
  assert.equal(consoleError.mock.callCount(), 2);
});

test('NudgeError.closeCode: on the error that explains a close, and on requests the close cut off', async () => {
  const server = fakeServer({ script: (socket, msg) => msg.type === 'unsubscribe' }); // never answers unsubscribe
  const c = track(fakeClient(server, { backoff: { initialMs: 1, maxMs: 1 } }));
  const errors = [];
  c.on('error', (e) => errors.push(e));
  await c.ready();
  c.subscribe('post:1', () => {});
  await flush();
  // A request in flight when the connection drops rejects with 'disconnected' and the close code.
  const refreshed = c._request({ type: 'refresh', token: 'x' });
  server.last.serverClose(1013, 'too slow');
  const error = await refreshed.catch((e) => e);
  assert.equal(error.code, 'disconnected');
  assert.equal(error.closeCode, 1013);
  await c.ready();
  // The token_expired error frame is emitted when the close arrives, with its code.
  server.last.serverClose(4001, 'token expired', { code: 'token_expired', message: 'the token expired' });
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, 'token_expired');
  assert.equal(errors[0].closeCode, 4001);
});

test('server-side rendering: no WebSocket and autoConnect: false constructs without a socket', () => {
  const saved = Object.getOwnPropertyDescriptor(globalThis, 'WebSocket');
  delete globalThis.WebSocket;
  try {
    assert.equal(typeof globalThis.WebSocket, 'undefined');
    const c = new NudgeClient('wss://example.com/ws', { token: 'x', autoConnect: false });
    assert.equal(c.state, 'idle');
    c.subscribe('post:1', () => {}); // subscriptions may be declared before connecting
    assert.throws(() => c.connect(), /no WebSocket available/);
    assert.throws(() => new NudgeClient('wss://example.com/ws', { token: 'x' }), /no WebSocket available/);
    c.close();
  } finally {
    if (saved) Object.defineProperty(globalThis, 'WebSocket', saved);
  }
});
