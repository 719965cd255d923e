// Reconnect, keep-alive and token refresh against a real nudge that gets killed, stopped and restarted.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { NudgeClient } from '../src/index.js';
import { startPostgres, startNudge, freePort, mintToken, publish, Inbox, nextEvent, waitFor, withTimeout, SECRET } from './harness.js';

let pg;
let port;
let nudge;
let clients = [];

before(async () => {
  pg = await startPostgres();
  port = await freePort();
  nudge = await startNudge({ databaseUrl: pg.url, port });
});

afterEach(() => {
  for (const c of clients) c.close();
  clients = [];
});

after(async () => {
  await nudge?.stop();
  await pg?.stop();
});

function client(options = {}) {
  const c = new NudgeClient(`ws://127.0.0.1:${port}/ws`, {
    token: () => mintToken({ sub: 'alice', topics: ['post:*'] }),
    backoff: { initialMs: 100, maxMs: 1000 },
    ...options,
  });
  clients.push(c);
  return c;
}

/** Records every client event in order, for assertions on the sequence. */
function record(c, names) {
  const log = [];
  for (const name of names) c.on(name, (value) => log.push({ name, value }));
  return log;
}

test('reconnects after the server is killed and restarted on the same port', async () => {
  let tokensIssued = 0;
  const c = client({
    token: async () => {
      tokensIssued++;
      return mintToken({ sub: 'alice', topics: ['post:*'] });
    },
  });
  const events = new Inbox();
  const personal = new Inbox();
  c.subscribe('post:10', events.push);
  c.onPersonal(personal.push);
  await withTimeout(c.ready(), 10_000, 'first ready');
  assert.equal(tokensIssued, 1);
  const sent = [];
  c.on('frame', (f) => f.direction === 'out' && sent.push(JSON.parse(f.data)));
  const log = record(c, ['disconnected', 'ready', 'reconnected']);

  const disconnected = nextEvent(c, 'disconnected');
  nudge.signal('SIGKILL');
  await nudge.stop();
  const d = await disconnected;
  assert.equal(d.willReconnect, true);
  assert.equal(d.wasReady, true);
  assert.notEqual(c.state, 'ready');

  const reconnected = nextEvent(c, 'reconnected', { timeoutMs: 30_000 });
  nudge = await startNudge({ databaseUrl: pg.url, port });
  await reconnected;
  assert.equal(c.state, 'ready');
  assert.equal(tokensIssued, 1, 'the cached token (5 minutes left) is reused: the provider is not asked again');
  // auth first, then the subscription is restored before 'reconnected' fires.
  const lastAuth = sent.findLastIndex((m) => m.type === 'auth');
  assert.ok(lastAuth >= 0);
  assert.ok(sent.slice(lastAuth).some((m) => m.type === 'subscribe' && m.topic === 'post:10'), 'post:10 resubscribed');
  const names = log.map((e) => e.name);
  assert.equal(names[0], 'disconnected');
  assert.deepEqual(names.slice(-2), ['ready', 'reconnected']);
  assert.equal(log.at(-2).value.reconnect, true);

  const id = await publish(pg.url, { topic: 'post:10' });
  assert.equal((await events.take({ what: 'an event after reconnecting' })).id, id);
  const mine = await publish(pg.url, { topic: 'note', recipients: ['alice'] });
  assert.equal((await personal.take({ what: 'a personal event after reconnecting' })).id, mine);
});

test('keep-alive detects a server that stopped answering, then reconnects', async () => {
  const c = client({ pingIntervalMs: 200, pongTimeoutMs: 1000, connectTimeoutMs: 1500 });
  const events = new Inbox();
  c.subscribe('post:20', events.push);
  await withTimeout(c.ready(), 10_000, 'ready');
  const disconnected = nextEvent(c, 'disconnected', { timeoutMs: 5_000 });
  nudge.signal('SIGSTOP');
  let resumed = false;
  try {
    const d = await disconnected;
    assert.equal(d.code, 4000);
    assert.match(d.reason, /no frame within 1000 ms/);
    assert.equal(d.willReconnect, true);
    assert.notEqual(c.state, 'ready');
    // While stopped, the kernel still accepts TCP connections: attempts must time out, not hang.
    await nextEvent(c, 'disconnected', { timeoutMs: 5_000, filter: (e) => /not ready within/.test(e.reason) });
    const reconnected = nextEvent(c, 'reconnected', { timeoutMs: 15_000 });
    nudge.signal('SIGCONT');
    resumed = true;
    await reconnected;
  } finally {
    if (!resumed) nudge.signal('SIGCONT');
  }
  const id = await publish(pg.url, { topic: 'post:20' });
  assert.equal((await events.take({ what: 'an event after the keep-alive reconnect' })).id, id);
});

test('refreshes the token before it expires and keeps the connection', async () => {
  const issued = [];
  const c = client({
    refreshBeforeSeconds: 2,
    token: () => {
      const exp = Math.floor(Date.now() / 1000) + 3;
      issued.push(exp);
      return mintToken({ sub: 'alice', topics: ['post:*'], exp });
    },
  });
  const log = record(c, ['disconnected', 'refreshed', 'error']);
  const events = new Inbox();
  c.subscribe('post:30', events.push);
  const { expiresAt: firstExp } = await withTimeout(c.ready(), 10_000, 'ready');
  assert.equal(firstExp, issued[0]);

  const refreshed = await nextEvent(c, 'refreshed', { timeoutMs: 5_000 });
  assert.ok(issued.length >= 2, 'the provider was asked again');
  assert.ok(refreshed.expiresAt >= firstExp);
  assert.ok(Date.now() < firstExp * 1000, 'refreshed before the first token expired');

  // Live past the first token's expiry (plus a margin for the server's timer).
  await waitFor(() => Date.now() > firstExp * 1000 + 1500, { timeoutMs: 6_000, what: 'the first token to expire' });
  const id = await publish(pg.url, { topic: 'post:30' });
  assert.equal((await events.take({ what: 'an event after the first token expired' })).id, id);
  assert.deepEqual(log.filter((e) => e.name !== 'refreshed'), [], 'no disconnect, no error');
  assert.ok(log.filter((e) => e.name === 'refreshed').length >= 2, 'refreshed again as each token neared expiry');
  assert.equal(c.state, 'ready');
});

test('a token that expires without a refresh is replaced on a fresh connection', async () => {
  // A provider that only hands out 2-second tokens, with refresh disabled by refreshBeforeSeconds < 0:
  // the server closes with token_expired (4001) and the client comes straight back with a new token.
  let issued = 0;
  const c = client({
    refreshBeforeSeconds: -10,
    token: () => {
      issued++;
      return mintToken({ sub: 'alice', topics: ['post:*'], ttlSeconds: 2 });
    },
  });
  const errors = [];
  c.on('error', (e) => errors.push(e));
  const events = new Inbox();
  c.subscribe('post:40', events.push);
  await c.ready();
  const d = await nextEvent(c, 'disconnected', { timeoutMs: 5_000 });
  assert.equal(d.code, 4001);
  assert.equal(errors[0]?.code, 'token_expired');
  await nextEvent(c, 'reconnected', { timeoutMs: 5_000 });
  assert.ok(issued >= 2);
  const id = await publish(pg.url, { topic: 'post:40' });
  assert.equal((await events.take()).id, id);
});

test('a refreshed token that no longer allows a topic revokes that subscription', async () => {
  let calls = 0;
  const c = client({
    refreshBeforeSeconds: 2,
    token: () => {
      calls++;
      // First token: post:* and chat:*, 3 s. Every later one: chat:* only.
      const topics = calls === 1 ? ['post:*', 'chat:*'] : ['chat:*'];
      return mintToken({ sub: 'alice', topics, ttlSeconds: calls === 1 ? 3 : 300 });
    },
  });
  const chat = new Inbox();
  c.subscribe('chat:1', chat.push);
  c.subscribe('post:50', () => assert.fail('post:50 was revoked'));
  await c.ready();
  assert.deepEqual(c.topics.sort(), ['chat:1', 'post:50']);
  const revoked = await nextEvent(c, 'revoked', { timeoutMs: 5_000 });
  assert.equal(revoked.topic, 'post:50');
  await nextEvent(c, 'refreshed', { timeoutMs: 5_000 });
  assert.deepEqual(c.topics, ['chat:1']);
  await publish(pg.url, { topic: 'post:50' });
  const id = await publish(pg.url, { topic: 'chat:1' });
  assert.equal((await chat.take()).id, id);
});

test('nudge shutting down (SIGTERM, close 1001): clients come back after a delay spread over goingAwayMs', async () => {
  const clientsOf = [0, 1, 2].map(() => client({ backoff: { initialMs: 100, maxMs: 1000, goingAwayMs: 2500 } }));
  await Promise.all(clientsOf.map((c) => withTimeout(c.ready(), 10_000, 'ready')));
  const gone = clientsOf.map((c) => nextEvent(c, 'disconnected'));
  nudge.signal('SIGTERM');
  const ds = await Promise.all(gone);
  await nudge.stop();
  for (const d of ds) {
    assert.equal(d.code, 1001, 'nudge says it is going away');
    assert.equal(d.willReconnect, true);
    assert.ok(d.retryInMs >= 0 && d.retryInMs < 2500, `delay ${d.retryInMs} ms within the 2500 ms window`);
  }
  const back = clientsOf.map((c) => nextEvent(c, 'reconnected', { timeoutMs: 30_000 }));
  nudge = await startNudge({ databaseUrl: pg.url, port });
  await Promise.all(back);
});

test("the server's key changes: the cached token is refused, a fresh one is asked for at once", async () => {
  let secret = SECRET;
  let issued = 0;
  const c = client({
    token: () => {
      issued++;
      return mintToken({ sub: 'alice', topics: ['post:*'], secret });
    },
  });
  const errors = [];
  c.on('error', (e) => errors.push(e));
  await withTimeout(c.ready(), 10_000, 'ready');
  assert.equal(issued, 1);
  const rotated = 'a-rotated-secret-for-the-js-client-0123456789';
  try {
    const lost = nextEvent(c, 'disconnected');
    nudge.signal('SIGKILL');
    await nudge.stop();
    await lost;
    secret = rotated;
    const refusal = nextEvent(c, 'disconnected', { timeoutMs: 30_000, filter: (d) => d.code === 4001 });
    const reconnected = nextEvent(c, 'reconnected', { timeoutMs: 30_000 });
    nudge = await startNudge({ databaseUrl: pg.url, port, env: { NUDGE_JWT_SECRET: rotated } });
    const refused = await refusal;
    assert.equal(refused.retryInMs, 0, 'retried at once, not after a backoff');
    await reconnected;
    assert.equal(issued, 2, 'the provider was asked once more, after the refusal');
    assert.equal(errors.filter((e) => e.code === 'unauthorized').length, 1);
    assert.equal(errors.find((e) => e.code === 'unauthorized').closeCode, 4001);
  } finally {
    c.close();
    await nudge.stop();
    nudge = await startNudge({ databaseUrl: pg.url, port });
  }
});
