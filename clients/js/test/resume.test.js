// Resume after a reconnect (protocol v1 `seq` + `resume`) against real nudge nodes and a real PostgreSQL.
// Each test gets its own database, so one test's retention sweep or cursor never touches another's events.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { NudgeClient } from '../src/index.js';
import { startPostgres, startNudge, freePort, mintToken, publish, psql, Inbox, nextEvent, waitFor, withTimeout } from './harness.js';

let pg;
let clients = [];
let nodes = [];

before(async () => {
  pg = await startPostgres();
});

afterEach(async () => {
  for (const c of clients) c.close();
  clients = [];
  const running = nodes;
  nodes = [];
  await Promise.all(running.map((n) => n.stop()));
});

after(async () => {
  await pg?.stop();
});

/** A fresh database on the shared cluster; returns its URL. */
async function database(name) {
  await psql(pg.url, `CREATE DATABASE ${name}`);
  return pg.url.replace(/\/[^/]*$/, `/${name}`);
}

/** Start a nudge node; it is stopped after the test even if the test fails. */
async function node(databaseUrl, port, env = {}) {
  const n = await startNudge({ databaseUrl, port, env });
  nodes.push(n);
  return n;
}

/** SIGKILL a node (no goodbye to its clients) and wait for its process to be gone. */
async function kill(n) {
  n.signal('SIGKILL');
  await n.stop();
  nodes = nodes.filter((x) => x !== n);
}

/**
 * Holds the client's reconnect attempts (its token provider waits) while closed. A restarted nudge accepts
 * WebSockets before its delivery cursor is loaded from the database, and a `resume` in that window answers
 * `complete: true` without replaying what was missed (reported as a server issue); the tests wait for /readyz
 * (which startNudge does) before letting the client in, so they test the client, not that race.
 */
class Gate {
  constructor() {
    this.opened = Promise.resolve();
  }
  close() {
    this.opened = new Promise((resolve) => (this.open = resolve));
  }
}

function client(port, options = {}, gate = new Gate()) {
  const c = new NudgeClient(`ws://127.0.0.1:${port}/ws`, {
    token: async () => {
      await gate.opened;
      return mintToken({ sub: 'alice', topics: ['post:*'] });
    },
    backoff: { initialMs: 100, maxMs: 500 },
    ...options,
  });
  clients.push(c);
  return c;
}

/** Everything the app would see: events (topic + personal handlers), refetch and reconnected. */
function observe(c, topics) {
  const seen = { events: [], refetch: [], reconnected: [], sent: [] };
  for (const topic of topics) c.subscribe(topic, (e) => seen.events.push(e));
  c.onPersonal((e) => seen.events.push(e));
  c.on('refetch', (r) => seen.refetch.push(r));
  c.on('reconnected', (r) => seen.reconnected.push(r));
  c.on('frame', (f) => f.direction === 'out' && seen.sent.push(JSON.parse(f.data)));
  return seen;
}

/** Wait until every event row has been claimed (or expired) by some node. */
async function claimed(databaseUrl) {
  await waitFor(async () => (await psql(databaseUrl, 'SELECT count(*) FROM nudge.events WHERE processed_at IS NULL')) === '0', {
    timeoutMs: 10_000,
    what: 'the other node to claim the events',
  });
}

test('events published while disconnected are replayed exactly once, in order, without a refetch', async () => {
  const db = await database('replay');
  const [p1, p2] = [await freePort(), await freePort()];
  let n1 = await node(db, p1);
  await node(db, p2);
  const gate = new Gate();
  const c = client(p1, {}, gate);
  const seen = observe(c, ['post:1']);
  await withTimeout(c.ready(), 10_000, 'first ready');

  const first = await publish(db, { topic: 'post:1' });
  await waitFor(() => seen.events.length === 1, { what: 'the first live event' });
  assert.equal(seen.events[0].id, first);
  const seq0 = seen.events[0].seq;
  assert.ok(Number.isSafeInteger(seq0) && seq0 > 0, `events carry a seq (${seq0})`);
  assert.equal(c.lastSeq, seq0);

  const disconnected = nextEvent(c, 'disconnected');
  gate.close();
  await kill(n1);
  await disconnected;

  // Claimed by node 2 while the client is away: they get seqs, but node 1 (restarted later) starts its cursor
  // past them, so only the replay can bring them.
  const missed = [];
  missed.push(await publish(db, { topic: 'post:1', data: { n: 1 } }));
  missed.push(await publish(db, { topic: 'note', recipients: ['alice'], data: { n: 2 } }));
  await publish(db, { topic: 'post:2', data: { not: 'subscribed' } });
  await publish(db, { topic: 'note', recipients: ['bob'], data: { not: 'mine' } });
  missed.push(await publish(db, { topic: 'post:1', data: { n: 3 } }));
  await claimed(db);

  const reconnected = nextEvent(c, 'reconnected', { timeoutMs: 15_000 });
  n1 = await node(db, p1);
  gate.open();
  const info = await reconnected;
  assert.deepEqual(
    { resumed: info.resumed, complete: info.complete, refetch: info.refetch, replayed: info.replayed },
    { resumed: true, complete: true, refetch: false, replayed: 3 },
  );
  assert.equal(info.user, 'alice');
  assert.deepEqual(seen.events.slice(1).map((e) => e.id), missed, 'the missed events, once each, in order');

  const resumes = seen.sent.filter((m) => m.type === 'resume');
  assert.equal(resumes.length, 1);
  assert.equal(resumes[0].since, seq0);
  // resume goes after the subscription is restored (the server replays the topics subscribed at that moment).
  const lastSubscribe = seen.sent.findLastIndex((m) => m.type === 'subscribe' && m.topic === 'post:1');
  assert.ok(lastSubscribe >= 0 && lastSubscribe < seen.sent.indexOf(resumes[0]), 'subscribe before resume');

  // And live again, through node 1 or node 2's claim: exactly once.
  const live = await publish(db, { topic: 'post:1', data: { n: 4 } });
  await waitFor(() => seen.events.some((e) => e.id === live), { what: 'a live event after the resume' });
  await new Promise((r) => setTimeout(r, 300)); // room for a duplicate to show up
  const ids = seen.events.map((e) => e.id);
  assert.deepEqual(ids, [first, ...missed, live]);
  const seqs = seen.events.map((e) => e.seq);
  assert.deepEqual([...seqs].sort((a, b) => a - b), seqs, 'delivered in seq order');
  assert.equal(new Set(seqs).size, seqs.length, 'no seq twice');
  assert.equal(c.lastSeq, seqs.at(-1));
  assert.deepEqual(seen.refetch, [], 'no refetch');
});

test('events deleted after the retention while away: reconnect emits refetch "incomplete"', async () => {
  const db = await database('retention');
  const env = { NUDGE_RETENTION: '1s' };
  const [p1, p2] = [await freePort(), await freePort()];
  let n1 = await node(db, p1, env);
  await node(db, p2, env);
  const gate = new Gate();
  const c = client(p1, {}, gate);
  const seen = observe(c, ['post:1']);
  await withTimeout(c.ready(), 10_000, 'first ready');
  await publish(db, { topic: 'post:1' });
  await waitFor(() => seen.events.length === 1, { what: 'the first live event' });
  const seq0 = c.lastSeq;
  assert.ok(seq0 > 0);

  const disconnected = nextEvent(c, 'disconnected');
  gate.close();
  await kill(n1);
  await disconnected;
  await publish(db, { topic: 'post:1', data: { n: 1 } });
  await publish(db, { topic: 'note', recipients: ['alice'] });
  await claimed(db);
  await waitFor(async () => (await psql(db, 'SELECT count(*) FROM nudge.events')) === '0', {
    timeoutMs: 10_000,
    what: 'the retention sweep to delete every row',
  });

  const refetch = nextEvent(c, 'refetch', { timeoutMs: 15_000 });
  const reconnected = nextEvent(c, 'reconnected', { timeoutMs: 15_000 });
  n1 = await node(db, p1, env);
  gate.open();
  const info = await reconnected;
  assert.equal(info.resumed, true);
  assert.equal(info.complete, false);
  assert.equal(info.refetch, true);
  const r = await refetch;
  assert.equal(r.reason, 'incomplete');
  assert.equal(r.since, seq0);
  assert.equal(seen.refetch.length, 1, 'one refetch per reconnect');
  assert.equal(seen.events.length, 1, 'nothing replayed: the rows are gone');
  assert.ok(c.lastSeq >= seq0 + 2, `the position moved to the resume's until (${c.lastSeq})`);

  // The connection still delivers live events after an incomplete resume.
  const live = await publish(db, { topic: 'post:1', data: { n: 3 } });
  await waitFor(() => seen.events.some((e) => e.id === live), { what: 'a live event after the incomplete resume' });
});

test('a client that never saw an event cannot resume: reconnect emits refetch "no_position"', async () => {
  const db = await database('noposition');
  const port = await freePort();
  let n = await node(db, port);
  const c = client(port);
  const seen = observe(c, ['post:1']);
  await withTimeout(c.ready(), 10_000, 'first ready');
  assert.equal(c.lastSeq, null);

  const disconnected = nextEvent(c, 'disconnected');
  await kill(n);
  await disconnected;
  const refetch = nextEvent(c, 'refetch', { timeoutMs: 15_000 });
  const reconnected = nextEvent(c, 'reconnected', { timeoutMs: 15_000 });
  n = await node(db, port);
  const info = await reconnected;
  assert.deepEqual(
    { resumed: info.resumed, complete: info.complete, refetch: info.refetch, replayed: info.replayed },
    { resumed: false, complete: false, refetch: true, replayed: 0 },
  );
  assert.deepEqual(await refetch, { reason: 'no_position', since: null });
  assert.ok(!seen.sent.some((m) => m.type === 'resume'), 'no resume without a position');

  const live = await publish(db, { topic: 'post:1' });
  await waitFor(() => seen.events.some((e) => e.id === live), { what: 'a live event' });
  assert.equal(c.lastSeq, seen.events.at(-1).seq);
});

test('resume: false never resumes; every reconnect is a refetch ("disabled")', async () => {
  const db = await database('disabled');
  const port = await freePort();
  await node(db, port);
  const c = client(port, { resume: false });
  const seen = observe(c, ['post:1']);
  await withTimeout(c.ready(), 10_000, 'first ready');
  await publish(db, { topic: 'post:1' });
  await waitFor(() => seen.events.length === 1, { what: 'a live event' });

  c.close();
  const refetch = nextEvent(c, 'refetch', { timeoutMs: 10_000 });
  c.connect();
  const r = await refetch;
  assert.equal(r.reason, 'disabled');
  assert.equal(seen.reconnected.at(-1).resumed, false);
  assert.ok(!seen.sent.some((m) => m.type === 'resume'));
});
