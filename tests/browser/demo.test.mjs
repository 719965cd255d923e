// End-to-end test of the `nudge demo` page in headless Chromium (puppeteer-core, Node's built-in test runner).
//
// Starts scripts/throwaway-pg and `nudge demo` on it, opens the page as alice, bob and carol on one post, and
// checks: a comment reaches the other tabs within 1 s (with the "1 new comment" badge); a personal nudge reaches
// only its recipient within 1 s; after nudge is stopped (SIGTERM) and started again on the same port, database
// and secret, every tab reconnects on its own and comments flow again. Saves a screenshot to docs/demo.png.
//
// Environment: NUDGE_BIN (default: <repo>/target/debug/nudge, built with `cargo build` when missing),
// CHROMIUM (default: /usr/bin/chromium), RECONNECT_DEADLINE_MS (default 45000), DOWNTIME_MS (how long nudge stays
// down in the restart step, default 3000), VERBOSE=1 (print the browser console and nudge log even on success).

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const NUDGE_BIN = process.env.NUDGE_BIN || path.join(ROOT, 'target/debug/nudge');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = path.join(ROOT, 'docs/demo.png');
const POST = '7'; // each run has a database of its own
const LATENCY_LIMIT_MS = 1000;
const RECONNECT_DEADLINE_MS = Number(process.env.RECONNECT_DEADLINE_MS || 45_000);
// How long nudge stays down during the restart, like a deploy would: long enough for the clients' backoff to grow.
const DOWNTIME_MS = Number(process.env.DOWNTIME_MS || 3000);

// ---- small helpers ------------------------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** An error that `until` does not retry: the thing waited for can no longer happen. */
class Fatal extends Error {}

/** Poll `probe` until it returns a truthy value or `ms` pass; the error names `what`. */
async function until(what, ms, probe, everyMs = 50) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const value = await probe();
      if (value) return value;
    } catch (e) {
      if (e instanceof Fatal) throw e;
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    await sleep(everyMs);
  }
}

async function freePort() {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  server.close();
  await once(server, 'close');
  return port;
}

/** A child process whose output is kept (and shown when the test fails). */
function start(name, command, args, options) {
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], ...options });
  child.output = ''; // stdout and stderr, for failure reports
  child.firstLine = new Promise((resolve) => {
    let stdout = '';
    child.stdout.on('data', (chunk) => {
      if (stdout === null) return;
      stdout += chunk;
      if (stdout.includes('\n')) {
        resolve(stdout.slice(0, stdout.indexOf('\n')));
        stdout = null;
      }
    });
    child.stdout.on('end', () => resolve(null));
  });
  const keep = (chunk) => {
    child.output += chunk;
    if (child.output.length > 200_000) child.output = child.output.slice(-100_000);
  };
  child.stdout.setEncoding('utf8').on('data', keep);
  child.stderr.setEncoding('utf8').on('data', keep);
  child.exited = once(child, 'exit').then(([code, signal]) => ({ code, signal }));
  child.label = name;
  children.add(child);
  child.exited.then(() => children.delete(child));
  return child;
}

// Children are killed when this process goes away however it goes (a failed test, Ctrl-C, an exception).
const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => {
    for (const child of children) child.kill('SIGTERM');
    process.exit(130);
  });
}

async function stop(child, ms = 10_000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return child?.exited;
  child.kill('SIGTERM');
  let timer;
  const result = await Promise.race([child.exited, new Promise((resolve) => (timer = setTimeout(resolve, ms, null)))]);
  clearTimeout(timer);
  if (result) return result;
  child.kill('SIGKILL');
  return child.exited;
}

// ---- the system under test ----------------------------------------------------------------------------------

let pg; // scripts/throwaway-pg; stops when its stdin closes
let databaseUrl;
let port;
let baseUrl;
let nudge;
let browser;
let userDataDir;
const tabs = {}; // user -> puppeteer Page
const pageErrors = [];
const consoleLines = [];

async function startPostgres() {
  pg = start('throwaway-pg', path.join(ROOT, 'scripts/throwaway-pg'), []);
  let timer;
  const line = await Promise.race([pg.firstLine, new Promise((resolve) => (timer = setTimeout(resolve, 60_000, 'timeout')))]);
  clearTimeout(timer);
  if (!line?.startsWith('postgres://')) {
    await Promise.race([pg.exited, sleep(200)]); // let its error output arrive
    throw new Error(`throwaway-pg printed no URL (${line ?? 'exited'}):\n${pg.output}`);
  }
  databaseUrl = line;
}

/** Start `nudge demo` on the fixed port and wait until the page answers. Returns the ms it took. */
async function startNudge() {
  const t0 = Date.now();
  // The database on the command line: `nudge demo` ignores NUDGE_DATABASE_URL. Its secret is random on each
  // start; the page's token provider fetches a fresh token on every reconnect.
  nudge = start('nudge', NUDGE_BIN, ['demo', '--database-url', databaseUrl], {
    env: {
      ...process.env,
      NUDGE_LISTEN: `127.0.0.1:${port}`,
      RUST_LOG: process.env.RUST_LOG || 'info',
    },
  });
  const current = nudge;
  await until(`nudge to serve ${baseUrl}`, 60_000, async () => {
    if (current.exitCode !== null) throw new Fatal(`nudge exited (${current.exitCode}):\n${current.output}`);
    const response = await fetch(baseUrl, { signal: AbortSignal.timeout(2000) });
    return response.ok && (await response.text()).includes('nudge demo');
  });
  return Date.now() - t0;
}

async function openTab(user) {
  const context = await browser.createBrowserContext(); // its own cookies and storage, like another browser
  const page = await context.newPage();
  await page.setViewport({ width: 1280, height: 800 });
  page.on('pageerror', (e) => pageErrors.push(`${user}: ${e.message}`));
  page.on('console', (m) => consoleLines.push(`${user} [${m.type()}] ${m.text()}`));
  await page.goto(`${baseUrl}?user=${user}&post=${POST}`, { waitUntil: 'domcontentloaded' });
  tabs[user] = page;
  return page;
}

const status = (page) => page.$eval('#status', (el) => ({ text: el.textContent, ready: el.classList.contains('ready') }));

async function waitConnected(user, ms) {
  await tabs[user].waitForFunction(
    (u) => {
      const el = document.getElementById('status');
      return el.textContent === `connected as ${u}` && el.classList.contains('ready');
    },
    { timeout: ms, polling: 'mutation' },
    user,
  );
}

/**
 * Arm a watcher in `page`: it records Date.now() (the machine's clock, shared by every tab) the moment an `li`
 * in list `#listId` has text containing `text`. Read it with `seenAt`.
 */
async function watchFor(page, listId, text, key) {
  await page.evaluate(
    (listId, text, key) => {
      window.__seen ??= {};
      window.__seen[key] = null;
      const list = document.getElementById(listId);
      const check = () => {
        if (window.__seen[key] !== null) return;
        if ([...list.querySelectorAll('li')].some((li) => li.textContent.includes(text))) {
          window.__seen[key] = Date.now();
          observer.disconnect();
        }
      };
      const observer = new MutationObserver(check);
      observer.observe(list, { childList: true, subtree: true, characterData: true });
      check();
    },
    listId,
    text,
    key,
  );
}

async function seenAt(page, key, ms) {
  const handle = await page.waitForFunction((key) => window.__seen?.[key], { timeout: ms, polling: 'mutation' }, key);
  return handle.jsonValue();
}

/** Click `selector` in `page`, returning the page's Date.now() at the click (taken in the page, before its handler). */
async function clickAt(page, selector) {
  await page.$eval(selector, (el) => {
    window.__clickAt = null;
    el.addEventListener('click', () => (window.__clickAt = Date.now()), { capture: true, once: true });
  });
  await page.click(selector);
  return page.evaluate(() => window.__clickAt);
}

async function addComment(user, text) {
  const page = tabs[user];
  await page.$eval('#comment-body', (el) => (el.value = ''));
  await page.type('#comment-body', text);
  return clickAt(page, '#add-comment');
}

const listTexts = (page, listId) => page.$$eval(`#${listId} li`, (lis) => lis.map((li) => li.textContent));
const commentIds = (page) => page.$$eval('#comments li', (lis) => lis.map((li) => li.dataset.id));

// ---- the test -----------------------------------------------------------------------------------------------

const results = {};
let failed = false;

/** A step that is skipped once an earlier one failed: the steps build on each other. */
function step(name, fn) {
  it(name, async (t) => {
    if (failed) return t.skip('an earlier step failed');
    try {
      await fn(t);
    } catch (e) {
      failed = true;
      throw e;
    }
  });
}

describe('nudge demo page in Chromium', { timeout: 240_000 }, () => {
  before(async () => {
    failed = true; // until the setup is done: the after hook then prints the diagnostics
    if (!fs.existsSync(NUDGE_BIN)) {
      const build = spawnSync('cargo', ['build', '--quiet'], { cwd: ROOT, stdio: 'inherit' });
      assert.equal(build.status, 0, 'cargo build failed');
    }
    assert.ok(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: install it (apt-get install chromium) or set CHROMIUM`);
    port = await freePort();
    baseUrl = `http://127.0.0.1:${port}/`;
    await startPostgres();
    results.startMs = await startNudge();
    userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nudge-chromium-'));
    browser = await puppeteer.launch({
      executablePath: CHROMIUM,
      headless: true,
      userDataDir,
      defaultViewport: { width: 1280, height: 800 },
      args: [
        '--headless=new',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
    failed = false;
  });

  after(async () => {
    if (failed || process.env.VERBOSE) {
      console.log(`--- browser console ---\n${consoleLines.join('\n')}`);
      if (nudge) console.log(`--- nudge output (last run) ---\n${nudge.output.slice(-8000)}`);
      if (pg) console.log(`--- throwaway-pg (${pg.exitCode === null ? 'running' : `exited ${pg.exitCode}`}) ---\n${pg.output}`);
    }
    await browser?.close().catch(() => {});
    await stop(nudge);
    if (pg) {
      pg.stdin.end(); // throwaway-pg stops its cluster and deletes it when stdin closes
      await stop(pg, 15_000);
    }
    if (userDataDir) fs.rmSync(userDataDir, { recursive: true, force: true });
    console.log(`results: ${JSON.stringify(results)}`);
  });

  step('three tabs (alice, bob, carol) connect', async () => {
    await Promise.all(
      ['alice', 'bob', 'carol'].map(async (user) => {
        const t0 = Date.now();
        await openTab(user);
        await waitConnected(user, 15_000);
        results[`connect_${user}_ms`] = Date.now() - t0; // browser context, page load and connect
        results[`connect_${user}_since_navigation_ms`] = Math.round(await tabs[user].evaluate(() => performance.now()));
      }),
    );
    for (const user of ['alice', 'bob', 'carol']) assert.equal((await listTexts(tabs[user], 'comments')).length, 0);
  });

  step('a comment by alice reaches bob and carol within 1 s, with the "1 new comment" badge', async () => {
    const text = 'Great write-up! Does this reach the other tabs right away?';
    await watchFor(tabs.bob, 'comments', text, 'c1');
    await watchFor(tabs.carol, 'comments', text, 'c1');
    await watchFor(tabs.alice, 'comments', text, 'c1');
    const clicked = await addComment('alice', text);
    assert.ok(clicked, 'the click on #add-comment was not seen');
    for (const user of ['bob', 'carol']) {
      const seen = await seenAt(tabs[user], 'c1', 5000);
      const latency = seen - clicked;
      results[`comment_to_${user}_ms`] = latency;
      console.log(`comment latency alice -> ${user}: ${latency} ms`);
      assert.ok(latency < LATENCY_LIMIT_MS, `${user} saw the comment after ${latency} ms (limit ${LATENCY_LIMIT_MS})`);
      const badge = await tabs[user].$eval('#new-count', (el) => ({ hidden: el.hidden, text: el.textContent }));
      assert.deepEqual(badge, { hidden: false, text: '1 new comment' }, `${user}'s badge`);
    }
    await seenAt(tabs.alice, 'c1', 5000); // the author's own tab shows it too (from the API reply)
    for (const user of ['bob', 'carol']) {
      const bodies = await tabs[user].$$eval('#comments li .body', (els) => els.map((el) => el.textContent));
      assert.deepEqual(bodies, [text], `${user}'s #comments`);
    }
    const own = await tabs.alice.$eval('#new-count', (el) => (el.hidden ? null : el.textContent));
    if (own) console.log(`NOTE: alice's own tab shows the badge "${own}" for her own comment`);
  });

  step('alice nudges bob: only bob gets a personal notification, within 1 s', async () => {
    await tabs.alice.$eval('#nudge-to', (el) => (el.value = ''));
    await tabs.alice.type('#nudge-to', 'bob');
    await watchFor(tabs.bob, 'personal', 'alice', 'n1');
    const clicked = await clickAt(tabs.alice, '#send-nudge');
    const seen = await seenAt(tabs.bob, 'n1', 5000);
    const latency = seen - clicked;
    results.nudge_to_bob_ms = latency;
    console.log(`nudge latency alice -> bob: ${latency} ms`);
    assert.ok(latency < LATENCY_LIMIT_MS, `bob saw the nudge after ${latency} ms (limit ${LATENCY_LIMIT_MS})`);
    const items = await listTexts(tabs.bob, 'personal');
    assert.equal(items.length, 1, `bob's #personal: ${JSON.stringify(items)}`);
    assert.match(items[0], /^alice nudged you/);
    // Nobody else: give a stray delivery a moment to show up, then check.
    await sleep(500);
    for (const user of ['alice', 'carol']) {
      assert.deepEqual(await listTexts(tabs[user], 'personal'), [], `${user}'s #personal must stay empty`);
    }
  });

  step('screenshot docs/demo.png', async () => {
    fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
    await tabs.bob.bringToFront();
    await tabs.bob.screenshot({ path: SCREENSHOT, clip: { x: 0, y: 0, width: 1280, height: 800 } });
    const png = fs.readFileSync(SCREENSHOT);
    assert.equal(png.readUInt32BE(16), 1280);
    assert.equal(png.readUInt32BE(20), 800);
  });

  step('nudge restarts on the same port: every tab shows reconnecting…, then reconnects by itself', async () => {
    const t0 = Date.now();
    const exit = await stop(nudge, 15_000);
    results.shutdown_ms = Date.now() - t0;
    console.log(`nudge stopped after SIGTERM in ${results.shutdown_ms} ms: ${JSON.stringify(exit)}`);
    assert.deepEqual(exit, { code: 0, signal: null }, 'nudge should exit 0 on SIGTERM');
    for (const user of ['alice', 'bob', 'carol']) {
      await tabs[user].waitForFunction(
        () => document.getElementById('status').textContent === 'reconnecting…',
        { timeout: 5000, polling: 'mutation' },
      );
      assert.equal((await status(tabs[user])).ready, false);
    }
    await sleep(Math.max(0, DOWNTIME_MS - (Date.now() - t0))); // simulated downtime, not a wait for anything
    results.restart_ms = await startNudge();
    const t1 = Date.now();
    results.downtime_ms = t1 - t0;
    await Promise.all(
      ['alice', 'bob', 'carol'].map(async (user) => {
        await waitConnected(user, RECONNECT_DEADLINE_MS);
        results[`reconnect_${user}_ms`] = Date.now() - t1;
      }),
    );
    const slowest = Math.max(...['alice', 'bob', 'carol'].map((u) => results[`reconnect_${u}_ms`]));
    console.log(
      `reconnected after nudge answered again: ${['alice', 'bob', 'carol'].map((u) => `${u} ${results[`reconnect_${u}_ms`]} ms`).join(', ')}; ` +
        `nudge was down ${t1 - t0} ms (SIGTERM to answering again)`,
    );
    if (slowest > 10_000) console.log(`NOTE: slow reconnect (${slowest} ms): the client backs off up to 30 s`);
  });

  step('after the restart, a comment by bob reaches alice within 1 s', async () => {
    const text = 'Yes, and again after nudge restarted.';
    await watchFor(tabs.alice, 'comments', text, 'c2');
    await watchFor(tabs.carol, 'comments', text, 'c2');
    const clicked = await addComment('bob', text);
    for (const user of ['alice', 'carol']) {
      const seen = await seenAt(tabs[user], 'c2', 5000);
      const latency = seen - clicked;
      results[`comment_after_restart_to_${user}_ms`] = latency;
      console.log(`comment latency after restart bob -> ${user}: ${latency} ms`);
      assert.ok(latency < LATENCY_LIMIT_MS, `${user} saw the comment after ${latency} ms (limit ${LATENCY_LIMIT_MS})`);
    }
  });

  step('no page threw, and a tab that did not write shows each comment once', async () => {
    assert.deepEqual(pageErrors, []);
    const ids = await commentIds(tabs.carol);
    assert.equal(ids.length, 2, `carol's #comments: ${ids.join(',')}`);
    assert.equal(new Set(ids).size, ids.length, `carol's #comments has duplicates: ${ids.join(',')}`);
  });

  // The author's tab fetches after its own POST and again for the hint of its own comment; the page serializes
  // those fetches so the comment is shown once.
  step("the author's own tab shows its comment once", async () => {
    const lists = {};
    for (const user of ['alice', 'bob', 'carol']) lists[user] = (await commentIds(tabs[user])).join(',');
    const unique = (list) => new Set(list.split(',')).size === list.split(',').length;
    assert.ok(Object.values(lists).every(unique), `data-id of each tab's #comments: ${JSON.stringify(lists)}`);
  });
});
