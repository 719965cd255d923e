// The load generator for the Socket.IO peer: N socket.io-client connections (WebSocket transport only), each a
// distinct user subscribed to topic `bench`; producer.mjs pushes events through PostgreSQL with the emitter. It
// measures what nudge-bench measures and prints one JSON object with the same keys on stdout; progress on stderr.
//
//   node bench.mjs --url http://127.0.0.1:3000 --secret S --database-url URL --connections 3000 --rate 20 \
//       --duration 15 --server-pid PID          (--idle or --rate 0: connect, measure memory, no events)
import { spawn } from 'node:child_process';
import { createSecretKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import jwt from 'jsonwebtoken';
import { io } from 'socket.io-client';

const { values: opt } = parseArgs({
  options: {
    url: { type: 'string', default: process.env.URL },
    secret: { type: 'string', default: process.env.JWT_SECRET },
    'database-url': { type: 'string', default: process.env.DATABASE_URL },
    connections: { type: 'string', default: process.env.CONNECTIONS ?? '100' },
    rate: { type: 'string', default: process.env.RATE ?? '20' },
    duration: { type: 'string', default: process.env.DURATION ?? '10' }, // seconds; "15s" works too
    grace: { type: 'string', default: '10' }, // seconds without a delivery after which the rest is lost
    'server-pid': { type: 'string', default: process.env.SERVER_PID },
    idle: { type: 'boolean', default: false },
  },
});
const connections = Number(opt.connections);
const rate = opt.idle ? 0 : Number(opt.rate);
const duration = parseFloat(opt.duration);
if (!opt.url || !opt.secret || (rate > 0 && !opt['database-url']) || !(connections > 0) || !(rate >= 0)) {
  console.error('usage: node bench.mjs --url URL --secret S --database-url URL --connections N --rate R --duration S');
  console.error('           [--server-pid PID] [--idle] [--grace S]');
  process.exit(2);
}
const pid = opt['server-pid'];
// A KeyObject: given a string, jsonwebtoken 9 first tries (and fails) to parse it as a PEM key on every sign.
const key = createSecretKey(Buffer.from(opt.secret));
const WAVE = 256; // connections opened concurrently, as nudge-bench does
// CLOCK_MONOTONIC, shared by every process on the machine (performance.timeOrigin differs by up to ~2 ms).
const now = () => Number(process.hrtime.bigint()) / 1e6;
const log = (msg) => console.error(`socketio-bench: ${msg}`);

function rssKib() {
  const m = pid && /^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : 0;
}
function cpuSeconds() {
  if (!pid) return 0;
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields 14 and 15 of proc(5) are [11], [12]
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

// Deliveries: per connection a byte per event id (counts, to tell lost from duplicated); latencies in one array.
const maxEvents = Math.ceil(rate * duration);
const latencies = [];
let received = 0;
let lastReceive = 0; // now() of the last delivery
let disconnected = 0;

function connect(i) {
  const token = jwt.sign({ sub: `u${i}`, topics: ['bench'] }, key, { algorithm: 'HS256', expiresIn: '1h' });
  const socket = io(opt.url, {
    transports: ['websocket'],
    forceNew: true, // one Manager (one WebSocket) per client, not multiplexed
    reconnection: false, // a dropped connection must show up as lost events
    timeout: 30_000,
    auth: { token },
  });
  const seen = new Uint8Array(maxEvents);
  return new Promise((resolve, reject) => {
    socket.once('connect_error', (err) => reject(err));
    socket.once('connect', async () => {
      try {
        const reply = await socket.timeout(30_000).emitWithAck('subscribe', 'bench');
        if (!reply?.ok) throw new Error(`subscribe refused: ${JSON.stringify(reply)}`);
        socket.on('event', (ev) => {
          const at = now();
          if (seen[ev.id]++ === 0) latencies.push(at - ev.sent);
          received += 1;
          lastReceive = at;
        });
        socket.on('disconnect', () => (disconnected += 1));
        resolve({ socket, seen });
      } catch (err) {
        reject(err);
      }
    });
  }).catch((err) => {
    socket.close();
    throw err;
  });
}

const rssBefore = rssKib();
const connectStarted = performance.now();
const clients = [];
let failures = 0;
for (let first = 0; first < connections; first += WAVE) {
  const wave = Array.from({ length: Math.min(WAVE, connections - first) }, (_, k) => connect(first + k));
  for (const result of await Promise.allSettled(wave)) {
    if (result.status === 'fulfilled') clients.push(result.value);
    else if (++failures <= 3) log(`connection failed: ${result.reason?.message ?? result.reason}`);
  }
}
const connectSecs = (performance.now() - connectStarted) / 1000;
log(`${clients.length} connected (${failures} failed) in ${connectSecs.toFixed(2)}s`);
await sleep(1000);
const rssIdle = rssKib();
log(`server RSS ${rssBefore} KiB before, ${rssIdle} KiB with ${clients.length} idle connections`);

let events = 0;
let produceSecs = 0;
let deliverySecs = 0;
let rssAfter = rssIdle;
let cpu = 0;
if (rate > 0) {
  const cpuBefore = cpuSeconds();
  const ownCpuBefore = process.cpuUsage();
  const produceStarted = now();
  // The producer is a separate process, as a backend would be: this process's receiving load cannot slow it.
  const script = new URL('producer.mjs', import.meta.url).pathname;
  const producer = spawn(process.execPath, [script, String(rate), String(duration)], {
    env: { ...process.env, DATABASE_URL: opt['database-url'] },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  producer.stdout.on('data', (chunk) => (out += chunk));
  const code = await new Promise((resolve) => producer.on('close', resolve));
  if (code !== 0) {
    log(`producer exited with ${code}`);
    process.exit(1);
  }
  ({ events, seconds: produceSecs } = JSON.parse(out));
  const expected = events * clients.length;
  log(`produced ${events} events in ${produceSecs.toFixed(2)}s; waiting for ${expected} deliveries`);
  // As nudge-bench: wait while deliveries go on; what has not come after --grace seconds without one is lost.
  let [last, lastChange] = [received, performance.now()];
  while (received < expected && performance.now() - lastChange < parseFloat(opt.grace) * 1000) {
    await sleep(20);
    if (received !== last) [last, lastChange] = [received, performance.now()];
  }
  deliverySecs = Math.max((lastReceive - produceStarted) / 1000, produceSecs);
  rssAfter = rssKib();
  cpu = cpuSeconds() - cpuBefore;
  const own = process.cpuUsage(ownCpuBefore);
  log(`CPU while producing and draining: server ${cpu.toFixed(2)}s, this generator ${((own.user + own.system) / 1e6).toFixed(2)}s`);
}
if (disconnected) log(`${disconnected} connections dropped during the run`);

let duplicated = 0;
for (const { seen } of clients) for (const n of seen) if (n > 1) duplicated += n - 1;
const sorted = Float64Array.from(latencies).sort();
const pct = (p) => (sorted.length ? sorted[Math.min(sorted.length, Math.max(1, Math.ceil(sorted.length * p))) - 1] : 0);
const ms = (x) => Math.round(x * 1000) / 1000;
const expected = events * clients.length;
console.log(
  JSON.stringify({
    nodes: 1,
    mode: 'topic',
    connections: clients.length,
    connection_failures: failures,
    handshakes_per_s: clients.length / connectSecs,
    writers: 1,
    target_rate: rate,
    events,
    events_per_s: produceSecs ? events / produceSecs : 0,
    deliveries_expected: expected,
    deliveries: sorted.length,
    deliveries_per_s: deliverySecs ? sorted.length / deliverySecs : 0,
    lost: expected - sorted.length,
    duplicated,
    latency_ms: { p50: ms(pct(0.5)), p90: ms(pct(0.9)), p99: ms(pct(0.99)), max: ms(pct(1)) },
    server_rss_kib_before: rssBefore,
    server_rss_kib: rssAfter,
    server_rss_kib_per_connection: (rssAfter - rssBefore) / Math.max(clients.length, 1),
    server_cpu_s: cpu,
  }),
);
process.exit(0);
