// socketio peer: Socket.IO 4 with @socket.io/postgres-adapter, as a team would deploy it instead of nudge.
// Backends push with @socket.io/postgres-emitter (see producer.mjs); clients join `user:<sub>` and the topics
// their token allows. See README.md.
import http from 'node:http';
import jwt from 'jsonwebtoken';
import pg from 'pg';
import { Server } from 'socket.io';
import { createAdapter } from '@socket.io/postgres-adapter';

const { DATABASE_URL, JWT_SECRET } = process.env;
const PORT = Number(process.env.PORT || 3000);
if (!DATABASE_URL || !JWT_SECRET) {
  console.error('socketio: DATABASE_URL and JWT_SECRET are required');
  process.exit(2);
}

// The adapter keeps one pool client for LISTEN for good; the others serve publishes and the attachment cleanup.
const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 4 });
pool.on('error', (err) => console.error('socketio: postgres error:', err.message));

// Payloads over 8,000 bytes (NOTIFY's limit) or with binary data go through this table, as the adapter's
// README prescribes; the adapter deletes rows older than its cleanup interval.
await pool.query(`
  CREATE TABLE IF NOT EXISTS socket_io_attachments (
    id          bigserial UNIQUE,
    created_at  timestamptz DEFAULT NOW(),
    payload     bytea
  )`);

const server = http.createServer((req, res) => {
  res.writeHead(req.url === '/healthz' ? 200 : 404).end();
});
const io = new Server(server);
io.adapter(createAdapter(pool, { errorHandler: (err) => console.error('socketio: adapter error:', err.message) }));

function allowed(patterns, topic) {
  return patterns.some((p) => (p.endsWith('*') ? topic.startsWith(p.slice(0, -1)) : p === topic));
}

io.use((socket, next) => {
  try {
    const claims = jwt.verify(socket.handshake.auth?.token ?? '', JWT_SECRET, { algorithms: ['HS256'] });
    if (typeof claims.sub !== 'string' || typeof claims.exp !== 'number') throw new Error('sub and exp are required');
    socket.data.user = claims.sub;
    socket.data.topics = Array.isArray(claims.topics) ? claims.topics : [];
    next();
  } catch (err) {
    next(new Error(`unauthorized: ${err.message}`));
  }
});

io.on('connection', (socket) => {
  socket.join(`user:${socket.data.user}`);

  socket.on('subscribe', (topic, ack) => {
    if (typeof ack !== 'function') return;
    if (typeof topic !== 'string' || topic.length === 0) return ack({ error: 'bad_request' });
    if (!allowed(socket.data.topics, topic)) return ack({ error: 'forbidden' });
    socket.join(`topic:${topic}`);
    ack({ ok: true });
  });

  socket.on('unsubscribe', (topic, ack) => {
    if (typeof topic === 'string') socket.leave(`topic:${topic}`);
    if (typeof ack === 'function') ack({ ok: true });
  });
});

server.listen(PORT, () => console.log(`socketio: listening on :${PORT}`));

function shutdown() {
  // io.close() disconnects every client, closes the HTTP server and the adapter (which releases its LISTEN client).
  io.close(() => pool.end().finally(() => process.exit(0)));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
