// Test harness: a throwaway PostgreSQL, real nudge processes, HS256 tokens, deadline-based waits.
// Every process started here is tied to this test process: throwaway-pg stops when its stdin pipe closes, and
// each nudge runs under a small bash watchdog that kills it when its stdin pipe closes. So even if this process
// dies without running its `after` hooks, nothing is left behind.

import { spawn, execFile } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '../../..');
export const NUDGE_BIN = process.env.NUDGE_BIN ?? path.join(repoRoot, 'target/debug/nudge');
export const SECRET = 'test-secret-for-the-js-client-0123456789abcdef';

// nudge pids still running. On exit they are killed directly; the watchdogs and throwaway-pg need nothing:
// their stdin pipes close with this process and they clean up after themselves (SIGKILL would skip that).
const nudgePids = new Set();
process.on('exit', () => {
  for (const pid of nudgePids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {}
  }
});

/** Poll `check` until it returns a truthy value or the deadline passes. */
export async function waitFor(check, { timeoutMs = 10_000, intervalMs = 25, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Resolve with the next `name` event of `client` (optionally matching `filter`), or reject at the deadline. */
export function nextEvent(client, name, { timeoutMs = 10_000, filter = () => true } = {}) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out after ${timeoutMs} ms waiting for '${name}'`));
    }, timeoutMs);
    const off = client.on(name, (value) => {
      if (!filter(value)) return;
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

/** A queue of values pushed by a callback, taken with a deadline. */
export class Inbox {
  constructor() {
    this.items = [];
    this.push = (item) => this.items.push(item);
  }
  async take({ timeoutMs = 10_000, filter = () => true, what = 'an item' } = {}) {
    let index = -1;
    await waitFor(() => (index = this.items.findIndex(filter)) >= 0, { timeoutMs, what });
    return this.items.splice(index, 1)[0];
  }
}

export function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]);
}

function b64url(value) {
  return Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');
}

/** An HS256 JWT. `ttlSeconds` sets exp relative to now. */
export function mintToken({ sub = 'alice', topics, ttlSeconds = 300, secret = SECRET, ...claims } = {}) {
  const payload = { sub, exp: Math.floor(Date.now() / 1000) + ttlSeconds, ...claims };
  if (topics !== undefined) payload.topics = topics;
  const head = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(payload)}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * Start a throwaway PostgreSQL cluster. Returns {url, stop}. throwaway-pg picks a random port that nobody
 * answers on, which may still be taken (e.g. as the local end of an outgoing connection) by the time postgres
 * binds it: that case is retried with another port.
 */
export async function startPostgres({ timeoutMs = 60_000 } = {}) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startPostgresOnce({ timeoutMs });
    } catch (e) {
      if (attempt >= 3 || !/could not bind|Address already in use/.test(e.message)) throw e;
    }
  }
}

async function startPostgresOnce({ timeoutMs }) {
  const child = spawn(path.join(repoRoot, 'scripts/throwaway-pg'), [], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  let stdout = '';
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const url = await withTimeout(
    new Promise((resolve, reject) => {
      child.stdout.on('data', (d) => {
        stdout += d;
        const nl = stdout.indexOf('\n');
        if (nl >= 0) resolve(stdout.slice(0, nl).trim());
      });
      child.once('exit', (code) => reject(new Error(`throwaway-pg exited with ${code}: ${stderr}`)));
    }),
    timeoutMs,
    'throwaway-pg to print its URL',
  ).catch((e) => {
    child.kill('SIGTERM'); // its trap stops the cluster and deletes it
    throw e;
  });
  return {
    url,
    async stop() {
      child.stdin.end();
      await withTimeout(exited, 15_000, 'throwaway-pg to stop').catch(() => child.kill('SIGTERM'));
    },
  };
}

/**
 * Start `nudge serve` on `port` and wait until /readyz says 200. Returns {pid, port, url, log(), kill(signal),
 * stop()}. `pid` is nudge's own pid (for SIGSTOP/SIGCONT/SIGKILL); the watchdog around it is killed by stop().
 */
export async function startNudge({ databaseUrl, port, env = {}, timeoutMs = 30_000 }) {
  // The watchdog prints nudge's pid, then waits for its stdin to close and kills nudge (SIGCONT first, in
  // case a test left it stopped).
  const script = [
    '"$NUDGE_BIN" serve </dev/null &',
    'pid=$!',
    'echo "$pid"',
    'cat >/dev/null',
    'kill -CONT "$pid" 2>/dev/null',
    'kill -KILL "$pid" 2>/dev/null',
    'wait "$pid" 2>/dev/null',
    'exit 0',
  ].join('\n');
  const child = spawn('bash', ['-c', script], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: {
      ...process.env,
      NUDGE_BIN,
      NUDGE_DATABASE_URL: databaseUrl,
      NUDGE_JWT_SECRET: SECRET,
      NUDGE_LISTEN: `127.0.0.1:${port}`,
      NUDGE_POLL_INTERVAL: '1h',
      RUST_LOG: process.env.RUST_LOG ?? 'info',
      ...env,
    },
  });
  let log = '';
  child.stderr.on('data', (d) => (log += d));
  const exited = new Promise((resolve) => child.once('exit', resolve));
  let pid;
  try {
    pid = await withTimeout(
      new Promise((resolve, reject) => {
        let out = '';
        child.stdout.on('data', (d) => {
          out += d;
          if (out.includes('\n')) {
            const nudgePid = Number(out.trim());
            nudgePids.add(nudgePid);
            resolve(nudgePid);
          }
        });
        child.once('exit', () => reject(new Error(`nudge watchdog exited: ${log}`)));
      }),
      timeoutMs,
      'the nudge watchdog to start',
    );
    const started = Date.now();
    await waitFor(
      async () => {
        if (child.exitCode !== null) throw new Error(`nudge exited early:\n${log}`);
        try {
          const response = await fetch(`http://127.0.0.1:${port}/readyz`, { signal: AbortSignal.timeout(1000) });
          return response.status === 200;
        } catch {
          return false;
        }
      },
      { timeoutMs: timeoutMs - (Date.now() - started), intervalMs: 50, what: `nudge /readyz on port ${port}` },
    );
  } catch (e) {
    child.stdin.end(); // the watchdog kills nudge
    throw new Error(`${e.message}\n--- nudge log ---\n${log}`);
  }
  return {
    pid,
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    log: () => log,
    signal(name) {
      process.kill(pid, name);
    },
    async stop() {
      child.stdin.end();
      await withTimeout(exited, 10_000, 'nudge to stop').catch(() => {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {}
      });
      nudgePids.delete(pid);
    },
  };
}

function literal(value) {
  return value == null ? 'NULL' : `'${String(value).replace(/'/g, "''")}'`;
}

/** Run SQL with psql. */
export function psql(databaseUrl, sql) {
  return new Promise((resolve, reject) => {
    execFile('psql', [databaseUrl, '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-tA', '-c', sql], { timeout: 15_000 }, (error, stdout, stderr) =>
      error ? reject(new Error(`psql failed: ${stderr || error.message}`)) : resolve(stdout.trim()),
    );
  });
}

/** Insert one event; returns its id. */
export async function publish(databaseUrl, { topic, kind = 'test.happened', recipients = null, data = {} }) {
  const recipientsSql = recipients ? `ARRAY[${recipients.map(literal).join(',')}]::text[]` : 'NULL';
  const sql = `INSERT INTO nudge.events (topic, kind, recipients, data) VALUES (${literal(topic)}, ${literal(kind)}, ${recipientsSql}, ${literal(JSON.stringify(data))}::jsonb) RETURNING id`;
  return Number(await psql(databaseUrl, sql));
}
