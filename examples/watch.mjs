// A tiny nudge client for examples/run-all: connect, authenticate, subscribe, print "ready", then wait for one
// expected event and exit 0 (1 on timeout or error). Needs Node's global WebSocket (Node 20: --experimental-websocket).
//
//   NUDGE_JWT_SECRET=... node --experimental-websocket watch.mjs --url ws://127.0.0.1:8080/ws \
//       [--user reader] [--topic post:42] --kind comment.created [--field comment_id] [--timeout 5]
//
// The expected value of data[field] is read as one line from stdin after "ready" (the publisher runs only then,
// so its new id is not known before); the timeout counts from that line. Without --field any event of that kind
// matches (the line is still awaited). The matching event is printed as JSON on stdout.
import { createHmac } from 'node:crypto';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';

const { values: opt } = parseArgs({ options: {
  url: { type: 'string' }, user: { type: 'string', default: 'example-watcher' }, topic: { type: 'string' },
  kind: { type: 'string' }, field: { type: 'string' }, timeout: { type: 'string', default: '5' },
} });
const fail = (msg) => { console.error(`watch: ${msg}`); process.exit(1); };
if (!opt.url || !opt.kind) fail('--url and --kind are required');
if (typeof WebSocket === 'undefined') fail('no global WebSocket: use Node 22+, or Node 20 with --experimental-websocket');
const secret = process.env.NUDGE_JWT_SECRET ?? fail('NUDGE_JWT_SECRET is not set');

// An HS256 JWT, as your backend would issue it: sub = the user, topics = what it may subscribe to.
const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
const claims = { sub: opt.user, exp: Math.floor(Date.now() / 1000) + 300, ...(opt.topic && { topics: [opt.topic] }) };
const unsigned = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
const token = `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;

let expected;            // undefined until stdin says; then the value of data[field] we wait for ('' = any)
const events = [];       // events that arrived before the expectation did
const matches = (ev) => ev.kind === opt.kind && (!opt.field || String(ev.data?.[opt.field]) === expected);
const done = (ev) => {  // print it, then close politely (1000) so nudge logs a normal close
  console.log(JSON.stringify(ev));
  ws.onclose = () => process.exit(0);
  ws.close(1000);
  setTimeout(() => process.exit(0), 1000).unref();
};

const startup = setTimeout(() => fail('no expected value on stdin within 60 s'), 60_000);
const ws = new WebSocket(opt.url);
ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', token }));
ws.onerror = (e) => fail(`websocket error: ${e.message ?? e.type}`);
ws.onclose = (e) => fail(`connection closed: ${e.code} ${e.reason}`);
ws.onmessage = ({ data }) => {
  const msg = JSON.parse(data);
  if (msg.type === 'ready' && opt.topic) ws.send(JSON.stringify({ type: 'subscribe', topic: opt.topic }));
  else if (msg.type === 'ready' || msg.type === 'subscribed') console.log('ready');
  else if (msg.type === 'error') fail(`server error: ${data}`);
  else if (msg.type === 'event') {
    if (expected === undefined) events.push(msg);
    else if (matches(msg)) done(msg);
  }
};

const rl = createInterface({ input: process.stdin });
rl.once('line', (line) => {
  clearTimeout(startup);
  expected = line.trim();
  const early = events.find(matches);
  if (early) done(early);
  setTimeout(() => fail(`no ${opt.kind} event${opt.field ? ` with data.${opt.field} = ${expected}` : ''} `
    + `within ${opt.timeout} s`), Number(opt.timeout) * 1000);
});
rl.once('close', () => { if (expected === undefined) fail('stdin closed before the expected value arrived'); });
