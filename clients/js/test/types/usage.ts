// Compiled (never run) by `npm run typecheck` with tsc --noEmit: the types a TypeScript app sees through the
// package's `exports`, as an ES module (this file) and from CommonJS (usage-cjs.cts). The misuses at the end
// must stay type errors (each is marked as an expected error).
import { NudgeClient, NudgeError } from '@nudge/client';
import type { CloseInfo, DisconnectedInfo, NudgeClientState, NudgeEvent, ReadyEvent, RefetchInfo } from '@nudge/client';
import DefaultExport from '@nudge/client';

async function fetchToken(): Promise<string | null> {
  const r = await fetch('/api/nudge-token');
  if (r.status === 401) return null;
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  return r.text();
}

const nudge: NudgeClient = new DefaultExport('wss://nudge.example.com/ws', {
  token: fetchToken,
  since: Number(sessionStorage.getItem('nudge-seq')) || null,
  cacheToken: true,
  backoff: { initialMs: 500, maxMs: 30_000, stableMs: 10_000, goingAwayMs: 5_000 },
  connectivity: { online: true, visibility: true, hiddenMs: 60_000, checkTimeoutMs: 5_000 },
  shouldReconnect: (info: CloseInfo) => (info.code === 4002 ? true : undefined),
  autoConnect: typeof window !== 'undefined',
});
new NudgeClient(new URL('wss://nudge.example.com/ws'), { token: 'a.b.c', connectivity: false });

interface CommentCreated {
  comment_id: number;
}
const sub = nudge.subscribe<CommentCreated>('post:42', (event: NudgeEvent<CommentCreated>) => {
  const id: number = event.data.comment_id;
  const seq: number | undefined = event.seq;
  void id, seq;
});
await sub.ready;
const topic: string = sub.topic;
await sub();

const info = await nudge.ready({ timeout: 5_000 });
const user: string = info.user;
await nudge.ready();

nudge.on('state', ({ state, previous }) => {
  const now: NudgeClientState = state;
  const before: NudgeClientState = previous;
  void now, before;
});
nudge.on('ready', (r: ReadyEvent) => void [r.reconnect, r.resumed, r.complete, r.replayed]);
nudge.on('refetch', (r: RefetchInfo) => void r.reason);
nudge.on('disconnected', (d: DisconnectedInfo) => void [d.code, d.retryInMs, d.offline]);
nudge.on('closed', ({ error }) => void error?.closeCode);
const off = nudge.on('error', (e) => {
  const closeCode: number | undefined = e.closeCode;
  const fromServer: boolean = e.fromServer;
  if (e.code === 'revoked' || e.code === 'connection_closed' || e.code === 'some_newer_server_code') void closeCode;
  void fromServer;
});
off();
const offline: NudgeClientState = 'offline';
const seq: number | null = nudge.lastSeq;
const error = new NudgeError('timeout', 'x', { closeCode: 1006, fromServer: false });
void [topic, user, offline, seq, error];

// @ts-expect-error: no such event
nudge.on('nope', () => {});
// @ts-expect-error: token is required
new NudgeClient('wss://nudge.example.com/ws', {});
// @ts-expect-error: not a state
const bad: NudgeClientState = 'reconnecting';
// @ts-expect-error: ready() options are an object
await nudge.ready(5_000);
// @ts-expect-error: the backoff has no such option
new NudgeClient('wss://x/ws', { token: 'x', backoff: { initialDelay: 1 } });
void bad;
