// `npm pack --dry-run` (which builds dist/ first, through prepack) must list exactly the files the package is
// meant to publish, and every file package.json points at must be among them. Run by `npm test` and CI.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const EXPECTED = [
  'LICENSE',
  'README.md',
  'dist/index.cjs',
  'dist/index.d.cts',
  'dist/nudge.min.js',
  'index.d.ts',
  'package.json',
  'src/index.js',
];

const root = fileURLToPath(new URL('..', import.meta.url));
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
const output = execFileSync(npm, ['pack', '--dry-run', '--json', '--loglevel=error'], { cwd: root, encoding: 'utf8' });
const [report] = JSON.parse(output.slice(output.indexOf('[')));
const packed = report.files.map((f) => f.path).sort();

const problems = [];
for (const file of EXPECTED) if (!packed.includes(file)) problems.push(`missing from the package: ${file}`);
for (const file of packed) if (!EXPECTED.includes(file)) problems.push(`unexpected in the package: ${file}`);

// Every path package.json names (main, module, types, unpkg, jsdelivr, exports) is packed.
const pkg = JSON.parse(readFileSync(`${root}package.json`, 'utf8'));
const named = new Set();
const collect = (value) => {
  if (typeof value === 'string') named.add(value.replace(/^\.\//, ''));
  else if (value && typeof value === 'object') Object.values(value).forEach(collect);
};
for (const field of ['main', 'module', 'types', 'unpkg', 'jsdelivr', 'exports']) collect(pkg[field]);
for (const file of named) if (!packed.includes(file)) problems.push(`package.json names ${file}, which is not packed`);
if (Object.keys(pkg.dependencies ?? {}).length > 0) problems.push('the package must have no runtime dependencies');

if (problems.length > 0) {
  console.error(`check-pack: ${report.name}@${report.version}:\n  ${problems.join('\n  ')}`);
  process.exit(1);
}
console.log(`check-pack: ${report.name}@${report.version}: ${packed.length} files as expected (${report.size} bytes packed)`);
