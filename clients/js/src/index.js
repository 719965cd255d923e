// @nudge/client: browser and Node client for nudge, protocol v1.
// Zero dependencies. See ../README.md for the API and ../index.d.ts for the types.

/** Codes the server sends in `{"type":"error"}` frames. */
const SERVER_CODES = new Set(['bad_request', 'unauthorized', 'forbidden', 'token_expired', 'too_large', 'rate_limited']);

/** An error from the server (`code` is the server's error code) or from the client itself. */
export class NudgeError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{ref?: number, topic?: string, closeCode?: number, cause?: unknown}} [details]
   */
  constructor(code, message, details = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'NudgeError';
    this.code = code;
    if (details.ref !== undefined) this.ref = details.ref;
    if (details.topic !== undefined) this.topic = details.topic;
    if (details.closeCode !== undefined) this.closeCode = details.closeCode;
  }

  /** True for the codes nudge itself sends; false for client-side codes (closed, disconnected, timeout, ...). */
  get fromServer() {
    return SERVER_CODES.has(this.code);
  }
}

const DEFAULTS = {
  refreshBeforeSeconds: 60,
  pingIntervalMs: 25_000,
  pongTimeoutMs: 10_000,
  connectTimeoutMs: 15_000,
  requestTimeoutMs: 15_000,
  backoff: { initialMs: 500, maxMs: 30_000 },
  autoConnect: true,
  resume: true,
};

/** Close code the client uses when it gives up on a connection itself (pong/connect timeout). */
const CLOSE_CLIENT_TIMEOUT = 4000;
/** setTimeout's maximum delay. */
const MAX_TIMER = 2 ** 31 - 1;
const OPEN = 1;

function later(fn, ms) {
  return setTimeout(fn, Math.min(Math.max(0, ms), MAX_TIMER));
}

export class NudgeClient {
  /**
   * @param {string} url  the `/ws` endpoint, e.g. `wss://example.com/ws`
   * @param {import('../index.js').NudgeClientOptions} options
   */
  constructor(url, options = {}) {
    if (typeof url !== 'string' && !(url instanceof URL)) throw new TypeError('NudgeClient: url must be a string or URL');
    const { token } = options;
    if (typeof token !== 'string' && typeof token !== 'function') {
      throw new TypeError('NudgeClient: options.token must be a string or a function returning a token');
    }
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw new TypeError(
        'NudgeClient: no WebSocket available; pass options.WebSocket (Node < 22: run with --experimental-websocket or pass the `ws` package)',
      );
    }
    this._url = String(url);
    this._WebSocket = WS;
    this._token = token;
    this._opts = {
      refreshBeforeSeconds: options.refreshBeforeSeconds ?? DEFAULTS.refreshBeforeSeconds,
      pingIntervalMs: options.pingIntervalMs ?? DEFAULTS.pingIntervalMs,
      pongTimeoutMs: options.pongTimeoutMs ?? DEFAULTS.pongTimeoutMs,
      connectTimeoutMs: options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs,
      requestTimeoutMs: options.requestTimeoutMs ?? DEFAULTS.requestTimeoutMs,
      backoff: { ...DEFAULTS.backoff, ...(options.backoff ?? {}) },
      resume: options.resume ?? DEFAULTS.resume,
    };

    /** @type {'idle'|'connecting'|'ready'|'waiting'|'closed'} */
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
    this._authRef = null;
    this._authError = null;
    this._lastError = null; // the last server error frame without ref on this socket (e.g. token_expired)
    this._wakeupWanted = false;
    this._readyWaiters = [];
    this._user = null;
    this._expiresAt = null;
    this._timers = { connect: null, ping: null, pong: null, refresh: null, reconnect: null };
    /** Highest `seq` delivered to the application (or covered by a `resumed` reply): where a resume starts. */
    this._lastSeq = null;
    /** Events held back on a reconnect until the `resumed` reply: replay and live stream are merged by seq. */
    this._buffer = null;

    if (options.autoConnect ?? DEFAULTS.autoConnect) this.connect();
  }

  // ---- public API -------------------------------------------------------------------------------------------

  /** `'idle' | 'connecting' | 'ready' | 'waiting' | 'closed'` */
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
   * event: the position the next reconnect resumes from.
   */
  get lastSeq() {
    return this._lastSeq;
  }

  /** Topics this client wants (subscribed or being subscribed). */
  get topics() {
    return [...this._topics.keys()];
  }

  /** Start connecting (only needed with `autoConnect: false`, or after `close()` to start over). */
  connect() {
    if (this._state === 'connecting' || this._state === 'ready' || this._state === 'waiting') return;
    this._failures = 0;
    this._open();
  }

  /**
   * Resolves with `{user, expiresAt}` once the client is authenticated and its subscriptions are restored
   * (immediately when it already is). Rejects with a NudgeError when the client is closed or gives up.
   */
  ready() {
    if (this._state === 'ready') return Promise.resolve({ user: this._user, expiresAt: this._expiresAt });
    if (this._state === 'closed') {
      return Promise.reject(this._stopError ?? new NudgeError('closed', 'the client is closed'));
    }
    return new Promise((resolve, reject) => this._readyWaiters.push({ resolve, reject }));
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

  /** Listen to a client event ('ready', 'reconnected', 'disconnected', 'error', 'frame', ...). Returns an off function. */
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
   * Close the connection for good: no reconnect. Pending requests reject with code 'closed'. Handlers and
   * subscriptions are kept, so `connect()` can start over with them.
   */
  close() {
    if (this._state === 'closed' || this._state === 'idle') {
      this._state = 'closed';
      return;
    }
    const wasConnected = this._ws !== null;
    const wasReady = this._state === 'ready';
    this._stopError = new NudgeError('closed', 'the client was closed');
    this._teardown(1000, 'client closed');
    this._state = 'closed';
    this._rejectReady(this._stopError);
    if (wasConnected) this._emit('disconnected', { code: 1000, reason: 'client closed', wasReady, willReconnect: false });
    this._emit('closed', { error: null });
  }

  // ---- connection lifecycle ---------------------------------------------------------------------------------

  async _open() {
    const generation = ++this._generation;
    this._state = 'connecting';
    this._stopError = null;
    this._clearTimer('reconnect');
    this._timers.connect = later(() => {
      if (generation !== this._generation) return;
      this._lost(CLOSE_CLIENT_TIMEOUT, `not ready within ${this._opts.connectTimeoutMs} ms`, true);
    }, this._opts.connectTimeoutMs);

    let token;
    try {
      token = await this._fetchToken();
    } catch (cause) {
      if (generation !== this._generation) return;
      this._emit('error', new NudgeError('token_provider', `the token provider failed: ${cause?.message ?? cause}`, { cause }));
      this._lost(null, 'token provider failed', false);
      return;
    }
    if (generation !== this._generation) return;
    if (token == null) {
      this._stop(new NudgeError('unauthorized', 'the token provider returned no token; stopping'));
      return;
    }

    let ws;
    try {
      ws = new this._WebSocket(this._url);
    } catch (cause) {
      this._emit('error', new NudgeError('connect_failed', `cannot open ${this._url}: ${cause?.message ?? cause}`, { cause }));
      this._lost(null, 'cannot open socket', false);
      return;
    }
    this._ws = ws;
    this._authed = false;
    this._authError = null;
    this._lastError = null;
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

  async _fetchToken() {
    return typeof this._token === 'function' ? await this._token() : this._token;
  }

  _onSocketClose(code, reason) {
    if (!this._authed && !this._authError && this._lastError?.code === 'too_large') {
      // The auth frame itself was over the server's inbound limit (a token with very many topics): the same
      // token would fail the same way, so this counts as a refused token.
      this._authError = this._lastError;
    }
    if (this._authError) {
      // The token was refused. A fixed string will be refused again: stop. A provider may return a better one
      // later (the user signed in again): keep trying, with backoff that is not reset until a `ready`.
      if (typeof this._token === 'string') {
        this._stop(this._authError, code, reason);
        return;
      }
      this._lost(code, reason || 'unauthorized', false);
      return;
    }
    if (code === 4001 && this._lastError?.code === 'token_expired') {
      // Expected when a refresh did not make it in time: come back at once with a fresh token.
      this._lost(code, reason || 'token expired', false, 0);
      return;
    }
    this._lost(code, reason || '', false);
  }

  /**
   * The current connection is gone (or given up on): clean up, emit 'disconnected', schedule a reconnect.
   * @param {number|null} code  close code, or null when there was no socket
   * @param {boolean} abandon  true when the client itself gives up on a socket that may still be open
   * @param {number} [delayMs]  override the backoff delay
   */
  _lost(code, reason, abandon, delayMs) {
    const hadSocket = this._ws !== null;
    const wasReady = this._state === 'ready';
    this._teardown(abandon ? CLOSE_CLIENT_TIMEOUT : null, reason);
    if (this._state === 'closed') return;
    const delay = delayMs ?? this._backoffDelay();
    this._failures += 1;
    this._state = 'waiting';
    this._timers.reconnect = later(() => {
      this._timers.reconnect = null;
      if (this._state === 'waiting') this._open();
    }, delay);
    if (hadSocket) this._emit('disconnected', { code: code ?? 1006, reason, wasReady, willReconnect: true, retryInMs: delay });
  }

  /** Give up for good (refused token): like close(), but reports why. */
  _stop(error, code, reason) {
    const hadSocket = this._ws !== null;
    const wasReady = this._state === 'ready';
    this._teardown(null, 'stopped');
    this._state = 'closed';
    this._stopError = error;
    this._rejectReady(error);
    if (hadSocket) {
      this._emit('disconnected', { code: code ?? 4001, reason: reason || error.message, wasReady, willReconnect: false });
    }
    this._emit('closed', { error });
  }

  /** Full jitter: a random delay between 0 and min(maxMs, initialMs * 2^failures). */
  _backoffDelay() {
    const { initialMs, maxMs } = this._opts.backoff;
    const cap = Math.min(maxMs, initialMs * 2 ** Math.min(this._failures, 30));
    return Math.floor(Math.random() * cap);
  }

  /** Drop the current socket and everything tied to it. `closeCode` set: also close the socket ourselves. */
  _teardown(closeCode, reason) {
    this._generation += 1;
    for (const name of Object.keys(this._timers)) this._clearTimer(name);
    const ws = this._ws;
    this._ws = null;
    this._authed = false;
    this._authRef = null;
    // Events held for a resume that never completed are not delivered: they are > lastSeq, so the next
    // connection's resume replays them, in order.
    this._buffer = null;
    if (ws) {
      const handlers = ws._nudgeHandlers;
      if (handlers) for (const [name, fn] of Object.entries(handlers)) ws.removeEventListener(name, fn);
      // Keep a no-op error listener: some implementations report an error on a socket closed while connecting.
      ws.addEventListener('error', () => {});
      try {
        if (ws.readyState <= OPEN) ws.close(closeCode ?? 1000, String(reason ?? '').slice(0, 100));
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
      request.reject?.(new NudgeError('disconnected', 'the connection closed before the reply arrived'));
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
    for (const w of waiters) w.reject(error);
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
          this._lost(CLOSE_CLIENT_TIMEOUT, `no frame within ${pongTimeoutMs} ms after a ping`, true);
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
      token = await this._fetchToken();
    } catch (cause) {
      if (generation !== this._generation) return;
      this._emit('error', new NudgeError('token_provider', `the token provider failed: ${cause?.message ?? cause}`, { cause }));
      this._retryRefresh(generation);
      return;
    }
    if (generation !== this._generation) return;
    if (token == null) {
      this._stop(new NudgeError('unauthorized', 'the token provider returned no token; stopping'));
      return;
    }
    this._request({ type: 'refresh', token }).then(
      (reply) => {
        if (generation !== this._generation) return;
        this._expiresAt = reply.expires_at;
        this._emit('refreshed', { expiresAt: reply.expires_at });
        this._scheduleRefresh();
      },
      (error) => {
        if (generation !== this._generation || error.code === 'disconnected') return;
        this._emit('error', error);
        this._retryRefresh(generation);
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
        reject(new NudgeError('disconnected', 'not connected'));
        return;
      }
      const generation = this._generation;
      request.timer = later(() => {
        if (!this._pending.has(ref) || generation !== this._generation) return;
        this._pending.delete(ref);
        reject(new NudgeError('timeout', `no reply to ${message.type} within ${this._opts.requestTimeoutMs} ms`, { ref }));
      }, this._opts.requestTimeoutMs);
      this._pending.set(ref, request);
    });
  }

  _onFrame(data) {
    if (typeof data !== 'string') return; // nudge only sends text frames
    this._emit('frame', { direction: 'in', data });
    // Any frame proves the connection alive.
    this._clearTimer('pong');
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this._emit('error', new NudgeError('bad_frame', 'the server sent a frame that is not JSON'));
      return;
    }
    if (frame === null || typeof frame !== 'object') return;
    const ref = frame.ref;

    if (ref !== undefined && ref === this._authRef) {
      this._authRef = null;
      if (frame.type === 'ready') this._onReady(frame);
      else if (frame.type === 'error') {
        this._authError = new NudgeError(frame.code ?? 'unauthorized', frame.message ?? 'authentication failed', { ref });
        this._emit('error', this._authError);
      }
      return;
    }

    if (ref !== undefined && this._pending.has(ref)) {
      const request = this._pending.get(ref);
      this._pending.delete(ref);
      if (request.timer) clearTimeout(request.timer);
      if (frame.type === 'error') {
        request.reject(new NudgeError(frame.code, frame.message ?? frame.code, { ref, topic: request.topic }));
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
        const error = new NudgeError(frame.code, frame.message ?? frame.code, ref === undefined ? {} : { ref });
        this._lastError = error;
        this._emit('error', error);
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
    // On a reconnect, resume from the last seq: hold every event of this connection back until the `resumed`
    // reply, since live events may arrive (personal ones right after auth) before the older, replayed ones.
    const since = reconnect && this._opts.resume ? this._lastSeq : null;
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

    // What the app must know about the time it was away (only meaningful on a reconnect).
    const outcome = { resumed: false, complete: false, refetch: true, replayed: 0 };
    let refetch = null;
    if (!reconnect) {
      // The first connection: the app fetches its initial state anyway.
    } else if (!this._opts.resume) {
      refetch = { reason: 'disabled', since: null };
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
    this._state = 'ready';
    this._failures = 0;
    this._everReady = true;
    const info = { user: this._user, expiresAt: this._expiresAt };
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const w of waiters) w.resolve(info);
    this._emit('ready', { ...info, reconnect });
    if (!reconnect || generation !== this._generation) return;
    this._emit('reconnected', { ...info, ...outcome });
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
          this._lost(CLOSE_CLIENT_TIMEOUT, `no reply to resume within ${this._opts.requestTimeoutMs} ms`, true);
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
    const refused = new NudgeError('unsubscribed', `unsubscribed from ${topic} before the server confirmed`, { topic });
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
    if (!set || set.size === 0) return;
    for (const handler of [...set]) this._call(handler, value, name === 'error');
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
        this._emit('error', new NudgeError('handler', `a handler threw: ${cause?.message ?? cause}`, { cause }));
      }
    }
  }
}

export default NudgeClient;
