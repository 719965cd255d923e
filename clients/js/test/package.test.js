// The published package: package.json fields, the CommonJS build, the browser bundle, what `engines` promises,
// the license and the README's links. Builds dist/ first (scripts/build.mjs); no nudge needed.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import vm from 'node:vm';
import { transform } from 'esbuild';
import * as esm from '../src/index.js';
import { fakeServer, flush, jwt } from './fake.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));
const read = (file) => readFileSync(`${root}${file}`, 'utf8');
const pkg = JSON.parse(read('package.json'));
const require = createRequire(import.meta.url);
/** The repository URL used everywhere (a placeholder until the project's public home is settled). */
const REPO = 'https://github.com/nudge-dev/nudge';

before(() => {
  execFileSync(process.execPath, ['scripts/build.mjs'], { cwd: root, stdio: 'inherit' });
});

test('package.json: publishable, public, MIT, zero runtime dependencies', () => {
  assert.equal(pkg.name, '@nudge/client');
  assert.equal(pkg.license, 'MIT');
  assert.deepEqual(pkg.publishConfig, { access: 'public' });
  assert.deepEqual(pkg.repository, { type: 'git', url: `git+${REPO}.git`, directory: 'clients/js' });
  assert.equal(pkg.homepage, `${REPO}/tree/main/clients/js#readme`);
  assert.deepEqual(pkg.bugs, { url: `${REPO}/issues` });
  assert.equal(pkg.dependencies, undefined);
  assert.equal(pkg.sideEffects, false);
  assert.equal(pkg.type, 'module');
  assert.deepEqual(pkg.exports['.'], {
    import: { types: './index.d.ts', default: './src/index.js' },
    require: { types: './dist/index.d.cts', default: './dist/index.cjs' },
  });
  // Every package.json in the repository says MIT, like Cargo.toml.
  for (const file of ['tests/browser', 'examples/node', 'bench/peers/node-relay', 'bench/peers/socketio']) {
    assert.equal(JSON.parse(readFileSync(`${repoRoot}${file}/package.json`, 'utf8')).license, 'MIT', file);
  }
});

test('import and require of @nudge/client resolve to the ES module and the CommonJS build, with one API', async () => {
  assert.equal(require.resolve('@nudge/client'), `${root}dist/index.cjs`);
  assert.equal(import.meta.resolve('@nudge/client'), new URL('../src/index.js', import.meta.url).href);
  const cjs = require('@nudge/client');
  assert.deepEqual(Object.keys(cjs).sort(), Object.keys(esm).sort());
  assert.equal(cjs.default, cjs.NudgeClient);
  const error = new cjs.NudgeError('timeout', 'x', { closeCode: 1006 });
  assert.ok(error instanceof Error);
  assert.equal(error.closeCode, 1006);

  // The CommonJS build works like the module: connect to a fake server.
  const server = fakeServer();
  const client = new cjs.NudgeClient('ws://fake/ws', { token: jwt(), WebSocket: server.WebSocket, pingIntervalMs: 0 });
  const info = await client.ready();
  assert.equal(info.user, 'alice');
  client.close();
});

test('the minified browser bundle defines window.Nudge in a <script> and connects', async () => {
  const code = read('dist/nudge.min.js');
  assert.ok(code.length < 30_000, `${code.length} bytes`);
  assert.match(code, /^\/\*! @nudge\/client \d+\.\d+\.\d+ \| MIT \| https:\/\/github\.com\/nudge-dev\/nudge/);
  const server = fakeServer();
  const window = new EventTarget();
  const context = vm.createContext({
    window,
    document: Object.assign(new EventTarget(), { visibilityState: 'visible' }),
    navigator: { onLine: true },
    WebSocket: server.WebSocket,
    setTimeout,
    clearTimeout,
    queueMicrotask,
    console,
    atob,
    URL,
  });
  vm.runInContext(code, context, { filename: 'nudge.min.js' });
  assert.equal(typeof context.Nudge.NudgeClient, 'function');
  assert.equal(context.Nudge.default, context.Nudge.NudgeClient);
  const client = vm.runInContext(`new Nudge.NudgeClient('ws://fake/ws', { token: ${JSON.stringify(jwt())}, pingIntervalMs: 0 })`, context);
  await flush();
  assert.equal(client.state, 'ready');
  client.close();
});

test(`engines (${pkg.engines.node}): the source and the CommonJS build use no syntax newer than that Node`, async () => {
  const target = `node${/^>=(\d+)$/.exec(pkg.engines.node)[1]}`;
  for (const file of ['src/index.js', 'dist/index.cjs']) {
    const source = read(file);
    // esbuild rewrites any syntax the target lacks; identical output means nothing needed rewriting.
    const forTarget = await transform(source, { target, format: 'esm', loader: 'js' }).catch((e) => e);
    const asIs = await transform(source, { target: 'esnext', format: 'esm', loader: 'js' });
    assert.equal(forTarget.code, asIs.code, `${file} needs syntax newer than ${target}`);
  }
});

test('LICENSE: MIT, the same text at the repository root and in the package', () => {
  const license = read('LICENSE');
  assert.equal(license, readFileSync(`${repoRoot}LICENSE`, 'utf8'));
  assert.match(license, /^MIT License\n\nCopyright \(c\) 2026 the nudge authors\n/);
});

test('README: npm install, absolute links to the one repository URL, the examples and notes a front-end team needs', () => {
  const readme = read('README.md');
  assert.match(readme, /npm install @nudge\/client/);
  const links = [...readme.matchAll(/\]\(([^)\s]+)\)/g)].map((m) => m[1]);
  assert.ok(links.length > 5);
  for (const link of links) {
    // npm shows the README away from the repository: relative links would break there.
    assert.ok(/^(https?:|#)/.test(link), `relative link: ${link}`);
    if (link.includes('github.com')) assert.ok(link.startsWith(`${REPO}/`) || link === REPO, `other repository URL: ${link}`);
  }
  for (const heading of ['## Quickstart', '### React', '### Vue', '## Server-side rendering', '## Close codes']) {
    assert.ok(readme.includes(`\n${heading}`), `section ${heading}`);
  }
  const quickstart = readme.slice(readme.indexOf('\n## Quickstart'));
  assert.match(quickstart.slice(0, 2500), /if \(!r\.ok\)/, 'the token fetch checks r.ok');
});
