// Reconnect policy with a fake server and fake timers: the close-code table, the 1001 spread, a backoff that a
// briefly-lived connection does not reset, the token cache, 4003 (revoked), shouldReconnect, unknown codes.
import { test, mock, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { NudgeError } from '../src/index.js';
import { fakeServer, fakeClient, fakeTimers, flush, record, jwt } from './fake.js';

let cleanup = [];
afterEach(() => {
  for (const fn of cleanup.reverse()) fn();
  cleanup = [];
});

function setup({ server: serverOptions, random = 0.5, ...clientOptions } = {}) {
  const timers = fakeTimers();
  cleanup.push(() => timers.reset());
  const rnd = mock.method(Math, 'random', () => random);
  cleanup.push(() => rnd.mock.restore());
  const server = fakeServer(serverOptions);
  const client = fakeClient(server, clientOptions);
  cleanup.push(() => client.close());
  const log = record(client);
  return { timers, server, client, log, rnd };
}

/** A provider that counts its calls and hands out `make(n)` (default: a 1-hour JWT numbered n). */
function provider(make = (n) => jwt({ n })) {
  const fn = async () => make(++fn.calls);
  fn.calls = 0;
  return fn;
}

// The README's table, row by row: [close code, error frame before it (or none), reconnects?, delay].
const TABLE = [
  [1000, null, true, 'backoff'],
  [1001, null, true, 'spread'],
  [1006, null, true, 'backoff'],
  [1011, null, true, 'backoff'],
  [1012, null, true, 'spread'],
  [1013, null, true, 'backoff'],
  [3000, null, true, 'backoff'],
  [4000, null, true, 'backoff'],
  [4001, { code: 'token_expired', message: 'token expired' }, true, 'at once'],
  [4001, { code: 'unauthorized', message: 'no auth message within 10s' }, false],
  [4001, null, false],
  [1009, { code: 'too_large', message: 'frame too large' }, false],
  [4002, null, false],
  [4003, { code: 'revoked', message: 'sessions of alice were revoked' }, true, 'at once'],
  [4004, { code: 'some_future_code', message: 'go away' }, false],
  [4999, null, false],
];

for (const [code, error, reconnects, delay] of TABLE) {
  test(`close ${code}${error ? ` after error ${error.code}` : ''}: ${reconnects ? `reconnect (${delay})` : 'stop'}`, async () => {
    const { server, client, log } = setup({ token: provider() });
    await flush();
    assert.equal(client.state, 'ready');
    server.last.serverClose(code, 'bye', error ?? undefined);
    await flush(2);
    if (reconnects) {
      const [d] = log.of('disconnected');
      assert.equal(d.code, code);
      assert.equal(d.willReconnect, true);
      // Math.random() is 0.5; backoff cap 1000 ms for the first failure; the 1001 spread window is 5000 ms.
      const expected = { backoff: 500, spread: 2500, 'at once': 0 }[delay];
      assert.equal(d.retryInMs, expected);
      assert.deepEqual(log.of('closed'), []);
    } else {
      assert.equal(client.state, 'closed');
      const [{ error: stopped }] = log.of('closed');
      assert.ok(stopped instanceof NudgeError);
      assert.equal(stopped.closeCode, code, 'NudgeError.closeCode says which close stopped the client');
      if (error) {
        assert.equal(stopped.code, error.code);
        assert.equal(stopped.fromServer, true);
        assert.equal(log.of('error')[0], stopped, "the server's error, emitted once, with the close code");
      } else {
        assert.equal(stopped.fromServer, false);
      }
      assert.equal(log.of('disconnected')[0].willReconnect, false);
      await assert.rejects(client.ready(), (e) => e === stopped);
      assert.equal(server.sockets.length, 1);
    }
  });
}

test('1001: reconnects spread over goingAwayMs, never all at once', async () => {
  const delays = [];
  for (const random of [0, 0.25, 0.999]) {
    const { server, log } = setup({ random, backoff: { goingAwayMs: 8_000 } });
    await flush();
    server.last.serverClose(1001, 'server shutting down');
    await flush(2);
    delays.push(log.of('disconnected')[0].retryInMs);
    for (const fn of cleanup.reverse()) fn();
    cleanup = [];
  }
  assert.deepEqual(delays, [0, 2000, 7992]);
});

test('the backoff is not reset by connections that live only briefly, only by one that stays up stableMs', async () => {
  const { timers, server, log } = setup({ random: 0.999, backoff: { initialMs: 1_000, maxMs: 30_000, stableMs: 10_000 } });
  await flush();
  const delays = [];
  for (let i = 0; i < 5; i++) {
    await timers.advance(2_000); // up for 2 s, then lost
    server.last.serverClose(1006);
    await flush(2);
    const d = log.of('disconnected').at(-1);
    delays.push(d.retryInMs);
    await timers.advance(d.retryInMs + 50);
  }
  assert.deepEqual(delays, [999, 1998, 3996, 7992, 15984], 'each brief connection counts as a failure');
  await timers.advance(10_000); // this one stays up long enough
  server.last.serverClose(1006);
  await flush(2);
  assert.equal(log.of('disconnected').at(-1).retryInMs, 999, 'reset after a stable connection');
});

test('token cache: the provider is asked only when a new token is needed', async () => {
  const token = provider();
  const { timers, server, client } = setup({ token, refreshBeforeSeconds: 60 });
  await flush();
  for (let i = 0; i < 3; i++) {
    server.last.serverClose(1006);
    await timers.advance(5_000); // brief connections: the backoff grows (500, 1000, 2000 ms)
  }
  assert.equal(client.state, 'ready');
  assert.equal(server.sockets.length, 4);
  assert.equal(token.calls, 1, 'reconnects reuse the cached token');
  assert.equal(new Set(server.sent('auth').map((m) => m.token)).size, 1);

  // 60 s before exp the refresh asks the provider (always: it wants a fresher token) ...
  await timers.advance(3_540_000, 60_000);
  assert.equal(token.calls, 2);
  const [refresh] = server.sent('refresh');
  assert.ok(refresh, 'refresh sent');
  // ... and the refreshed token is the one reused by the next reconnect.
  server.last.serverClose(1006);
  await timers.advance(1_000); // the connection was stable: the backoff starts over (500 ms)
  assert.equal(token.calls, 2);
  assert.equal(server.sent('auth').at(-1).token, refresh.token);

  // close() forgets the token: the next connect() may be for another user.
  client.close();
  client.connect();
  await flush();
  assert.equal(token.calls, 3);
});

test('token cache: a token close to its exp, without exp, or with cacheToken: false is not reused', async () => {
  const nearExp = provider((n) => jwt({ n, ttlSeconds: 4 })); // less than the 5 s minimum margin left
  const opaque = provider((n) => `opaque-token-${n}`); // not a JWT: no exp to trust
  const off = provider();
  for (const [token, extra] of [[nearExp, {}], [opaque, {}], [off, { cacheToken: false }]]) {
    const { timers, server } = setup({ token, refreshBeforeSeconds: 0, ...extra });
    await flush();
    server.last.serverClose(1006);
    await timers.advance(1_000);
    assert.equal(server.sockets.length, 2);
    assert.equal(token.calls, 2);
    for (const fn of cleanup.reverse()) fn();
    cleanup = [];
  }
});

test('a refused cached token: the provider is asked once, at once; a refused fresh token stops', async () => {
  const refused = new Set();
  let refuseAll = false;
  const token = provider();
  const { timers, server, client, log } = setup({ token, server: { refuse: (t) => (refuseAll || refused.has(t)) && 'invalid signature' } });
  await flush();
  // The server's key is rotated: the token the client holds is no longer accepted.
  refused.add(server.last.token);
  server.last.serverClose(1006);
  await timers.advance(1_000);
  assert.equal(token.calls, 2, 'the provider was asked for a fresh token');
  assert.equal(client.state, 'ready');
  const d = log.of('disconnected');
  assert.equal(d[1].code, 4001);
  assert.equal(d[1].retryInMs, 0);
  const [error] = log.of('error');
  assert.equal(error.code, 'unauthorized');
  assert.equal(error.closeCode, 4001);

  // Now every token is refused, the cached one and then a fresh one: stop, no retry loop.
  refuseAll = true;
  server.last.serverClose(1006);
  await timers.advance(5_000);
  assert.equal(token.calls, 3);
  assert.equal(client.state, 'closed');
  assert.equal(log.of('closed')[0].error.code, 'unauthorized');
  await timers.advance(60_000, 1_000);
  assert.equal(token.calls, 3);
});

test('a refused token from the provider stops at once (no retries)', async () => {
  const token = provider();
  const { timers, server, client, log } = setup({ token, server: { refuse: () => 'bad token' } });
  await timers.advance(60_000, 1_000);
  assert.equal(client.state, 'closed');
  assert.equal(server.sockets.length, 1);
  assert.equal(token.calls, 1);
  assert.equal(log.of('closed')[0].error.closeCode, 4001);
});

const revoke = (socket) => socket.serverClose(4003, 'revoked', { code: 'revoked', message: 'the sessions of alice were revoked' });

test('4003 revoked: the provider is asked once more; a new token reconnects at once', async () => {
  const token = provider();
  const { timers, server, client, log } = setup({ token });
  await flush();
  revoke(server.last);
  await timers.advance(10);
  assert.equal(token.calls, 2, 'asked once more, although the cached token had an hour left');
  assert.equal(client.state, 'ready');
  assert.notEqual(server.sockets[1].token, server.sockets[0].token);
  const [error] = log.of('error');
  assert.equal(error.code, 'revoked');
  assert.equal(error.fromServer, true);
  assert.equal(error.closeCode, 4003);
  assert.equal(log.of('disconnected')[0].retryInMs, 0);

  // Revoked again before that connection was stable (backoff.stableMs): the new token did not help. Stop.
  await timers.advance(2_000);
  revoke(server.last);
  await timers.advance(10);
  assert.equal(client.state, 'closed');
  assert.equal(token.calls, 2);
  assert.equal(log.of('closed')[0].error.code, 'revoked');
});

test('4003 revoked: after a stable connection, a later revocation is answered with a new token again', async () => {
  const token = provider();
  const { timers, server, client } = setup({ token });
  await flush();
  revoke(server.last);
  await timers.advance(15_000);
  revoke(server.last);
  await timers.advance(10);
  assert.equal(client.state, 'ready');
  assert.equal(token.calls, 3);
});

test('4003 revoked: the provider returning the same token, null, or a string token all stop', async () => {
  const fixed = jwt();
  const cases = [
    [async () => fixed, 'revoked'],
    [provider((n) => (n === 1 ? jwt() : null)), 'unauthorized'],
    [fixed, 'revoked'],
  ];
  for (const [token, code] of cases) {
    const { timers, server, client, log } = setup({ token });
    await flush();
    revoke(server.last);
    await timers.advance(10);
    assert.equal(client.state, 'closed');
    assert.equal(server.sockets.length, 1, 'no second connection');
    assert.equal(log.of('closed')[0].error.code, code);
    for (const fn of cleanup.reverse()) fn();
    cleanup = [];
  }
});

test('shouldReconnect overrides the table both ways, and sees code, reason, error and the default', async () => {
  const calls = [];
  const { timers, server, client, log } = setup({
    shouldReconnect: (info) => {
      calls.push(info);
      if (info.code === 4002) return true; // "we know 4002: come back later"
      if (info.code === 1013) return false; // "do not come back"
      if (info.code === 1011) throw new Error('oops');
      return undefined; // the table decides
    },
  });
  await flush();
  server.last.serverClose(4002, 'maintenance', { code: 'maintenance', message: 'back soon' });
  await flush(2);
  assert.equal(client.state, 'waiting');
  assert.equal(calls[0].code, 4002);
  assert.equal(calls[0].reason, 'maintenance');
  assert.equal(calls[0].error.code, 'maintenance');
  assert.equal(calls[0].willReconnect, false);
  await timers.advance(1_000);
  server.last.serverClose(1006);
  await timers.advance(2_000);
  assert.equal(calls[1].willReconnect, true);
  assert.equal(calls[1].error, null);
  assert.equal(client.state, 'ready');
  server.last.serverClose(1011);
  await timers.advance(4_000);
  assert.equal(log.of('error').at(-1).code, 'handler', 'a throwing hook is reported and the table used');
  assert.equal(client.state, 'ready');
  server.last.serverClose(1013, 'too slow');
  await flush(2);
  assert.equal(client.state, 'closed');
  const stopped = log.of('closed')[0].error;
  assert.equal(stopped.code, 'connection_closed');
  assert.equal(stopped.closeCode, 1013);
});

test('shouldReconnect is asked when the client gives up on a dead connection itself (4000)', async () => {
  const calls = [];
  const { timers, server, client } = setup({
    pingIntervalMs: 1_000,
    pongTimeoutMs: 1_000,
    shouldReconnect: (info) => (calls.push(info), false),
  });
  await flush();
  server.last.mute = true;
  await timers.advance(2_100);
  assert.equal(calls.length, 1);
  assert.equal(calls[0].code, 4000);
  assert.equal(client.state, 'closed');
  assert.equal(server.sockets[0].closedWith.code, 4000);
});

test('error codes this client does not know are passed through with fromServer: true', async () => {
  const { server, client, log } = setup();
  await flush();
  server.last.reply({ type: 'error', code: 'quota_exceeded', message: 'slow down' });
  server.last.reply({ type: 'error', message: 'no code at all' });
  await flush();
  const [a, b] = log.of('error');
  assert.equal(a.code, 'quota_exceeded');
  assert.equal(a.message, 'slow down');
  assert.equal(a.fromServer, true);
  assert.equal(a.closeCode, undefined, 'the connection stays open: no close code');
  assert.equal(b.code, 'unknown');
  assert.equal(b.fromServer, true);
  assert.equal(client.state, 'ready');
  // Client-side codes say fromServer: false, also when they reuse a server code's name.
  assert.equal(new NudgeError('timeout', 'x').fromServer, false);
  assert.equal(new NudgeError('forbidden', 'x').fromServer, true);
  assert.equal(new NudgeError('unauthorized', 'x', { fromServer: false }).fromServer, false);
});
