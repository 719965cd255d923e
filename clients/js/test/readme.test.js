// The README's code runs as written, against a real nudge: the quickstart and the `follow` helper (nudge.js) that
// the React and Vue examples build on. Each block is written to a module inside the package (so that
// '@nudge/client' resolves to this package) with only the server URL replaced; `fetch` answers the token
// endpoint, as the app's backend would.
import { test, before, after, mock } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, rmSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { startPostgres, startNudge, freePort, mintToken, publish, waitFor } from './harness.js';

const readme = readFileSync(fileURLToPath(new URL('../README.md', import.meta.url)), 'utf8');
let pg;
let nudge;
const cleanup = [];

/** The first ```js block after `heading`. */
function block(heading) {
  const start = readme.indexOf(`\n${heading}\n`);
  assert.ok(start >= 0, `README has ${heading}`);
  const code = /```js\n([\s\S]*?)```/.exec(readme.slice(start))?.[1];
  assert.ok(code, `a js block under ${heading}`);
  return code;
}

/**
 * Import `code` as a module of this package, with the README's server URL pointed at the test's nudge, and
 * `exportNames` (top-level names the block does not export itself) exported.
 */
async function load(name, code, exportNames = '') {
  assert.ok(code.includes("'wss://nudge.example.com/ws'"));
  const exports = exportNames ? `\nexport { ${exportNames} };\n` : '';
  const source = `${code.replace("'wss://nudge.example.com/ws'", `'${nudge.url}'`)}${exports}`;
  const file = fileURLToPath(new URL(`./.readme-${name}.tmp.mjs`, import.meta.url));
  writeFileSync(file, source);
  cleanup.push(() => rmSync(file, { force: true }));
  return import(pathToFileURL(file).href);
}

before(async () => {
  pg = await startPostgres();
  nudge = await startNudge({ databaseUrl: pg.url, port: await freePort() });
  // The app's backend: GET /api/nudge-token answers a token for the signed-in user.
  const realFetch = globalThis.fetch;
  const fetchMock = mock.method(globalThis, 'fetch', async (url, init) => {
    if (url === '/api/nudge-token') return new Response(mintToken({ sub: 'alice', topics: ['post:*'] }));
    return realFetch(url, init);
  });
  cleanup.push(() => fetchMock.mock.restore());
});

after(async () => {
  for (const fn of cleanup.reverse()) await fn();
  await nudge?.stop();
  await pg?.stop();
});

test('README quickstart: copy-paste runs, subscribes and logs the hint', async () => {
  const logs = [];
  const log = mock.method(console, 'log', (...args) => logs.push(args));
  cleanup.push(() => log.mock.restore());
  const { nudge: client } = await load('quickstart', block('## Quickstart'), 'nudge');
  cleanup.push(() => client.close());
  assert.deepEqual(logs.at(-1), ['subscribed: load the comments from your API now']);
  await publish(pg.url, { topic: 'post:42', kind: 'comment.created', data: { comment_id: 991 } });
  await waitFor(() => logs.some((args) => args[0] === 'post:42 changed:'), { what: 'the hint in the log' });
  const [, kind, data] = logs.find((args) => args[0] === 'post:42 changed:');
  assert.equal(kind, 'comment.created');
  assert.deepEqual(data, { comment_id: 991 });
});

test('README follow(): loads once subscribed, on every hint, and stops when told', async () => {
  const { follow, getNudge } = await load('nudge-js', block('### Subscribe before you fetch'));
  cleanup.push(() => getNudge().close());
  const calls = [];
  const stop = follow('post:7', (event) => calls.push(event));
  await waitFor(() => calls.length >= 1, { what: 'the initial load' });
  assert.equal(calls[0], null, 'the initial load comes after the subscription was confirmed');
  assert.deepEqual(getNudge().topics, ['post:7']);
  const id = await publish(pg.url, { topic: 'post:7', kind: 'comment.created' });
  await waitFor(() => calls.some((e) => e?.id === id), { what: 'the hint' });
  await new Promise((r) => setTimeout(r, 1200)); // past the 1 s fallback: no second initial load
  assert.equal(calls.filter((e) => e === null).length, 1);
  stop();
  assert.deepEqual(getNudge().topics, []);
  const personal = [];
  getNudge().onPersonal((e) => personal.push(e.id));
  await publish(pg.url, { topic: 'post:7' });
  const marker = await publish(pg.url, { topic: 'note', recipients: ['alice'] });
  await waitFor(() => personal.includes(marker), { what: 'a later event' });
  assert.equal(calls.length, 2, 'nothing after stop()');
});
