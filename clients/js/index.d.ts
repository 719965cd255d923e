// Types for @nudge/client (protocol v1). Hand-written; the implementation is src/index.js.

/** Error codes nudge itself sends in `{"type":"error"}` frames. A newer server may send others: they arrive as
 * they are, with `fromServer: true`. */
export type ServerErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'forbidden'
  | 'token_expired'
  | 'too_large'
  | 'rate_limited'
  | 'revoked';

/**
 * Codes the client produces itself:
 * - `closed`: the client was closed (`close()`), so the promise can never settle otherwise;
 * - `disconnected`: the connection closed before a reply arrived;
 * - `timeout`: no reply within `requestTimeoutMs`;
 * - `unsubscribed`: the topic was unsubscribed before the server confirmed the subscription;
 * - `token_provider`: the token function threw or rejected (`cause` holds its error);
 * - `connect_failed`: the WebSocket constructor threw (bad URL, ...);
 * - `bad_frame`: the server sent a frame that is not JSON;
 * - `handler`: one of your handlers (or `shouldReconnect`) threw (`cause` holds its error);
 * - `connection_closed`: the client stopped after a close that no error frame explained (an unknown 4xxx code,
 *   or `shouldReconnect` returned false); `closeCode` says which.
 *
 * The client also uses `unauthorized` (the token provider returned no token) and `revoked` (the provider had no
 * other token after a 4003) with `fromServer: false`.
 */
export type ClientErrorCode =
  | 'closed'
  | 'disconnected'
  | 'timeout'
  | 'unsubscribed'
  | 'token_provider'
  | 'connect_failed'
  | 'bad_frame'
  | 'handler'
  | 'connection_closed';

export type NudgeErrorCode = ServerErrorCode | ClientErrorCode;

export class NudgeError extends Error {
  constructor(
    code: NudgeErrorCode | (string & {}),
    message: string,
    details?: { ref?: number; topic?: string; closeCode?: number; cause?: unknown; fromServer?: boolean },
  );
  readonly name: 'NudgeError';
  /** The server's error code, or one of the client's own. */
  readonly code: NudgeErrorCode | (string & {});
  /** The `ref` of the request this error answers, when it answers one. */
  readonly ref?: number;
  /** The topic of the subscribe/unsubscribe request this error answers. */
  readonly topic?: string;
  /** The WebSocket close code, when the error explains a close (the error frame nudge sent right before it, the
   * reason the client stopped) or a request was cut off by one (`disconnected`). */
  readonly closeCode?: number;
  /** True when nudge sent this error frame, whatever its code (also codes newer than this client); false for
   * the client's own errors. */
  readonly fromServer: boolean;
}

/** An event as nudge delivers it. */
export interface NudgeEvent<Data = Record<string, unknown>> {
  type: 'event';
  /** The row's id in `nudge.events`. */
  id: number;
  /** Cluster-wide delivery order, strictly increasing per connection: what the client resumes from after a
   * reconnect. Absent only from servers older than the `resume` protocol. */
  seq?: number;
  topic: string;
  kind: string;
  /** `occurred_at` in UTC with milliseconds, e.g. `2026-11-25T10:00:00.123Z`. */
  at: string;
  data: Data;
}

/** A JWT, or a function returning one (sync or async). Return `null`/`undefined` to make the client stop. */
export type TokenProvider = string | (() => string | null | undefined | Promise<string | null | undefined>);

/** The subset of the WebSocket API the client uses: browsers, Node >= 22, undici, or the `ws` package. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: any) => void): void;
  removeEventListener(type: string, listener: (event: any) => void): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface BackoffOptions {
  /** First retry waits a random time up to this (full jitter). Default 500. */
  initialMs?: number;
  /** The cap the doubling delay never exceeds. Default 30000. */
  maxMs?: number;
  /** The backoff starts over only after a connection stayed ready this long: a server that accepts and then
   * drops connections at once does not get hammered. Default 10000. */
  stableMs?: number;
  /** After close 1001/1012 (the server is shutting down or restarting, e.g. a deploy), the reconnect waits a
   * random time in `[0, max(goingAwayMs, current backoff cap))`, so a node's clients do not all come back in the
   * same instant. Default 5000. */
  goingAwayMs?: number;
}

/** Browser connectivity handling. Ignored where there is no `window` / `document` (Node, server rendering). */
export interface ConnectivityOptions {
  /** Reconnect at once on the window's `online` event; while `navigator.onLine` is false, do not schedule
   * retries (state `offline`). Default true. */
  online?: boolean;
  /** When the page becomes visible after being hidden at least `hiddenMs`, check the socket with a ping (and
   * reconnect at once if nothing answers within `checkTimeoutMs`), or retry at once when waiting. Default true. */
  visibility?: boolean;
  /** Default 60000. */
  hiddenMs?: number;
  /** How long a check ping (on `online`, `offline`, or visible again) may go unanswered. Default 5000. */
  checkTimeoutMs?: number;
}

/** What `shouldReconnect` is told about a close. */
export interface CloseInfo {
  /** The WebSocket close code (4000 when the client gave up on a silent connection itself). */
  code: number;
  reason: string;
  /** The error frame nudge sent right before the close, or null. */
  error: NudgeError | null;
  /** What the close-code table decides: true to reconnect, false to stop. */
  willReconnect: boolean;
}

export interface NudgeClientOptions {
  /** A JWT, or a function returning one. A function is asked when a token is needed: on a (re)connect unless the
   * last token it returned is still valid for longer than `max(refreshBeforeSeconds, 5)` seconds (its `exp` is
   * read from the JWT, not verified), before each refresh, and after a refusal or a revocation. */
  token: TokenProvider;
  /** Reuse the provider's last token on reconnects while it is valid (see `token`). Default true. */
  cacheToken?: boolean;
  /** Resume from this `seq` on the first connection: a `lastSeq` saved before a page reload. */
  since?: number | null;
  /** Overrides the close-code table: return true to reconnect, false to stop, undefined to keep the default. */
  shouldReconnect?: (info: CloseInfo) => boolean | undefined | void;
  /** Browser online/offline and visibility handling; false turns it off. */
  connectivity?: ConnectivityOptions | boolean;
  /** Refresh this long before the token's `expires_at`. Default 60. Only for function providers. */
  refreshBeforeSeconds?: number;
  /** Send `{"type":"ping"}` this often. Default 25000; 0 disables keep-alive. */
  pingIntervalMs?: number;
  /** Give up on the connection when no frame at all arrives this long after a ping. Default 10000. */
  pongTimeoutMs?: number;
  /** Give up on an attempt not authenticated and resubscribed within this time. Default 15000. */
  connectTimeoutMs?: number;
  /** Reject a request (subscribe, unsubscribe, refresh) with code `timeout` after this. Default 15000. */
  requestTimeoutMs?: number;
  backoff?: BackoffOptions;
  /** The WebSocket constructor; default `globalThis.WebSocket` (looked up when connecting). */
  WebSocket?: WebSocketConstructor;
  /** Connect from the constructor. Default true; otherwise call `connect()`. In server-side rendering pass
   * false (or create the client in the browser only): server code must not open a socket. */
  autoConnect?: boolean;
  /** On a reconnect, ask the server to replay what was missed since the last event (`resume`), so a refetch is
   * needed only when that is impossible. Default true. With false, every reconnect emits `refetch` ('disabled'). */
  resume?: boolean;
}

export interface ReadyInfo {
  /** The token's `sub`. */
  user: string;
  /** The token's expiry, Unix seconds. */
  expiresAt: number;
}

/** The `ready` event. */
export interface ReadyEvent extends ReadyInfo {
  /** A reconnect (a `reconnected` event follows). */
  reconnect: boolean;
  /** The server answered a `resume` on this connection (a reconnect, or the first one with option `since`). */
  resumed: boolean;
  /** The resume replayed everything missed. */
  complete: boolean;
  /** Events the resume delivered. */
  replayed: number;
}

/** `reconnected`: ready again after a lost connection, and what happened to the events sent meanwhile. */
export interface ReconnectedInfo extends ReadyInfo {
  /** The server answered a `resume`: missed events (if any) were delivered to the handlers before this. */
  resumed: boolean;
  /** Nothing was missed: every event sent while away was replayed. */
  complete: boolean;
  /** The app must refetch what it shows (`!complete`); a `refetch` event follows with the reason. */
  refetch: boolean;
  /** Events replayed by the resume (0 when none was possible). */
  replayed: number;
}

/**
 * Why a refetch is needed:
 * - `incomplete`: the server could not replay everything (events deleted after its retention, more than it
 *   replays at once, or a position from another database);
 * - `no_position`: the client never saw an event, so there is no position to resume from;
 * - `resume_failed`: the server refused the `resume` request (e.g. a nudge older than it); see `error`;
 * - `disabled`: the client was created with `resume: false`.
 */
export type RefetchReason = 'incomplete' | 'no_position' | 'resume_failed' | 'disabled';

export interface RefetchInfo {
  reason: RefetchReason;
  /** The seq the client tried to resume from, or null when it could not resume. */
  since: number | null;
  /** For `incomplete`: the server's `until`, the position the stream continues from. */
  until?: number;
  /** For `resume_failed`: the server's error. */
  error?: NudgeError;
}

export interface DisconnectedInfo {
  /** The WebSocket close code: 1006 for an abrupt loss, 4001 for auth failures and expired tokens, 1001 when
   * nudge shuts down, 1000 after `close()`, 4000 when the client gave up itself (pong, check or connect timeout). */
  code: number;
  reason: string;
  /** Whether this connection had been ready (false for a failed attempt). */
  wasReady: boolean;
  willReconnect: boolean;
  /** Present when willReconnect and online: the delay before the next attempt. */
  retryInMs?: number;
  /** True when the browser is offline: the client waits for its `online` event instead of a timer. */
  offline?: boolean;
}

export interface FrameInfo {
  direction: 'in' | 'out';
  /** The frame's JSON text; the `token` of outgoing `auth` and `refresh` frames is replaced by `<redacted>`. */
  data: string;
}

export interface NudgeClientEvents {
  /** Every change of `state`. */
  state: { state: NudgeClientState; previous: NudgeClientState };
  /** Authenticated and every subscription restored: after the first connect and after each reconnect. */
  ready: ReadyEvent;
  /** Ready again after a lost connection (or `close()` then `connect()`). Missed events were replayed to the
   * handlers before it when possible; check `refetch`, or better, listen to the `refetch` event. */
  reconnected: ReconnectedInfo;
  /** After a reconnect, only when events sent while away may be lost: refetch what the app shows. Emitted right
   * after `reconnected`, at most once per reconnect; on the first connect only with option `since`. */
  refetch: RefetchInfo;
  /** A connection or connection attempt ended. */
  disconnected: DisconnectedInfo;
  /** The client stopped for good: after `close()` (error null), or because of a close that stops it (refused or
   * revoked token, 1009, an unknown 4xxx code, `shouldReconnect`), or a provider returning null. */
  closed: { error: NudgeError | null };
  /** Server errors that answer no pending request, refused subscriptions nobody awaited, provider failures,
   * handler exceptions. With no listener, the first error of each code is written to the console. */
  error: NudgeError;
  /** Every frame in both directions, for protocol logs. */
  frame: FrameInfo;
  /** Every event, before it is routed to topic or personal handlers. */
  event: NudgeEvent;
  /** The token was refreshed on the open connection. */
  refreshed: { expiresAt: number };
  /** The server dropped a subscription the client had: a refreshed token no longer allows the topic, or it
   * was refused when restored after a reconnect. Its handlers are removed. */
  revoked: { topic: string; reason: string; error?: NudgeError };
}

/** `waiting`: a timer runs until the next attempt; `offline`: the browser is offline, the client waits for it. */
export type NudgeClientState = 'idle' | 'connecting' | 'ready' | 'waiting' | 'offline' | 'closed';

/** Returned by `subscribe`: call it to remove the handler. */
export interface Subscription {
  (): Promise<void>;
  unsubscribe(): Promise<void>;
  readonly topic: string;
  /** Resolves when the server confirmed the subscription; rejects with a NudgeError when it refused it. If
   * this property is never read, a refusal is emitted as an 'error' event instead. */
  readonly ready: Promise<void>;
}

export class NudgeClient {
  constructor(url: string | URL, options: NudgeClientOptions);

  readonly state: NudgeClientState;
  /** The authenticated user, or null before the first `ready`. */
  readonly user: string | null;
  /** The current token's expiry (Unix seconds), or null. */
  readonly expiresAt: number | null;
  /** Topics wanted: subscribed, or to be subscribed on the next connection. */
  readonly topics: string[];
  /** The highest event `seq` delivered (or confirmed by a resume), or null: where the next reconnect resumes.
   * Save it to pass as `since` after a page reload. */
  readonly lastSeq: number | null;

  /** Start connecting (with `autoConnect: false`, or after `close()`); while `waiting` or `offline`, try now.
   * Throws a TypeError when there is no WebSocket constructor. */
  connect(): void;
  /** Resolves when ready (at once if already); rejects when the client is or becomes closed, or with code
   * `timeout` after `timeout` ms (the client keeps trying). */
  ready(options?: { timeout?: number }): Promise<ReadyInfo>;
  /** Handle events on `topic`; kept across reconnects. */
  subscribe<Data = Record<string, unknown>>(topic: string, handler: (event: NudgeEvent<Data>) => void): Subscription;
  /** Remove every handler of `topic` and unsubscribe. Never rejects; failures are 'error' events. */
  unsubscribe(topic: string): Promise<void>;
  /** Handle events whose topic the client is not subscribed to (addressed to the user). Returns an off function. */
  onPersonal<Data = Record<string, unknown>>(handler: (event: NudgeEvent<Data>) => void): () => void;
  on<K extends keyof NudgeClientEvents>(name: K, handler: (value: NudgeClientEvents[K]) => void): () => void;
  once<K extends keyof NudgeClientEvents>(name: K, handler: (value: NudgeClientEvents[K]) => void): () => void;
  off<K extends keyof NudgeClientEvents>(name: K, handler: (value: NudgeClientEvents[K]) => void): void;
  /** Ask nudge for a claim pass now; sent after the next authentication when not connected. */
  wakeup(): void;
  /** Close for good: no reconnect. Subscriptions and handlers are kept for a later `connect()`; the cached token
   * is forgotten. */
  close(): void;
}

export default NudgeClient;
