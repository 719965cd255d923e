// @nudge/client: browser and Node client for nudge, protocol v1.
// Zero dependencies, one self-contained ES module (nudge's demo page serves this very file). See ../README.md
// for the API and ../index.d.ts for the types.

/** Codes nudge sends in `{"type":"error"}` frames today. Any other code in such a frame is passed through. */
const SERVER_CODES = new Set(['bad_request', 'unauthorized', 'forbidden', 'token_expired', 'too_large', 'rate_limited', 'revoked']);
/** Error codes after which nudge closes the connection: their 'error' event waits for the close, to carry its code. */
const CLOSING_CODES = new Set(['unauthorized', 'token_expired', 'too_large', 'revoked']);

/** An error from the server (`code` is the server's error code) or from the client itself. */
export class NudgeError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{ref?: number, topic?: string, closeCode?: number, cause?: unknown, fromServer?: boolean}} [details]
   */
  constructor(code, message, details = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'NudgeError';
    this.code = code;
    /** True when nudge sent this code in an error frame (whatever the code, known or not); false for the client's own. */
    this.fromServer = details.fromServer ?? SERVER_CODES.has(code);
    if (details.ref !== undefined) this.ref = details.ref;
    if (details.topic !== undefined) this.topic = details.topic;
    if (details.closeCode !== undefined) this.closeCode = details.closeCode;
  }
}

const DEFAULTS = {
  refreshBeforeSeconds: 60,
  pingIntervalMs: 25_000,
  pongTimeoutMs: 10_000,
  connectTimeoutMs: 15_000,
  requestTimeoutMs: 15_000,
  backoff: { initialMs: 500, maxMs: 30_000, stableMs: 10_000, goingAwayMs: 5_000 },
  connectivity: { online: true, visibility: true, hiddenMs: 60_000, checkTimeoutMs: 5_000 },
  autoConnect: true,
  resume: true,
  cacheToken: true,
};

/** Close code the client uses when it gives up on a connection itself (pong/connect/check timeout). */
const CLOSE_CLIENT_TIMEOUT = 4000;
/** A cached token is reused only while it has at least this long left (and `refreshBeforeSeconds`). */
const MIN_TOKEN_MARGIN_MS = 5_000;
/** How long an error frame that announces a close waits for that close before it is emitted anyway. */
const CLOSE_ERROR_WAIT_MS = 1_000;
/** setTimeout's maximum delay. */
const MAX_TIMER = 2 ** 31 - 1;
const OPEN = 1;

function later(fn, ms) {
  return setTimeout(fn, Math.min(Math.max(0, ms), MAX_TIMER));
}

/**
 * The `exp` claim of a JWT (seconds since 1970), read from its payload WITHOUT verifying anything: only to know
 * how long a token may be reused. Null when the token is not a JWT or has no numeric `exp`.
 */
function tokenExpiry(token) {
  if (typeof token !== 'string') return null;
  const part = token.split('.')[1];
  if (!part || typeof atob !== 'function') return null;
  try {
    const base64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const payload = JSON.parse(atob(base64 + '='.repeat((4 - (base64.length % 4)) % 4)));
    return typeof payload?.exp === 'number' && Number.isFinite(payload.exp) ? payload.exp : null;
  } catch {
    return null;
  }
}

/** The browser's window/document/navigator, when there are any (never in Node, SSR or workers without them). */
function environment() {
  const g = globalThis;
  const win = typeof g.window === 'object' && g.window !== null && typeof g.window.addEventListener === 'function' ? g.window : null;
  const doc =
    typeof g.document === 'object' && g.document !== null && typeof g.document.addEventListener === 'function' ? g.document : null;
  const nav = typeof g.navigator === 'object' && g.navigator !== null ? g.navigator : null;
  return { window: win, document: doc, navigator: nav };
}

export class NudgeClient {
  /**
   * @param {string | URL} url  the `/ws` endpoint, e.g. `wss://example.com/ws`
   * @param {import('../index.js').NudgeClientOptions} options
   */
  constructor(url, options = {}) {
    if (typeof url !== 'string' && !(url instanceof URL)) throw new TypeError('NudgeClient: url must be a string or URL');
    const { token } = options;
    if (typeof token !== 'string' && typeof token !== 'function') {
      throw new TypeError('NudgeClient: options.token must be a string or a function returning a token');
    }
    const since = options.since ?? null;
    if (since !== null && !(Number.isSafeInteger(since) && since >= 0)) {
      throw new TypeError('NudgeClient: options.since must be a non-negative integer (a seq), null or undefined');
    }
    if (options.shouldReconnect !== undefined && typeof options.shouldReconnect !== 'function') {
      throw new TypeError('NudgeClient: options.shouldReconnect must be a function');
    }
    this._url = String(url);
    this._WebSocketOption = options.WebSocket;
    this._token = token;
    const connectivity =
      options.connectivity === false
        ? { ...DEFAULTS.connectivity, online: false, visibility: false }
        : { ...DEFAULTS.connectivity, ...(typeof options.connectivity === 'object' ? options.connectivity : {}) };
    this._opts = {
      refreshBeforeSeconds: options.refreshBeforeSeconds ?? DEFAULTS.refreshBeforeSeconds,
      pingIntervalMs: options.pingIntervalMs ?? DEFAULTS.pingIntervalMs,
      pongTimeoutMs: options.pongTimeoutMs ?? DEFAULTS.pongTimeoutMs,
      connectTimeoutMs: options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs,
      requestTimeoutMs: options.requestTimeoutMs ?? DEFAULTS.requestTimeoutMs,
      backoff: { ...DEFAULTS.backoff, ...(options.backoff ?? {}) },
      connectivity,
      resume: options.resume ?? DEFAULTS.resume,
      cacheToken: options.cacheToken ?? DEFAULTS.cacheToken,
      shouldReconnect: options.shouldReconnect ?? null,
    };

    /** @type {'idle'|'connecting'|'ready'|'waiting'|'offline'|'closed'} */
    this._state = 'idle';
    this._listeners = new Map(); // event name -> Set<handler>
    this._personal = new Set();
    /** topic -> {handlers: Set, active: boolean, waiters: Array<{resolve, reject}>, ref: number|null} */
    this._topics = new Map();
    /** ref -> {type, resolve, reject, topic?, timer?} for requests in flight on the current socket */
    this._pending = new Map();
    /** topics with an unsubscribe in flight: events for them are dropped until the server confirms */
    this._leaving = new Set();
    this._nextRef = 1;
    this._ws = null;
    this._generation = 0; // increments per connection attempt; stale callbacks compare against it
    this._authed = false;
    this._everReady = false;
    this._failures = 0; // consecutive failed attempts, drives the backoff
    this._readyAt = null; // when the current connection became ready (Date.now()), null when it is not
    this._authRef = null;
    this._authError = null;
    this._closeHint = null; // the error frame received last on this socket, if nothing came after it
    this._deferredError = null; // an error frame announcing a close: emitted when the close arrives
    this._wakeupWanted = false;
    this._readyWaiters = [];
    this._user = null;
    this._expiresAt = null;
    this._timers = { connect: null, ping: null, pong: null, refresh: null, reconnect: null, closeError: null };
    /** Highest `seq` delivered to the application (or covered by a `resumed` reply): where a resume starts. */
    this._lastSeq = since;
    /** `since` was given: the first connection resumes from it too. */
    this._seeded = since !== null;
    /** Events held back during a resume until the `resumed` reply: replay and live stream are merged by seq. */
    this._buffer = null;
    /** {token, exp} of the last token a provider function returned, when it is a JWT with an `exp`. */
    this._tokenCache = null;
    this._socketToken = null; // the token the current socket authenticated with
    this._socketTokenCached = false; // ... and whether it came from the cache
    this._revokedToken = null; // after a 4003: the revoked token, which the provider must not return again
    this._revokedRetry = false; // a 4003 was already answered with a new token and no connection has been stable since
    this._loggedCodes = new Set(); // error codes written to the console (no 'error' listener): each once
    this._env = null; // {window, document, navigator, handlers} while listening for connectivity
    this._hiddenAt = null;

    if (options.autoConnect ?? DEFAULTS.autoConnect) this.connect();
  }

  // ---- public API -------------------------------------------------------------------------------------------

  /** `'idle' | 'connecting' | 'ready' | 'waiting' | 'offline' | 'closed'` */
  get state() {
    return this._state;
  }

  /** The authenticated user (the token's `sub`), or null before the first `ready`. */
  get user() {
    return this._user;
  }

  /** The current token's expiry in Unix seconds as the server reported it, or null. */
  get expiresAt() {
    return this._expiresAt;
  }

  /**
   * The highest event `seq` delivered to the application (or confirmed by a resume), or null before the first
   * event: the position the next reconnect resumes from. Store it (e.g. in sessionStorage) and pass it back as
   * option `since` to resume after a page reload.
   */
  get lastSeq() {
    return this._lastSeq;
  }

  /** Topics this client wants (subscribed or being subscribed). */
  get topics() {
    return [...this._topics.keys()];
  }

  /**
   * Start connecting (only needed with `autoConnect: false`, or after `close()` to start over). While waiting to
   * retry (state `waiting` or `offline`), try again now.
   */
  connect() {
    if (this._state === 'connecting' || this._state === 'ready') return;
    if (this._state === 'waiting' || this._state === 'offline') {
      this._clearTimer('reconnect');
      this._open();
      return;
    }
    if (typeof (this._WebSocketOption ?? globalThis.WebSocket) !== 'function') {
      throw new TypeError(
        'NudgeClient: no WebSocket available; pass options.WebSocket (Node < 22: run with --experimental-websocket or pass the `ws` package)',
      );
    }
    this._failures = 0;
    this._revokedRetry = false;
    this._listenToEnvironment();
    this._open();
  }

  /**
   * Resolves with `{user, expiresAt}` once the client is authenticated and its subscriptions are restored
   * (immediately when it already is). Rejects with a NudgeError when the client is closed or gives up, or with
   * code `timeout` after `timeout` ms (the client keeps trying).
   * @param {{timeout?: number}} [options]
   */
  ready({ timeout } = {}) {
    if (this._state === 'ready') return Promise.resolve({ user: this._user, expiresAt: this._expiresAt });
    if (this._state === 'closed') {
      return Promise.reject(this._stopError ?? new NudgeError('closed', 'the client is closed', { fromServer: false }));
    }
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: null };
      if (timeout !== undefined && timeout !== null) {
        if (!(typeof timeout === 'number' && timeout >= 0)) throw new TypeError('ready: timeout must be a number of ms');
        waiter.timer = later(() => {
          this._readyWaiters = this._readyWaiters.filter((w) => w !== waiter);
          reject(new NudgeError('timeout', `not ready within ${timeout} ms (state: ${this._state})`, { fromServer: false }));
        }, timeout);
      }
      this._readyWaiters.push(waiter);
    });
  }

  /**
   * Call `handler(event)` for every event on `topic`. Returns a Subscription: a function that removes this
   * handler (and unsubscribes from the server when it was the topic's last), with `.ready`, a promise that
   * resolves when the server confirms and rejects with a NudgeError (`forbidden`, `bad_request`, ...) when it
   * refuses. If `.ready` is never read, a refusal is emitted as an 'error' event instead, so it is never silent.
   */
  subscribe(topic, handler) {
    if (typeof topic !== 'string') throw new TypeError('subscribe: topic must be a string');
    if (typeof handler !== 'function') throw new TypeError('subscribe: handler must be a function');
    let entry = this._topics.get(topic);
    const isNew = !entry;
    if (isNew) {
      entry = { handlers: new Set(), active: false, confirmed: false, waiters: [] };
      this._topics.set(topic, entry);
      this._leaving.delete(topic);
    }
    // A Set would merge the same function subscribed twice; wrap so each call is its own registration.
    const registration = (event) => handler(event);
    entry.handlers.add(registration);

    let observed = false;
    let settled = null; // {ok: true} | {ok: false, error}
    let readyPromise = null;
    let settle = null;
    const waiter = {
      resolve: () => {
        settled = { ok: true };
        settle?.resolve();
      },
      reject: (error) => {
        settled = { ok: false, error };
        if (observed) settle.reject(error);
        else this._emit('error', error);
      },
      // The app dropped the topic itself before the server confirmed: only tell whoever awaits `.ready`.
      cancel: (error) => {
        settled = { ok: false, error };
        if (observed) settle.reject(error);
      },
    };
    if (entry.active) waiter.resolve();
    else entry.waiters.push(waiter);

    let removed = false;
    const unsubscribe = () => {
      if (removed) return Promise.resolve();
      removed = true;
      const current = this._topics.get(topic);
      if (current !== entry) return Promise.resolve();
      entry.handlers.delete(registration);
      entry.waiters = entry.waiters.filter((w) => w !== waiter);
      if (entry.handlers.size > 0) return Promise.resolve();
      return this._dropTopic(topic, entry);
    };
    Object.defineProperty(unsubscribe, 'ready', {
      get() {
        if (!readyPromise) {
          observed = true;
          readyPromise = new Promise((resolve, reject) => {
            settle = { resolve, reject };
            if (settled?.ok) resolve();
            else if (settled) reject(settled.error);
          });
        }
        return readyPromise;
      },
    });
    unsubscribe.unsubscribe = unsubscribe;
    unsubscribe.topic = topic;

    if (isNew && this._authed) this._sendSubscribe(topic, entry);
    return unsubscribe;
  }

  /**
   * Remove every handler of `topic` and unsubscribe from the server. Resolves when the server confirms (or at
   * once when not connected: a new connection simply does not subscribe again). Never rejects: a failure (e.g.
   * `rate_limited`) is emitted as an 'error' event.
   */
  unsubscribe(topic) {
    const entry = this._topics.get(topic);
    if (!entry) return Promise.resolve();
    entry.handlers.clear();
    return this._dropTopic(topic, entry);
  }

  /** Call `handler(event)` for events whose topic this client is not subscribed to: those addressed to the user. */
  onPersonal(handler) {
    if (typeof handler !== 'function') throw new TypeError('onPersonal: handler must be a function');
    const registration = (event) => handler(event);
    this._personal.add(registration);
    return () => {
      this._personal.delete(registration);
    };
  }

  /** Listen to a client event ('state', 'ready', 'reconnected', 'disconnected', 'error', ...). Returns an off function. */
  on(name, handler) {
    if (typeof handler !== 'function') throw new TypeError('on: handler must be a function');
    let set = this._listeners.get(name);
    if (!set) this._listeners.set(name, (set = new Set()));
    set.add(handler);
    return () => this.off(name, handler);
  }

  /** Like `on`, but the handler runs at most once. */
  once(name, handler) {
    const off = this.on(name, (value) => {
      off();
      handler(value);
    });
    return off;
  }

  off(name, handler) {
    this._listeners.get(name)?.delete(handler);
  }

  /**
   * Ask nudge to run a claim pass now (e.g. right after your own API call inserted an event). Sent at once when
   * connected, otherwise once after the next successful authentication.
   */
  wakeup() {
    if (this._state === 'closed') return;
    if (this._authed) this._send({ type: 'wakeup' });
    else this._wakeupWanted = true;
  }

  /**
   * Close the connection for good: no reconnect. Pending requests reject with code 'disconnected'. Handlers and
   * subscriptions are kept, so `connect()` can start over with them; the cached token is forgotten (the next
   * connect asks the provider, e.g. for another user).
   */
  close() {
    this._tokenCache = null;
    this._revokedToken = null;
    if (this._state === 'closed' || this._state === 'idle') {
      this._setState('closed');
      this._stopListeningToEnvironment();
      return;
    }
    const wasConnected = this._ws !== null;
    const wasReady = this._state === 'ready';
    this._stopError = new NudgeError('closed', 'the client was closed', { fromServer: false });
    this._teardown({ closeWith: 1000, code: 1000, reason: 'client closed' });
    this._readyAt = null;
    this._setState('closed');
    this._stopListeningToEnvironment();
    this._rejectReady(this._stopError);
    if (wasConnected) this._emit('disconnected', { code: 1000, reason: 'client closed', wasReady, willReconnect: false });
    this._emit('closed', { error: null });
  }

  // ---- connection lifecycle ---------------------------------------------------------------------------------

  _setState(state) {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    this._emit('state', { state, previous });
  }

  async _open() {
    const generation = ++this._generation;
    this._setState('connecting');
    if (generation !== this._generation) return; // a 'state' listener closed the client
    this._stopError = null;
    this._clearTimer('reconnect');
    this._timers.connect = later(() => {
      if (generation !== this._generation) return;
      this._lost(CLOSE_CLIENT_TIMEOUT, `not ready within ${this._opts.connectTimeoutMs} ms`, { abandon: true });
    }, this._opts.connectTimeoutMs);

    let token;
    let cached;
    try {
      ({ token, cached } = await this._getToken({ fresh: false }));
    } catch (cause) {
      if (generation !== this._generation) return;
      this._emit('error', this._providerError(cause));
      if (generation !== this._generation) return;
      this._lost(null, 'token provider failed');
      return;
    }
    if (generation !== this._generation) return;
    if (token == null) {
      this._stop(new NudgeError('unauthorized', 'the token provider returned no token; stopping', { fromServer: false }));
      return;
    }
    if (this._revokedToken !== null && token === this._revokedToken) {
      // Asked once more after a 4003, the provider handed back the very token that was revoked.
      this._stop(new NudgeError('revoked', 'the token was revoked and the token provider has no other', { fromServer: false, closeCode: 4003 }));
      return;
    }

    let ws;
    try {
      ws = new (this._WebSocketOption ?? globalThis.WebSocket)(this._url);
    } catch (cause) {
      this._emit('error', new NudgeError('connect_failed', `cannot open ${this._url}: ${cause?.message ?? cause}`, { cause, fromServer: false }));
      if (generation !== this._generation) return;
      this._lost(null, 'cannot open socket');
      return;
    }
    this._ws = ws;
    this._authed = false;
    this._authError = null;
    this._closeHint = null;
    this._socketToken = token;
    this._socketTokenCached = cached;
    const handlers = {
      open: () => {
        if (generation !== this._generation) return;
        this._authRef = this._ref();
        this._send({ type: 'auth', token, ref: this._authRef });
        this._startPing();
      },
      message: (e) => {
        if (generation !== this._generation) return;
        this._onFrame(e.data);
      },
      close: (e) => {
        if (generation !== this._generation) return;
        this._onSocketClose(e.code, e.reason);
      },
      error: () => {
        // Browsers and Node >= 22 follow with 'close', whose code tells more than the opaque error event. Node
        // 20's built-in WebSocket does not when the connection fails (refused port): it fires 'error' only and
        // stays CONNECTING for ever. So an error not followed by 'close' shortly counts as the close.
        later(() => {
          if (generation !== this._generation || this._ws !== ws || ws.readyState === OPEN) return;
          this._onSocketClose(1006, 'connection failed');
        }, 100);
      },
    };
    ws._nudgeHandlers = handlers;
    for (const [name, fn] of Object.entries(handlers)) ws.addEventListener(name, fn);
  }

  /**
   * A token for a new connection (`fresh: false`: the cached one while it has time left) or for a refresh
   * (`fresh: true`: always the provider's). Resolves with {token, cached}.
   */
  async _getToken({ fresh }) {
    if (typeof this._token !== 'function') return { token: this._token, cached: false };
    const entry = this._tokenCache;
    if (!fresh && entry && this._opts.cacheToken) {
      const margin = Math.max(this._opts.refreshBeforeSeconds * 1000, MIN_TOKEN_MARGIN_MS);
      if (entry.exp * 1000 - Date.now() > margin) return { token: entry.token, cached: true };
    }
    const token = await this._token();
    if (token != null && typeof token !== 'string') {
      throw new TypeError(`the token provider returned a ${typeof token}, not a string (forgot \`await r.text()\`?)`);
    }
    const exp = tokenExpiry(token);
    this._tokenCache = token != null && exp !== null ? { token, exp } : null;
    return { token, cached: false };
  }

  _providerError(cause) {
    return new NudgeError('token_provider', `the token provider failed: ${cause?.message ?? cause}`, { cause, fromServer: false });
  }

  /** The socket closed (the server closed it, or the network lost it): decide whether to reconnect, and how. */
  _onSocketClose(code, reason) {
    const generation = this._generation;
    this._noteConnectionEnd();
    // The error frame that came right before the close explains it (for 1009 the server could not even read our
    // frame to answer it, so a `too_large` error without ref is the explanation too).
    const explanation = this._authError ?? this._closeHint;
    if (explanation && explanation.closeCode === undefined) explanation.closeCode = code;
    this._flushDeferredError();
    if (generation !== this._generation || this._state === 'closed') return; // an 'error' listener closed the client

    let decision = this._closePolicy(code, reason, explanation);
    decision = this._askShouldReconnect(decision, code, reason, explanation);
    if (generation !== this._generation || this._state === 'closed') return;
    if (!decision.reconnect) {
      this._stop(decision.error, code, reason);
      return;
    }
    if (decision.dropToken) this._tokenCache = null;
    if (decision.revoked) {
      this._revokedRetry = true;
      this._revokedToken = this._socketToken;
    }
    this._lost(code, reason || decision.why || '', { delayMs: decision.delayMs });
  }

  /**
   * The close-code table (README, "Close codes"): {reconnect, delayMs?, dropToken?, revoked?, error?, why?}.
   * `delayMs` undefined means: exponential backoff with full jitter.
   */
  _closePolicy(code, reason, explanation) {
    const stop = (error) => ({ reconnect: false, error });
    const describe = `the server closed the connection with ${code}${reason ? ` (${reason})` : ''}`;
    const provider = typeof this._token === 'function';
    if (code === 4001) {
      if (explanation?.code === 'token_expired') {
        // Expected when a refresh did not make it in time: come back at once with a fresh token.
        return { reconnect: true, delayMs: 0, dropToken: true, why: 'token expired' };
      }
      if (this._authError && this._socketTokenCached && provider) {
        // A token from the cache was refused (clocks disagree, the server's key was rotated): ask the provider
        // for a fresh one, at once. A fresh token refused the same way stops the client below.
        return { reconnect: true, delayMs: 0, dropToken: true, why: 'cached token refused' };
      }
      return stop(explanation ?? new NudgeError('unauthorized', describe, { closeCode: code, fromServer: false }));
    }
    if (code === 4003) {
      const error = explanation ?? new NudgeError('revoked', describe, { closeCode: code, fromServer: false });
      if (!provider || this._revokedRetry) return stop(error);
      return { reconnect: true, delayMs: 0, dropToken: true, revoked: true, why: 'revoked' };
    }
    if (code === 1009) {
      return stop(explanation ?? new NudgeError('too_large', describe, { closeCode: code, fromServer: false }));
    }
    if (code > CLOSE_CLIENT_TIMEOUT && code <= 4999) {
      // A close code of nudge's own range that this client does not know: a newer server telling it to stop.
      return stop(explanation ?? new NudgeError('connection_closed', describe, { closeCode: code, fromServer: false }));
    }
    if (code === 1001 || code === 1012) {
      // The server is going away (a deploy, a restart): spread the reconnects of all its clients over a window
      // rather than have them all come back in the same instant.
      const window = Math.max(this._opts.backoff.goingAwayMs, this._backoffCap());
      return { reconnect: true, delayMs: Math.floor(Math.random() * window) };
    }
    // 1000, 1006, 1011, 1013, 4000, other 1xxx/2xxx/3xxx: the connection ended, the server may be back later.
    return { reconnect: true };
  }

  /** Let `options.shouldReconnect` override the table. */
  _askShouldReconnect(decision, code, reason, explanation) {
    const hook = this._opts.shouldReconnect;
    if (!hook) return decision;
    let verdict;
    try {
      verdict = hook({ code, reason: reason ?? '', error: explanation ?? null, willReconnect: decision.reconnect });
    } catch (cause) {
      this._emit('error', new NudgeError('handler', `shouldReconnect threw: ${cause?.message ?? cause}`, { cause, fromServer: false }));
      return decision;
    }
    if (verdict === true && !decision.reconnect) return { reconnect: true, dropToken: true };
    if (verdict === false && decision.reconnect) {
      return {
        reconnect: false,
        error:
          explanation ??
          new NudgeError('connection_closed', `the connection closed with ${code}; shouldReconnect said stop`, { closeCode: code, fromServer: false }),
      };
    }
    return decision;
  }

  /** A connection ended: one that stayed up `backoff.stableMs` resets the backoff (and the 4003 allowance). */
  _noteConnectionEnd() {
    if (this._readyAt !== null && Date.now() - this._readyAt >= this._opts.backoff.stableMs) {
      this._failures = 0;
      this._revokedRetry = false;
    }
    this._readyAt = null;
  }

  /**
   * The current connection is gone (or given up on, or never opened): clean up, emit 'disconnected', schedule a
   * reconnect (or wait for the network while the browser says it is offline).
   * @param {number|null} code  close code, or null when there was no socket
   * @param {{abandon?: boolean, delayMs?: number}} [how]  abandon: the client gives up on a socket that may still
   *   be open (and closes it with 4000); delayMs: instead of the backoff delay
   */
  _lost(code, reason, { abandon = false, delayMs } = {}) {
    if (abandon) {
      this._noteConnectionEnd();
      if (this._opts.shouldReconnect) {
        const decision = this._askShouldReconnect({ reconnect: true }, CLOSE_CLIENT_TIMEOUT, reason, null);
        if (this._state === 'closed') return;
        if (!decision.reconnect) {
          this._stop(decision.error, CLOSE_CLIENT_TIMEOUT, reason, { closeWith: CLOSE_CLIENT_TIMEOUT });
          return;
        }
      }
    }
    const hadSocket = this._ws !== null;
    const wasReady = this._state === 'ready';
    this._teardown({ closeWith: abandon ? CLOSE_CLIENT_TIMEOUT : null, code: code ?? 1006, reason });
    if (this._state === 'closed') return;
    const delay = delayMs ?? this._backoffDelay();
    this._failures += 1;
    const info = { code: code ?? 1006, reason, wasReady, willReconnect: true };
    if (this._isOffline()) {
      // No point trying (and failing, and growing the backoff) without a network: the 'online' event resumes.
      this._setState('offline');
      if (hadSocket && this._state === 'offline') this._emit('disconnected', { ...info, offline: true });
      return;
    }
    this._setState('waiting');
    if (this._state !== 'waiting') return;
    this._timers.reconnect = later(() => {
      this._timers.reconnect = null;
      if (this._state === 'waiting') this._open();
    }, delay);
    if (hadSocket) this._emit('disconnected', { ...info, retryInMs: delay });
  }

  /** Give up for good (refused or revoked token, 1009, unknown 4xxx, shouldReconnect): like close(), but says why. */
  _stop(error, code, reason, { closeWith = null } = {}) {
    const hadSocket = this._ws !== null;
    const wasReady = this._state === 'ready';
    this._teardown({ closeWith, code: code ?? 1000, reason: 'stopped' });
    if (this._state === 'closed') return; // an 'error' listener called close() meanwhile
    this._readyAt = null;
    this._tokenCache = null;
    this._setState('closed');
    this._stopListeningToEnvironment();
    this._stopError = error;
    this._rejectReady(error);
    if (hadSocket) {
      this._emit('disconnected', { code: code ?? error.closeCode ?? 1000, reason: reason || error.message, wasReady, willReconnect: false });
    }
    this._emit('closed', { error });
  }

  /** min(maxMs, initialMs * 2^failures): the upper end of the next backoff delay. */
  _backoffCap() {
    const { initialMs, maxMs } = this._opts.backoff;
    return Math.min(maxMs, initialMs * 2 ** Math.min(this._failures, 30));
  }

  /** Full jitter: a random delay between 0 and the cap. */
  _backoffDelay() {
    return Math.floor(Math.random() * this._backoffCap());
  }

  /**
   * Drop the current socket and everything tied to it.
   * @param {{closeWith: number|null, code: number, reason: string}} how  closeWith: close the socket ourselves
   *   with this code; code: the close code to report on requests that will now get no reply
   */
  _teardown({ closeWith, code, reason }) {
    this._flushDeferredError();
    this._generation += 1;
    for (const name of Object.keys(this._timers)) this._clearTimer(name);
    const ws = this._ws;
    this._ws = null;
    this._authed = false;
    this._authRef = null;
    this._closeHint = null;
    // Events held for a resume that never completed are not delivered: they are > lastSeq, so the next
    // connection's resume replays them, in order.
    this._buffer = null;
    if (ws) {
      const handlers = ws._nudgeHandlers;
      if (handlers) for (const [name, fn] of Object.entries(handlers)) ws.removeEventListener(name, fn);
      // Keep a no-op error listener: some implementations report an error on a socket closed while connecting.
      ws.addEventListener('error', () => {});
      try {
        if (ws.readyState <= OPEN) ws.close(closeWith ?? 1000, String(reason ?? '').slice(0, 100));
      } catch {
        // Already closing, or an implementation that rejects the code: nothing more to do.
      }
    }
    // Requests in flight on that socket will get no reply.
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const request of pending) {
      if (request.timer) clearTimeout(request.timer);
      if (request.type === 'subscribe') continue; // the topic stays wanted: subscribed again on the next connection
      if (request.type === 'unsubscribe') {
        // Not connected means not subscribed: the next connection will not subscribe this topic.
        this._leaving.delete(request.topic);
        request.resolve();
        continue;
      }
      request.reject?.(
        new NudgeError('disconnected', 'the connection closed before the reply arrived', { closeCode: code, fromServer: false }),
      );
    }
    for (const entry of this._topics.values()) {
      entry.active = false;
    }
    this._leaving.clear();
  }

  _clearTimer(name) {
    if (this._timers[name] !== null) {
      clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }

  _rejectReady(error) {
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const w of waiters) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(error);
    }
  }

  // ---- connectivity (browsers only: online/offline, page visibility) -----------------------------------------

  _listenToEnvironment() {
    if (this._env) return;
    const { online, visibility } = this._opts.connectivity;
    const env = environment();
    const handlers = [];
    if (online && env.window) {
      handlers.push([env.window, 'online', () => this._onOnline()]);
      handlers.push([env.window, 'offline', () => this._onOffline()]);
    }
    if (visibility && env.document) {
      handlers.push([env.document, 'visibilitychange', () => this._onVisibilityChange()]);
      this._hiddenAt = env.document.visibilityState === 'hidden' ? Date.now() : null;
    }
    for (const [target, name, fn] of handlers) target.addEventListener(name, fn);
    this._env = { ...env, handlers };
  }

  _stopListeningToEnvironment() {
    if (!this._env) return;
    for (const [target, name, fn] of this._env.handlers) target.removeEventListener(name, fn);
    this._env = null;
  }

  /** The browser says there is no network at all (`navigator.onLine === false`). Never true outside browsers. */
  _isOffline() {
    return this._opts.connectivity.online && this._env?.window != null && this._env.navigator?.onLine === false;
  }

  _onOnline() {
    if (this._state === 'waiting' || this._state === 'offline') {
      // Back online: try now rather than at the end of a backoff that grew while the network was away.
      this._clearTimer('reconnect');
      this._open();
    } else if (this._state === 'ready') {
      // The network changed under an open socket (Wi-Fi to cellular): it may be dead without knowing it.
      this._check('the network came back');
    }
  }

  _onOffline() {
    if (this._state === 'waiting') {
      this._clearTimer('reconnect');
      this._setState('offline');
    } else if (this._state === 'ready') {
      this._check('the browser went offline');
    }
  }

  _onVisibilityChange() {
    const doc = this._env?.document;
    if (!doc) return;
    if (doc.visibilityState === 'hidden') {
      this._hiddenAt ??= Date.now();
      return;
    }
    if (doc.visibilityState !== 'visible') return;
    const hiddenFor = this._hiddenAt === null ? 0 : Date.now() - this._hiddenAt;
    this._hiddenAt = null;
    if (hiddenFor < this._opts.connectivity.hiddenMs) return;
    // Hidden tabs get their timers throttled or frozen (and phones suspend them): after a long time hidden the
    // socket may be dead without anyone having noticed, and a backoff timer may not have fired.
    if (this._state === 'ready') this._check(`visible again after ${Math.round(hiddenFor / 1000)} s hidden`);
    else if (this._state === 'waiting') {
      this._clearTimer('reconnect');
      this._open();
    }
  }

  /** Ping now: unless some frame arrives within `checkTimeoutMs`, give the connection up and reconnect at once. */
  _check(why) {
    if (!this._authed) return;
    const timeoutMs = this._opts.connectivity.checkTimeoutMs;
    const generation = this._generation;
    this._clearTimer('pong');
    if (!this._send({ type: 'ping' })) return;
    this._timers.pong = later(() => {
      if (generation !== this._generation) return;
      this._timers.pong = null;
      this._lost(CLOSE_CLIENT_TIMEOUT, `no frame within ${timeoutMs} ms after a check (${why})`, { abandon: true, delayMs: 0 });
    }, timeoutMs);
  }

  // ---- keep-alive and token refresh ---------------------------------------------------------------------------

  _startPing() {
    const { pingIntervalMs, pongTimeoutMs } = this._opts;
    if (!(pingIntervalMs > 0)) return;
    const generation = this._generation;
    const tick = () => {
      if (generation !== this._generation) return;
      this._send({ type: 'ping' });
      if (this._timers.pong === null && pongTimeoutMs > 0) {
        this._timers.pong = later(() => {
          if (generation !== this._generation) return;
          this._timers.pong = null;
          this._lost(CLOSE_CLIENT_TIMEOUT, `no frame within ${pongTimeoutMs} ms after a ping`, { abandon: true });
        }, pongTimeoutMs);
      }
      this._timers.ping = later(tick, pingIntervalMs);
    };
    this._timers.ping = later(tick, pingIntervalMs);
  }

  _scheduleRefresh() {
    this._clearTimer('refresh');
    if (typeof this._token !== 'function' || this._expiresAt == null) return;
    const remaining = this._expiresAt * 1000 - Date.now();
    if (remaining <= 0) return; // the server will close with token_expired; we come back with a fresh token
    // Refresh `refreshBeforeSeconds` early, but never in a tight loop when tokens live shorter than that.
    const delay = Math.max(remaining - this._opts.refreshBeforeSeconds * 1000, Math.min(1000, remaining / 2));
    const generation = this._generation;
    this._timers.refresh = later(() => {
      this._timers.refresh = null;
      if (generation === this._generation) this._refresh(generation);
    }, delay);
  }

  async _refresh(generation) {
    let token;
    try {
      ({ token } = await this._getToken({ fresh: true }));
    } catch (cause) {
      if (generation !== this._generation) return;
      this._emit('error', this._providerError(cause));
      if (generation === this._generation) this._retryRefresh(generation);
      return;
    }
    if (generation !== this._generation) return;
    if (token == null) {
      this._stop(new NudgeError('unauthorized', 'the token provider returned no token; stopping', { fromServer: false }));
      return;
    }
    this._request({ type: 'refresh', token }).then(
      (reply) => {
        if (generation !== this._generation) return;
        this._socketToken = token;
        this._expiresAt = reply.expires_at;
        this._emit('refreshed', { expiresAt: reply.expires_at });
        this._scheduleRefresh();
      },
      (error) => {
        if (generation !== this._generation || error.code === 'disconnected') return;
        if (this._tokenCache?.token === token) this._tokenCache = null; // refused: never reuse it for a connect
        this._emit('error', error);
        if (generation === this._generation) this._retryRefresh(generation);
      },
    );
  }

  /** A refresh failed: try again while the current token lasts (at most every 5 s). */
  _retryRefresh(generation) {
    const remaining = this._expiresAt * 1000 - Date.now();
    if (remaining <= 1000) return;
    this._timers.refresh = later(() => {
      this._timers.refresh = null;
      if (generation === this._generation) this._refresh(generation);
    }, Math.min(5000, remaining / 2));
  }

  // ---- frames -----------------------------------------------------------------------------------------------

  _ref() {
    return this._nextRef++;
  }

  _send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return false;
    const text = JSON.stringify(message);
    ws.send(text);
    if (this._listeners.get('frame')?.size) {
      const shown = 'token' in message ? JSON.stringify({ ...message, token: '<redacted>' }) : text;
      this._emit('frame', { direction: 'out', data: shown });
    }
    return true;
  }

  /** Send a request with a fresh `ref`; resolves with the reply frame, rejects with a NudgeError. */
  _request(message, extra = {}) {
    return new Promise((resolve, reject) => {
      const ref = this._ref();
      const request = { type: message.type, resolve, reject, ...extra };
      if (!this._send({ ...message, ref })) {
        reject(new NudgeError('disconnected', 'not connected', { fromServer: false }));
        return;
      }
      const generation = this._generation;
      request.timer = later(() => {
        if (!this._pending.has(ref) || generation !== this._generation) return;
        this._pending.delete(ref);
        reject(new NudgeError('timeout', `no reply to ${message.type} within ${this._opts.requestTimeoutMs} ms`, { ref, fromServer: false }));
      }, this._opts.requestTimeoutMs);
      this._pending.set(ref, request);
    });
  }

  /** An error frame as a NudgeError: whatever its code, known to this client or not, it comes from the server. */
  _serverError(frame, details = {}) {
    const code = typeof frame.code === 'string' && frame.code !== '' ? frame.code : 'unknown';
    return new NudgeError(code, typeof frame.message === 'string' ? frame.message : code, { ...details, fromServer: true });
  }

  /** Emit an error that announces a close once the close arrives (to carry its code), or after a short wait. */
  _deferError(error) {
    this._flushDeferredError();
    this._deferredError = error;
    const generation = this._generation;
    this._timers.closeError = later(() => {
      this._timers.closeError = null;
      if (generation === this._generation) this._flushDeferredError();
    }, CLOSE_ERROR_WAIT_MS);
  }

  _flushDeferredError() {
    const error = this._deferredError;
    if (!error) return;
    this._deferredError = null;
    this._clearTimer('closeError');
    this._emit('error', error);
  }

  _onFrame(data) {
    if (typeof data !== 'string') return; // nudge only sends text frames
    this._emit('frame', { direction: 'in', data });
    // Any frame proves the connection alive.
    this._clearTimer('pong');
    this._closeHint = null;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this._emit('error', new NudgeError('bad_frame', 'the server sent a frame that is not JSON', { fromServer: false }));
      return;
    }
    if (frame === null || typeof frame !== 'object') return;
    const ref = frame.ref;

    if (ref !== undefined && ref === this._authRef) {
      this._authRef = null;
      if (frame.type === 'ready') this._onReady(frame);
      else if (frame.type === 'error') {
        if (frame.code === undefined) frame = { ...frame, code: 'unauthorized' };
        this._authError = this._serverError(frame, { ref });
        this._closeHint = this._authError;
        this._deferError(this._authError);
      }
      return;
    }

    if (ref !== undefined && this._pending.has(ref)) {
      const request = this._pending.get(ref);
      this._pending.delete(ref);
      if (request.timer) clearTimeout(request.timer);
      if (frame.type === 'error') {
        request.reject(this._serverError(frame, { ref, topic: request.topic }));
      } else {
        request.resolve(frame);
      }
      return;
    }

    switch (frame.type) {
      case 'event':
        this._onEvent(frame);
        return;
      case 'pong':
        return;
      case 'unsubscribed': {
        // Unsolicited: a refresh's new token no longer allows this topic.
        const entry = this._topics.get(frame.topic);
        if (entry) {
          this._topics.delete(frame.topic);
          this._emit('revoked', { topic: frame.topic, reason: 'the refreshed token does not allow this topic' });
        }
        return;
      }
      case 'error': {
        const error = this._serverError(frame, ref === undefined ? {} : { ref });
        this._closeHint = error;
        if (CLOSING_CODES.has(error.code)) this._deferError(error);
        else this._emit('error', error);
        return;
      }
      default:
        // A reply for a request we no longer wait for, or a newer protocol's frame: ignore.
        return;
    }
  }

  _onEvent(frame) {
    // `seq` is absent only from servers older than `resume`: then there is no position and reconnects refetch.
    const seq = Number.isSafeInteger(frame.seq) ? { seq: frame.seq } : {};
    const event = { type: 'event', id: frame.id, ...seq, topic: frame.topic, kind: frame.kind, at: frame.at, data: frame.data ?? {} };
    if (this._buffer) {
      this._buffer.push(event);
      return;
    }
    this._deliver(event);
  }

  /** Hand one event to the application, at most once per seq. */
  _deliver(event) {
    if (event.seq !== undefined) {
      // Defensive: the server promises no duplicates across a resume; never hand the app a seq twice anyway.
      if (this._lastSeq !== null && event.seq <= this._lastSeq) return;
      this._lastSeq = event.seq;
    }
    this._emit('event', event);
    const entry = this._topics.get(event.topic);
    if (entry) {
      for (const handler of [...entry.handlers]) this._call(handler, event);
      return;
    }
    if (this._leaving.has(event.topic)) return; // sent before our unsubscribe took effect
    for (const handler of [...this._personal]) this._call(handler, event);
  }

  async _onReady(frame) {
    const generation = this._generation;
    this._authed = true;
    this._user = frame.user;
    this._expiresAt = frame.expires_at;
    this._scheduleRefresh();
    const reconnect = this._everReady;
    // Resume on a reconnect, and on the first connection when the app seeded a position (`since`). Hold every
    // event of this connection back until the `resumed` reply, since live events may arrive (personal ones
    // right after auth) before the older, replayed ones.
    const resuming = this._opts.resume && (reconnect || this._seeded);
    const since = resuming ? this._lastSeq : null;
    if (since !== null) this._buffer = [];
    if (reconnect && !this._opts.resume) this._lastSeq = null; // no resume: this connection starts a new stream
    // Restore every wanted topic, then resume, then tell the app: from here on it misses nothing.
    const restores = [...this._topics].map(([topic, entry]) => this._sendSubscribe(topic, entry));
    if (this._wakeupWanted) {
      this._wakeupWanted = false;
      this._send({ type: 'wakeup' });
    }
    await Promise.all(restores);
    if (generation !== this._generation) return;

    // What the app must know about the time it was away (on a reconnect, or since the seeded position).
    const outcome = { resumed: false, complete: false, refetch: reconnect, replayed: 0 };
    let refetch = null;
    if (!resuming) {
      // The first connection without a position: the app fetches its initial state anyway.
      if (reconnect) refetch = { reason: 'disabled', since: null };
    } else if (since === null) {
      refetch = { reason: 'no_position', since: null };
    } else {
      const result = await this._resume(since, generation);
      if (result === null || generation !== this._generation) return; // connection lost or abandoned: next one resumes
      const { reply } = result;
      // `until` at or below `since` and incomplete: `since` is beyond anything this database handed out (it was
      // replaced or reset). Our position means nothing here: forget it, so the new database's events (lower
      // seqs) are not taken for duplicates, and the next reconnect does not resume from it again.
      const foreign = reply && reply.complete !== true && !(reply.until > since);
      if (foreign) this._lastSeq = null;
      if (!this._flushBuffer(generation)) return;
      if (result.error) {
        refetch = { reason: 'resume_failed', since, error: result.error };
        outcome.refetch = true;
      } else {
        outcome.resumed = true;
        outcome.replayed = Number.isSafeInteger(reply.replayed) ? reply.replayed : 0;
        outcome.complete = reply.complete === true;
        outcome.refetch = !outcome.complete;
        // The server sends nothing at or below `until` any more: that is our position now.
        if (!foreign && Number.isSafeInteger(reply.until) && (this._lastSeq === null || reply.until > this._lastSeq)) {
          this._lastSeq = reply.until;
        }
        if (!outcome.complete) refetch = { reason: 'incomplete', since, until: reply.until };
      }
    }

    this._clearTimer('connect');
    this._seeded = false;
    this._everReady = true;
    this._readyAt = Date.now();
    this._revokedToken = null;
    this._setState('ready');
    if (generation !== this._generation) return;
    const info = { user: this._user, expiresAt: this._expiresAt };
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const w of waiters) {
      if (w.timer) clearTimeout(w.timer);
      w.resolve(info);
    }
    this._emit('ready', { ...info, reconnect, resumed: outcome.resumed, complete: outcome.complete, replayed: outcome.replayed });
    if (generation !== this._generation) return;
    if (reconnect) this._emit('reconnected', { ...info, ...outcome });
    if (refetch && generation === this._generation) this._emit('refetch', refetch);
  }

  /**
   * Send `resume` on the current socket. Resolves with {reply} or {error} (the server refused it), or null when
   * the connection was lost or abandoned meanwhile (the next connection resumes from the same position).
   */
  async _resume(since, generation) {
    for (let attempt = 0; ; attempt++) {
      try {
        return { reply: await this._request({ type: 'resume', since }) };
      } catch (error) {
        if (generation !== this._generation || error.code === 'disconnected') return null;
        if (error.code === 'rate_limited' && attempt < 5) {
          // Restoring many topics can use up the server's per-connection message rate: pace and retry.
          await new Promise((resolve) => later(resolve, 250 + Math.random() * 1000));
          if (generation !== this._generation) return null;
          continue;
        }
        if (error.code === 'timeout') {
          // Unknown whether the server replayed: give this connection up rather than guess; retry from lastSeq.
          this._lost(CLOSE_CLIENT_TIMEOUT, `no reply to resume within ${this._opts.requestTimeoutMs} ms`, { abandon: true });
          return null;
        }
        return { error };
      }
    }
  }

  /** Deliver the events held during a resume, in seq order. False if a handler closed the connection meanwhile. */
  _flushBuffer(generation) {
    const held = this._buffer ?? [];
    this._buffer = null;
    held.sort((a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity)); // stable: no-seq events keep arrival order
    for (const event of held) {
      if (generation !== this._generation) return false;
      this._deliver(event);
    }
    return generation === this._generation;
  }

  /** Subscribe `topic` on the current socket; settles the topic's waiters. Never rejects. */
  async _sendSubscribe(topic, entry) {
    for (let attempt = 0; ; attempt++) {
      const generation = this._generation;
      try {
        await this._request({ type: 'subscribe', topic }, { topic });
      } catch (error) {
        if (generation !== this._generation || this._topics.get(topic) !== entry) return;
        if (error.code === 'disconnected') return; // retried on the next connection
        if ((error.code === 'rate_limited' || error.code === 'timeout') && attempt < 5) {
          // Many topics restored at once can exceed the server's per-connection message rate: pace and retry.
          await new Promise((resolve) => later(resolve, 250 + Math.random() * 1000));
          if (generation !== this._generation || this._topics.get(topic) !== entry) return;
          continue;
        }
        this._topics.delete(topic);
        const waiters = entry.waiters;
        entry.waiters = [];
        for (const w of waiters) w.reject(error);
        // Subscribed before, refused now (the new token no longer allows it, or the limit shrank).
        if (entry.confirmed) this._emit('revoked', { topic, reason: error.message, error });
        return;
      }
      if (this._topics.get(topic) !== entry) return;
      entry.active = true;
      entry.confirmed = true;
      const waiters = entry.waiters;
      entry.waiters = [];
      for (const w of waiters) w.resolve();
      return;
    }
  }

  _dropTopic(topic, entry) {
    this._topics.delete(topic);
    const refused = new NudgeError('unsubscribed', `unsubscribed from ${topic} before the server confirmed`, { topic, fromServer: false });
    for (const w of entry.waiters) w.cancel(refused);
    entry.waiters = [];
    if (!this._authed) return Promise.resolve();
    this._leaving.add(topic);
    return this._request({ type: 'unsubscribe', topic }, { topic }).then(
      () => {
        this._leaving.delete(topic);
      },
      (error) => {
        // Never rejects (callers often do not await an unsubscribe): a failure is reported as an 'error' event.
        this._leaving.delete(topic);
        if (error.code !== 'disconnected') this._emit('error', error);
      },
    );
  }

  // ---- events -----------------------------------------------------------------------------------------------

  _emit(name, value) {
    const set = this._listeners.get(name);
    if (!set || set.size === 0) {
      if (name === 'error') this._logUnhandled(value);
      return;
    }
    for (const handler of [...set]) this._call(handler, value, name === 'error');
  }

  /** An 'error' nobody listens to: write it to the console, once per code, so it is never silent. */
  _logUnhandled(error) {
    const code = error?.code ?? 'unknown';
    if (this._loggedCodes.has(code)) return;
    this._loggedCodes.add(code);
    if (typeof console === 'undefined' || typeof console.error !== 'function') return;
    console.error(
      `@nudge/client: unhandled '${code}' error (further '${code}' errors are not logged; listen with client.on('error', …)):`,
      error,
    );
  }

  /** Run an application callback; its exceptions become 'error' events, not broken client state. */
  _call(handler, value, isErrorHandler = false) {
    try {
      handler(value);
    } catch (cause) {
      if (isErrorHandler) {
        // An 'error' handler that throws: rethrow outside our call stack, like any uncaught exception.
        queueMicrotask(() => {
          throw cause;
        });
      } else {
        this._emit('error', new NudgeError('handler', `a handler threw: ${cause?.message ?? cause}`, { cause, fromServer: false }));
      }
    }
  }
}

export default NudgeClient;
