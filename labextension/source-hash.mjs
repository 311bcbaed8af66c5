// Writes the SHA-256 of the extension's source (package.json, tsconfig.json, src/, style/) into the
// built bundle, ../durable_kernel_labextension/source.sha256; tests/test_labextension_bundle.py
// recomputes it the same way and fails when the source changed without a rebuild.
import { createHash } from 'node:crypto';
import { readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const here = new URL('.', import.meta.url).pathname;
const files = [];
const walk = rel => {
  const full = join(here, rel);
  if (statSync(full).isDirectory()) {
    for (const name of readdirSync(full)) walk(rel ? `${rel}/${name}` : name);
  } else {
    files.push(rel);
  }
};
for (const top of ['package.json', 'tsconfig.json', 'src', 'style']) walk(top);
files.sort();
const hash = createHash('sha256');
for (const rel of files) {
  hash.update(rel + '\0');
  hash.update(readFileSync(join(here, rel)));
  hash.update('\0');
}
writeFileSync(join(here, '..', 'durable_kernel_labextension', 'source.sha256'), hash.digest('hex') + '\n');
