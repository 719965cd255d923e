// The backend side: pushes events to room `topic:bench` through PostgreSQL with @socket.io/postgres-emitter, the
// way a PHP/Python/Node backend pushes to a Socket.IO cluster, at a fixed rate for a fixed time.
//
//   DATABASE_URL=postgres://... node producer.mjs RATE SECONDS
//
// Event k (0, 1, ...) is emitted at start + k/RATE and carries its id and its send time in ms on the machine's
// monotonic clock (process.hrtime), comparable across processes. Prints {"events":E,"seconds":S} on stdout.
import pg from 'pg';
import { Emitter } from '@socket.io/postgres-emitter';

const rate = Number(process.argv[2]);
const seconds = Number(process.argv[3]);
if (!process.env.DATABASE_URL || !(rate > 0) || !(seconds > 0)) {
  console.error('usage: DATABASE_URL=... node producer.mjs RATE SECONDS');
  process.exit(2);
}

const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 4 });
pool.on('error', (err) => console.error('producer: postgres error:', err.message));
const emitter = new Emitter(pool);
// CLOCK_MONOTONIC, shared by every process on the machine (performance.timeOrigin differs by up to ~2 ms).
const now = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A warm pool, so the first events do not pay for the connections.
await Promise.all(Array.from({ length: 4 }, () => pool.query('SELECT 1')));

const total = Math.ceil(rate * seconds);
const start = performance.now();
for (let id = 0; id < total; id++) {
  // A late timer makes a small burst of the events that are due, not a lower rate.
  const wait = start + (id * 1000) / rate - performance.now();
  if (wait > 0) await sleep(wait);
  const event = { id, topic: 'bench', kind: 'bench.event', sent: now(), data: { bench: true } };
  emitter.to('topic:bench').emit('event', event);
}
// emit() does not return the query's promise: wait until every NOTIFY has been sent and answered.
while (pool.waitingCount > 0 || pool.idleCount < pool.totalCount) await sleep(5);
const elapsed = (performance.now() - start) / 1000;
await pool.end();
console.log(JSON.stringify({ events: total, seconds: Math.max(elapsed, seconds) }));
