// Basic protocol behaviour against a real nudge and a real PostgreSQL.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { NudgeClient, NudgeError } from '../src/index.js';
import { startPostgres, startNudge, freePort, mintToken, publish, Inbox, nextEvent, withTimeout } from './harness.js';

let pg;
let nudge;
const clients = [];

function client(options = {}) {
  const c = new NudgeClient(nudge.url, {
    token: () => mintToken({ sub: 'alice', topics: ['post:*', 'chat:7'] }),
    backoff: { initialMs: 50, maxMs: 500 },
    ...options,
  });
  clients.push(c);
  return c;
}

async function connectionsOpened() {
  const text = await (await fetch(`http://127.0.0.1:${nudge.port}/metrics`)).text();
  return Number(/^nudge_connections_opened_total (\d+)/m.exec(text)?.[1]);
}

before(async () => {
  pg = await startPostgres();
  nudge = await startNudge({ databaseUrl: pg.url, port: await freePort() });
});

after(async () => {
  for (const c of clients) c.close();
  await nudge?.stop();
  await pg?.stop();
});

test('authenticates with the first message, subscribes and receives a topic event', async () => {
  const frames = [];
  const c = client();
  c.on('frame', (f) => frames.push(f));
  const info = await withTimeout(c.ready(), 10_000, 'ready');
  assert.equal(info.user, 'alice');
  assert.ok(info.expiresAt > Date.now() / 1000);
  assert.equal(c.state, 'ready');

  const events = new Inbox();
  const sub = c.subscribe('post:1', events.push);
  await withTimeout(sub.ready, 5_000, 'subscribed');
  const id = await publish(pg.url, { topic: 'post:1', kind: 'comment.created', data: { comment_id: 991 } });
  const event = await events.take({ what: 'the post:1 event' });
  assert.ok(Number.isSafeInteger(event.seq) && event.seq > 0, 'events carry their seq');
  assert.deepEqual(
    { ...event, at: undefined },
    { type: 'event', id, seq: event.seq, topic: 'post:1', kind: 'comment.created', at: undefined, data: { comment_id: 991 } },
  );
  assert.match(event.at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);

  // The protocol log: auth went out first (token redacted), the reply and the event came in.
  assert.equal(frames[0].direction, 'out');
  assert.deepEqual(JSON.parse(frames[0].data), { type: 'auth', token: '<redacted>', ref: 1 });
  assert.equal(JSON.parse(frames[1].data).type, 'ready');
  assert.ok(frames.some((f) => f.direction === 'in' && JSON.parse(f.data).id === id));
  assert.ok(frames.some((f) => f.direction === 'out' && f.data.includes('"subscribe"')));

  // After unsubscribing, events on the topic no longer reach the handler.
  await sub();
  assert.deepEqual(c.topics, []);
  const other = new Inbox();
  c.subscribe('post:2', other.push);
  await publish(pg.url, { topic: 'post:1' });
  const marker = await publish(pg.url, { topic: 'post:2' });
  await other.take({ filter: (e) => e.id === marker, what: 'the post:2 marker' });
  assert.equal(events.items.length, 0, 'no post:1 event after unsubscribing');
});

test('events addressed to the user go to onPersonal, subscribed topics to their handlers', async () => {
  const c = client();
  const personal = new Inbox();
  const topical = new Inbox();
  c.onPersonal(personal.push);
  await c.subscribe('chat:7', topical.push).ready;
  const inboxId = await publish(pg.url, { topic: 'inbox', kind: 'message.created', recipients: ['alice'], data: { from: 'bob' } });
  const forBob = await publish(pg.url, { topic: 'inbox', recipients: ['bob'] });
  const chatId = await publish(pg.url, { topic: 'chat:7', kind: 'message.created' });
  const p = await personal.take({ what: 'the personal event' });
  assert.equal(p.id, inboxId);
  assert.equal(p.topic, 'inbox');
  assert.deepEqual(p.data, { from: 'bob' });
  assert.equal((await topical.take({ what: 'the chat:7 event' })).id, chatId);
  assert.ok(!personal.items.some((e) => e.id === forBob), 'bob’s event is not delivered to alice');
  assert.ok(!personal.items.some((e) => e.id === chatId));
});

test('a forbidden subscription rejects with NudgeError code forbidden', async () => {
  const c = client();
  await c.ready();
  const calls = [];
  const sub = c.subscribe('admin:1', (e) => calls.push(e));
  const error = await sub.ready.then(
    () => assert.fail('should reject'),
    (e) => e,
  );
  assert.ok(error instanceof NudgeError);
  assert.equal(error.code, 'forbidden');
  assert.equal(error.topic, 'admin:1');
  assert.match(error.message, /admin:1/);
  assert.ok(error.fromServer);
  assert.deepEqual(c.topics, [], 'a refused topic is forgotten');

  // Nobody looked at .ready: the refusal is emitted as an 'error' event rather than lost.
  const emitted = nextEvent(c, 'error', { timeoutMs: 5_000 });
  c.subscribe('has space', () => {});
  const bad = await emitted;
  assert.equal(bad.code, 'bad_request');
  assert.equal(c.state, 'ready', 'the connection stays open');
});

test('a refused static token stops the client with unauthorized', async () => {
  const errors = [];
  const c = client({ token: mintToken({ sub: 'alice', secret: 'not-the-right-secret-0123456789abcdef' }) });
  c.on('error', (e) => errors.push(e));
  const closed = nextEvent(c, 'closed');
  const error = await c.ready().then(
    () => assert.fail('should reject'),
    (e) => e,
  );
  assert.ok(error instanceof NudgeError);
  assert.equal(error.code, 'unauthorized');
  assert.equal((await closed).error.code, 'unauthorized');
  assert.equal(c.state, 'closed');
  assert.equal(errors[0]?.code, 'unauthorized');
});

test('a token too large for the server\'s frame limit stops the client with too_large', async () => {
  const topics = Array.from({ length: 300 }, (_, i) => `room:${i}`);
  const c = client({ token: mintToken({ sub: 'alice', topics }) });
  const error = await c.ready().then(
    () => assert.fail('should reject'),
    (e) => e,
  );
  assert.equal(error.code, 'too_large');
  assert.equal(c.state, 'closed');
});

test('close() closes cleanly and does not reconnect', async () => {
  const c = client();
  await c.ready();
  const before = await connectionsOpened();
  const disconnected = nextEvent(c, 'disconnected');
  let frames = 0;
  c.on('frame', () => frames++);
  c.on('ready', () => assert.fail('must not reconnect'));
  c.close();
  const d = await disconnected;
  assert.equal(d.code, 1000);
  assert.equal(d.willReconnect, false);
  assert.equal(c.state, 'closed');
  await assert.rejects(c.ready(), (e) => e instanceof NudgeError && e.code === 'closed');
  // A reconnect would happen within the 50 ms initial backoff; watch well past that.
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(await connectionsOpened(), before);
  assert.equal(frames, 0);
  assert.equal(c.state, 'closed');
});

test('a token the server refuses stops the client at once, also from a provider function (close 4001)', async () => {
  let asked = 0;
  const c = client({
    token: () => {
      asked++;
      return mintToken({ sub: 'alice', secret: 'not-the-right-secret-0123456789abcdef' });
    },
  });
  const closed = nextEvent(c, 'closed');
  const error = await c.ready().then(
    () => assert.fail('should reject'),
    (e) => e,
  );
  assert.equal(error.code, 'unauthorized');
  assert.equal(error.fromServer, true);
  assert.equal(error.closeCode, 4001);
  assert.equal((await closed).error, error);
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(asked, 1, 'no retry loop with tokens the server refuses');
  assert.equal(c.state, 'closed');
});
