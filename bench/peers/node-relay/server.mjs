// node-relay: the relay a team would write themselves, speaking nudge's protocol v1 over nudge's schema.
// Single node, no resume, no refresh: LISTEN, claim a batch, fan out. See README.md.
import http from 'node:http';
import jwt from 'jsonwebtoken';
import pg from 'pg';
import { WebSocketServer } from 'ws';

const { DATABASE_URL, JWT_SECRET } = process.env;
const PORT = Number(process.env.PORT || 8080);
if (!DATABASE_URL || !JWT_SECRET) {
  console.error('node-relay: DATABASE_URL and JWT_SECRET are required');
  process.exit(2);
}

const CLAIM_SQL = `
  UPDATE nudge.events e SET processed_at = now()
  FROM (SELECT id FROM nudge.events WHERE processed_at IS NULL ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED) c
  WHERE e.id = c.id
  RETURNING e.id, e.topic, e.kind, e.occurred_at, e.recipients, e.data`;
const MAX_BUFFERED = 1 << 20; // drop clients that stop reading rather than buffering for them forever

const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 2 });
const byUser = new Map(); // user -> Set<socket>
const byTopic = new Map(); // topic -> Set<socket>

function addTo(map, key, ws) {
  if (!map.has(key)) map.set(key, new Set());
  map.get(key).add(ws);
}
function removeFrom(map, key, ws) {
  const set = map.get(key);
  if (!set) return;
  set.delete(ws);
  if (set.size === 0) map.delete(key);
}

function allowed(patterns, topic) {
  return patterns.some((p) => (p.endsWith('*') ? topic.startsWith(p.slice(0, -1)) : p === topic));
}

function send(ws, frame) {
  if (ws.readyState !== ws.OPEN) return;
  if (ws.bufferedAmount > MAX_BUFFERED) return ws.close(1013, 'too slow');
  ws.send(frame);
}

function reply(ws, msg, ref) {
  send(ws, JSON.stringify(ref === undefined ? msg : { ...msg, ref }));
}

function error(ws, code, message, ref) {
  reply(ws, { type: 'error', code, message }, ref);
}

// --- claiming: one claim at a time; a wake-up during a claim means "claim again afterwards".
let claiming = false;
let again = false;

async function claim() {
  if (claiming) {
    again = true;
    return;
  }
  claiming = true;
  try {
    do {
      again = false;
      const { rows } = await pool.query(CLAIM_SQL);
      rows.sort((a, b) => Number(a.id) - Number(b.id));
      for (const row of rows) deliver(row);
      if (rows.length === 1000) again = true;
    } while (again);
  } catch (err) {
    console.error('node-relay: claim failed:', err.message);
  } finally {
    claiming = false;
  }
}

function deliver(row) {
  const frame = JSON.stringify({
    type: 'event',
    id: Number(row.id),
    seq: 0,
    topic: row.topic,
    kind: row.kind,
    at: row.occurred_at.toISOString(),
    data: row.data,
  });
  if (row.recipients) {
    for (const user of row.recipients) for (const ws of byUser.get(user) ?? []) send(ws, frame);
  } else {
    for (const ws of byTopic.get(row.topic) ?? []) send(ws, frame);
  }
}

// --- WebSocket connections
function onMessage(ws, state, raw) {
  let msg;
  try {
    msg = JSON.parse(raw.toString());
  } catch {
    return error(ws, 'bad_request', 'malformed JSON');
  }
  if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) return error(ws, 'bad_request', 'expected a JSON object');
  const { ref } = msg;

  if (!state.user) {
    if (msg.type !== 'auth' || typeof msg.token !== 'string') {
      error(ws, 'unauthorized', 'first message must be auth', ref);
      return ws.close(4001, 'unauthorized');
    }
    try {
      const claims = jwt.verify(msg.token, JWT_SECRET, { algorithms: ['HS256'] });
      if (typeof claims.sub !== 'string' || typeof claims.exp !== 'number') throw new Error('sub and exp are required');
      clearTimeout(state.authTimer);
      state.user = claims.sub;
      state.patterns = Array.isArray(claims.topics) ? claims.topics : [];
      addTo(byUser, state.user, ws);
      return reply(ws, { type: 'ready', user: claims.sub, expires_at: claims.exp }, ref);
    } catch (err) {
      error(ws, 'unauthorized', err.message, ref);
      return ws.close(4001, 'unauthorized');
    }
  }

  switch (msg.type) {
    case 'subscribe':
    case 'unsubscribe': {
      const { topic } = msg;
      if (typeof topic !== 'string' || topic.length === 0) return error(ws, 'bad_request', 'missing field `topic`', ref);
      if (!allowed(state.patterns, topic)) return error(ws, 'forbidden', `not allowed to subscribe to ${topic}`, ref);
      if (msg.type === 'subscribe') {
        state.topics.add(topic);
        addTo(byTopic, topic, ws);
      } else {
        state.topics.delete(topic);
        removeFrom(byTopic, topic, ws);
      }
      return reply(ws, { type: `${msg.type}d`, topic }, ref);
    }
    case 'ping':
      return reply(ws, { type: 'pong' }, ref);
    case 'wakeup':
      claim();
      return;
    default:
      return error(ws, 'bad_request', `unknown type \`${msg.type}\``, ref);
  }
}

const server = http.createServer((req, res) => {
  res.writeHead(req.url === '/healthz' ? 200 : 404).end();
});
const wss = new WebSocketServer({ server, path: '/ws', maxPayload: 64 * 1024 });

wss.on('connection', (ws) => {
  const state = { user: null, patterns: [], topics: new Set() };
  state.authTimer = setTimeout(() => ws.close(4001, 'no auth message'), 10_000);
  ws.on('message', (raw) => onMessage(ws, state, raw));
  ws.on('error', () => {});
  ws.on('close', () => {
    clearTimeout(state.authTimer);
    if (state.user) removeFrom(byUser, state.user, ws);
    for (const topic of state.topics) removeFrom(byTopic, topic, ws);
  });
});

// --- LISTEN on a dedicated client; a lost connection is fatal (the supervisor restarts us).
const listener = new pg.Client({ connectionString: DATABASE_URL });
listener.on('notification', () => claim());
listener.on('error', (err) => {
  console.error('node-relay: listen connection lost:', err.message);
  process.exit(1);
});
await listener.connect();
await listener.query('LISTEN nudge');
setInterval(claim, 2000);
claim();

server.listen(PORT, () => console.log(`node-relay: listening on :${PORT}`));

function shutdown() {
  for (const ws of wss.clients) ws.close(1001, 'going away');
  server.close();
  Promise.allSettled([listener.end(), pool.end()]).then(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
