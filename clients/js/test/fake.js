// No nudge needed: a scripted in-process WebSocket "server", a fake browser (window, document, navigator), fake
// timers, and unsigned JWTs. Sockets open and answer through microtasks, never timers, so that node:test's mock
// timers move only the client's own clocks.
import { mock } from 'node:test';
import { NudgeClient } from '../src/index.js';

const b64url = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');

/** A JWT-shaped token (not signed: the fake server does not check) expiring `ttlSeconds` from now. */
export function jwt({ sub = 'alice', ttlSeconds = 3600, exp = Math.floor(Date.now() / 1000) + ttlSeconds, ...claims } = {}) {
  return `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url({ sub, exp, ...claims })}.c2lnbmF0dXJl`;
}

function payload(token) {
  try {
    return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());
  } catch {
    return {};
  }
}

/**
 * A fake nudge. Every socket the client opens is in `sockets`. By default it answers auth (ready, with the
 * token's exp), subscribe, unsubscribe, ping, refresh and resume (complete, nothing missed) like nudge would;
 * `options.refuse(token)` returning a message makes it refuse that token (error, then close 4001), and
 * `options.script(socket, msg)` returning true takes over a message.
 */
export function fakeServer(options = {}) {
  const sockets = [];
  const later = (fn) => Promise.resolve().then(fn);
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.listeners = new Map();
      this.sent = [];
      this.mute = false; // true: receives, answers nothing (a dead connection)
      this.index = sockets.length;
      sockets.push(this);
      later(() => {
        if (this.readyState !== 0) return;
        if (options.refuseConnections) {
          this.readyState = 3;
          this.fire('close', { code: 1006, reason: '' });
          return;
        }
        this.readyState = 1;
        this.fire('open', {});
      });
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
      later(() => {
        if (this.readyState !== 1 || this.mute) return;
        if (options.script?.(this, msg)) return;
        this.answer(msg);
      });
    }
    answer(msg) {
      switch (msg.type) {
        case 'auth': {
          const refused = options.refuse?.(msg.token, this);
          if (refused) {
            this.reply({ type: 'error', code: 'unauthorized', message: refused, ref: msg.ref });
            this.serverClose(4001, 'unauthorized');
            return;
          }
          this.token = msg.token;
          const claims = payload(msg.token);
          this.reply({ type: 'ready', user: claims.sub ?? 'alice', expires_at: claims.exp ?? Math.floor(Date.now() / 1000) + 3600, ref: msg.ref });
          return;
        }
        case 'subscribe':
          this.reply({ type: 'subscribed', topic: msg.topic, ref: msg.ref });
          return;
        case 'unsubscribe':
          this.reply({ type: 'unsubscribed', topic: msg.topic, ref: msg.ref });
          return;
        case 'ping':
          this.reply({ type: 'pong', ...(msg.ref === undefined ? {} : { ref: msg.ref }) });
          return;
        case 'refresh':
          this.token = msg.token;
          this.reply({ type: 'refreshed', expires_at: payload(msg.token).exp, ref: msg.ref });
          return;
        case 'resume':
          this.reply({ type: 'resumed', since: msg.since, until: msg.since, replayed: 0, complete: true, ref: msg.ref });
          return;
        default:
      }
    }
    reply(frame) {
      if (this.readyState === 1) this.fire('message', { data: JSON.stringify(frame) });
    }
    /** The server closes: optionally an error frame first, like nudge does. */
    serverClose(code, reason = '', error) {
      if (this.readyState > 1) return;
      if (error) this.reply({ type: 'error', ...error });
      this.readyState = 3;
      this.fire('close', { code, reason });
    }
    /** The client closes. */
    close(code = 1000, reason = '') {
      if (this.readyState > 1) return;
      this.readyState = 3;
      this.closedWith = { code, reason };
      later(() => this.fire('close', { code, reason }));
    }
  }
  FakeSocket.CONNECTING = 0;
  FakeSocket.OPEN = 1;
  FakeSocket.CLOSING = 2;
  FakeSocket.CLOSED = 3;
  return {
    sockets,
    WebSocket: FakeSocket,
    get last() {
      return sockets.at(-1);
    },
    /** Messages of `type` the client sent, over every socket. */
    sent(type) {
      return sockets.flatMap((s) => s.sent.filter((m) => m.type === type));
    },
  };
}

/** Let every pending microtask and I/O callback run (several rounds: promise chains are long). */
export async function flush(rounds = 8) {
  for (let i = 0; i < rounds; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** Fake timers (setTimeout and Date) from now on; `advance(ms)` moves them in small steps, flushing as it goes. */
export function fakeTimers() {
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: Date.now() });
  return {
    async advance(ms, step = 50) {
      await flush();
      for (let done = 0; done < ms; done += step) {
        mock.timers.tick(Math.min(step, ms - done));
        await flush();
      }
    },
    reset() {
      mock.timers.reset();
    },
  };
}

/**
 * A fake browser on globalThis: `window` (online/offline), `document` (visibilitychange), `navigator.onLine`.
 * `restore()` puts the real globals back.
 */
export function fakeBrowser() {
  const saved = {};
  for (const name of ['window', 'document', 'navigator']) saved[name] = Object.getOwnPropertyDescriptor(globalThis, name);
  const window = new EventTarget();
  const document = new EventTarget();
  document.visibilityState = 'visible';
  const navigator = { onLine: true };
  const define = (name, value) => Object.defineProperty(globalThis, name, { value, configurable: true, writable: true });
  define('window', window);
  define('document', document);
  define('navigator', navigator);
  return {
    window,
    document,
    navigator,
    goOffline() {
      navigator.onLine = false;
      window.dispatchEvent(new Event('offline'));
    },
    goOnline() {
      navigator.onLine = true;
      window.dispatchEvent(new Event('online'));
    },
    setVisibility(state) {
      document.visibilityState = state;
      document.dispatchEvent(new Event('visibilitychange'));
    },
    restore() {
      for (const [name, descriptor] of Object.entries(saved)) {
        if (descriptor) Object.defineProperty(globalThis, name, descriptor);
        else delete globalThis[name];
      }
    },
  };
}

/** A client on `server` with fast, deterministic defaults (no keep-alive pings unless asked). */
export function fakeClient(server, options = {}) {
  return new NudgeClient('ws://fake/ws', {
    token: () => jwt(),
    WebSocket: server.WebSocket,
    backoff: { initialMs: 1000, maxMs: 30_000 },
    pingIntervalMs: 0,
    ...options,
  });
}

/** Records every client event of `names` in order. */
export function record(client, names = ['state', 'ready', 'reconnected', 'refetch', 'disconnected', 'closed', 'error']) {
  const log = [];
  for (const name of names) client.on(name, (value) => log.push({ name, value }));
  log.of = (name) => log.filter((e) => e.name === name).map((e) => e.value);
  return log;
}
