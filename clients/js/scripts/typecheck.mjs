// Type-checks test/types/ (a small TypeScript app using the package through its `exports`) with tsc --noEmit,
// with TypeScript 7 and 5.9, under `moduleResolution` nodenext (ES module and CommonJS) and bundler.
// Needs `npm run build` first (dist/index.d.cts).
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
let failed = false;
for (const name of ['typescript', 'typescript5']) {
  const dir = `${root}node_modules/${name}`;
  const pkg = JSON.parse(readFileSync(`${dir}/package.json`, 'utf8'));
  const tsc = `${dir}/${pkg.bin.tsc}`;
  const version = pkg.version;
  for (const project of ['test/types/tsconfig.json', 'test/types/tsconfig.bundler.json']) {
    try {
      execFileSync(process.execPath, [tsc, '--noEmit', '-p', project], { cwd: root, stdio: 'inherit' });
      console.log(`typecheck: TypeScript ${version}, ${project}: ok`);
    } catch {
      console.error(`typecheck: TypeScript ${version}, ${project}: FAILED`);
      failed = true;
    }
  }
}
process.exit(failed ? 1 : 0);
