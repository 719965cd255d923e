// Resume edge cases a real server produces only by timing, played by a scripted in-process WebSocket: a live
// event written before the resume request is read (so it arrives before the older, replayed ones), a server
// that refuses `resume` (an older nudge), and a connection lost in the middle of a resume.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NudgeClient } from '../src/index.js';
import { waitFor } from './harness.js';

/** A fake server: every socket the client opens is pushed to `sockets`; `script(socket, msg)` answers requests. */
function fakeServer(script) {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.listeners = new Map();
      this.sent = [];
      sockets.push(this);
      setTimeout(() => {
        this.readyState = 1;
        this.fire('open', {});
      }, 1);
    }
    addEventListener(name, fn) {
      if (!this.listeners.has(name)) this.listeners.set(name, new Set());
      this.listeners.get(name).add(fn);
    }
    removeEventListener(name, fn) {
      this.listeners.get(name)?.delete(fn);
    }
    fire(name, event) {
      for (const fn of [...(this.listeners.get(name) ?? [])]) fn(event);
    }
    send(text) {
      const msg = JSON.parse(text);
      this.sent.push(msg);
      setTimeout(() => script(this, msg), 1);
    }
    reply(frame) {
      if (this.readyState === 1) this.fire('message', { data: JSON.stringify(frame) });
    }
    close(code = 1000, reason = '') {
      if (this.readyState > 1) return;
      this.readyState = 3;
      setTimeout(() => this.fire('close', { code, reason }), 1);
    }
    drop() {
      this.readyState = 3;
      this.fire('close', { code: 1006, reason: '' });
    }
  }
  return { sockets, WebSocket: FakeSocket };
}

const event = (seq, topic = 'post:1') => ({ type: 'event', id: 100 + seq, seq, topic, kind: 'k', at: '2026-01-01T00:00:00.000Z', data: {} });

/** Answers auth and subscribe; `onResume(socket, msg, connectionIndex)` handles resume. */
function standard(onResume) {
  let connections = 0;
  return (socket, msg) => {
    if (msg.type === 'auth') {
      socket.index = connections++;
      socket.reply({ type: 'ready', user: 'alice', expires_at: 4102444800, ref: msg.ref });
      if (socket.index === 0) socket.reply(event(1)); // seen on the first connection: the position
    } else if (msg.type === 'subscribe') {
      socket.reply({ type: 'subscribed', topic: msg.topic, ref: msg.ref });
    } else if (msg.type === 'resume') {
      onResume(socket, msg);
    }
  };
}

function start(server, options = {}) {
  const c = new NudgeClient('ws://fake/ws', {
    token: 'x',
    WebSocket: server.WebSocket,
    backoff: { initialMs: 1, maxMs: 5 },
    pingIntervalMs: 0,
    ...options,
  });
  const seen = { seqs: [], refetch: [], reconnected: [] };
  c.subscribe('post:1', (e) => seen.seqs.push(e.seq));
  c.onPersonal((e) => seen.seqs.push(e.seq));
  c.on('refetch', (r) => seen.refetch.push(r));
  c.on('reconnected', (r) => seen.reconnected.push(r));
  return { c, seen };
}

test('live events that overtake the replay are held back and delivered in seq order, once', async () => {
  const server = fakeServer(
    standard((socket, msg) => {
      assert.equal(msg.since, 1);
      // The server wrote live 5 (personal, right after auth) and 6 before it read the resume; it replays (1, 4].
      // 4 again, as a duplicate, must be dropped too.
      for (const seq of [2, 3, 4, 4]) socket.reply(event(seq));
      socket.reply({ type: 'resumed', since: 1, until: 4, replayed: 3, complete: true, ref: msg.ref });
      socket.reply(event(7));
    }),
  );
  // Live events arrive as soon as the socket is authenticated, before the resume reply.
  const original = server.WebSocket.prototype.reply;
  server.WebSocket.prototype.reply = function (frame) {
    original.call(this, frame);
    if (frame.type === 'ready' && this.index === 1) {
      original.call(this, event(5, 'note'));
      original.call(this, event(6));
    }
  };
  const { c, seen } = start(server);
  try {
    await c.ready();
    await waitFor(() => seen.seqs.length === 1, { what: 'the first event' });
    server.sockets[0].drop();
    await waitFor(() => seen.reconnected.length === 1, { what: 'reconnected' });
    await waitFor(() => seen.seqs.length === 7, { what: 'every event' });
    assert.deepEqual(seen.seqs, [1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(seen.refetch, []);
    assert.equal(seen.reconnected[0].replayed, 3);
    assert.equal(c.lastSeq, 7);
  } finally {
    c.close();
  }
});

test('a server that refuses resume: events still delivered in order, refetch "resume_failed"', async () => {
  const server = fakeServer(
    standard((socket, msg) => {
      socket.reply(event(9)); // live, received while the request was in flight
      socket.reply({ type: 'error', code: 'bad_request', message: 'unknown variant `resume`', ref: msg.ref });
    }),
  );
  const { c, seen } = start(server);
  try {
    await c.ready();
    await waitFor(() => seen.seqs.length === 1, { what: 'the first event' });
    server.sockets[0].drop();
    await waitFor(() => seen.refetch.length === 1, { what: 'refetch' });
    assert.equal(seen.refetch[0].reason, 'resume_failed');
    assert.equal(seen.refetch[0].error.code, 'bad_request');
    assert.deepEqual(seen.seqs, [1, 9]);
    assert.equal(seen.reconnected[0].resumed, false);
    assert.equal(seen.reconnected[0].refetch, true);
  } finally {
    c.close();
  }
});

test('a connection lost during the resume delivers nothing early; the next one resumes from the same seq', async () => {
  const sinces = [];
  const server = fakeServer(
    standard((socket, msg) => {
      sinces.push(msg.since);
      if (socket.index === 1) {
        socket.reply(event(2)); // replayed, then the connection dies before `resumed`
        socket.drop();
        return;
      }
      socket.reply(event(2));
      socket.reply({ type: 'resumed', since: msg.since, until: 2, replayed: 1, complete: true, ref: msg.ref });
    }),
  );
  const { c, seen } = start(server);
  try {
    await c.ready();
    await waitFor(() => seen.seqs.length === 1, { what: 'the first event' });
    server.sockets[0].drop();
    await waitFor(() => seen.reconnected.length === 1, { what: 'reconnected' });
    assert.deepEqual(sinces, [1, 1]);
    assert.deepEqual(seen.seqs, [1, 2]);
    assert.deepEqual(seen.refetch, []);
  } finally {
    c.close();
  }
});

test('a position from another database (the server answers until <= since, incomplete) is forgotten', async () => {
  const sinces = [];
  const server = fakeServer(
    standard((socket, msg) => {
      sinces.push(msg.since);
      if (socket.index === 1) {
        // The database was replaced: its seqs start again at 1, below our position 1000.
        socket.reply(event(1));
        socket.reply({ type: 'resumed', since: msg.since, until: msg.since, replayed: 0, complete: false, ref: msg.ref });
        socket.reply(event(2));
        return;
      }
      socket.reply({ type: 'resumed', since: msg.since, until: msg.since, replayed: 0, complete: true, ref: msg.ref });
    }),
  );
  // The first connection's event is seq 1 in `standard`; pretend it was 1000 on the old database.
  const original = server.WebSocket.prototype.reply;
  server.WebSocket.prototype.reply = function (frame) {
    original.call(this, frame.type === 'event' && this.index === 0 ? { ...frame, seq: 1000 } : frame);
  };
  const { c, seen } = start(server);
  try {
    await c.ready();
    await waitFor(() => seen.seqs.length === 1, { what: 'the first event' });
    server.sockets[0].drop();
    await waitFor(() => seen.refetch.length === 1 && seen.seqs.length === 3, { what: 'refetch and the new events' });
    assert.equal(seen.refetch[0].reason, 'incomplete');
    assert.deepEqual(seen.seqs, [1000, 1, 2], "the new database's events are not mistaken for duplicates");
    assert.equal(c.lastSeq, 2);
    server.sockets[1].drop();
    await waitFor(() => seen.reconnected.length === 2, { what: 'the second reconnect' });
    assert.deepEqual(sinces, [1000, 2]);
  } finally {
    c.close();
  }
});
