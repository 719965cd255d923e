// Builds what the package serves besides src/index.js (the ES module, served as written):
//   dist/index.cjs      CommonJS, for require()
//   dist/index.d.cts    its types (index.d.ts, as a CommonJS declaration file)
//   dist/nudge.min.js   minified IIFE for a <script> tag: window.Nudge.NudgeClient
// Run by `npm run build`, `npm test` and before `npm pack` / `npm publish` (prepack).
import { build } from 'esbuild';
import { copyFile, mkdir, readFile, rm } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const pkg = JSON.parse(await readFile(`${root}package.json`, 'utf8'));
/** The oldest Node the package.json `engines` field promises: the CommonJS build is checked against it. */
const nodeTarget = `node${/^>=(\d+)/.exec(pkg.engines.node)[1]}`;
/** The browser bundle's syntax level (README: "Browser support"). */
const browserTarget = 'es2020';

await rm(`${root}dist`, { recursive: true, force: true });
await mkdir(`${root}dist`);
const banner = `/*! ${pkg.name} ${pkg.version} | ${pkg.license} | ${pkg.homepage} */`;
await build({
  entryPoints: [`${root}src/index.js`],
  outfile: `${root}dist/index.cjs`,
  format: 'cjs',
  platform: 'neutral',
  target: nodeTarget,
  banner: { js: banner },
  logLevel: 'warning',
});
await build({
  entryPoints: [`${root}src/index.js`],
  outfile: `${root}dist/nudge.min.js`,
  format: 'iife',
  globalName: 'Nudge',
  platform: 'browser',
  target: browserTarget,
  minify: true,
  banner: { js: banner },
  logLevel: 'warning',
});
await copyFile(`${root}index.d.ts`, `${root}dist/index.d.cts`);
