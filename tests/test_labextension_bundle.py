"""The prebuilt JupyterLab extension (durable_kernel_labextension/, shipped in the wheel) is built from
the TypeScript source in labextension/ as committed: the build writes the SHA-256 of that source into
the bundle (labextension/source-hash.mjs), and this recomputes it.  Fails when src/, style/,
package.json or tsconfig.json changed without a rebuild (README, JupyterLab: the commands)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "labextension"
BUNDLE = ROOT / "durable_kernel_labextension"
REBUILD = "cd labextension && npm ci && PYTHON=python npm run build (README, JupyterLab)"


def source_hash() -> str:
    """As labextension/source-hash.mjs computes it."""
    files = []
    for top in ("package.json", "tsconfig.json", "src", "style"):
        path = SOURCE / top
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for rel in sorted(p.relative_to(SOURCE).as_posix() for p in files):
        digest.update(rel.encode() + b"\0")
        digest.update((SOURCE / rel).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def test_bundle_matches_the_typescript_source():
    built = (BUNDLE / "source.sha256").read_text().strip()
    assert built == source_hash(), f"labextension/ changed since the bundle was built; rebuild it: {REBUILD}"


def test_bundle_is_a_small_production_build():
    meta = json.loads((BUNDLE / "package.json").read_text())
    assert meta["name"] == json.loads((SOURCE / "package.json").read_text())["name"] == "durable-kernel"
    entry = meta["jupyterlab"]["_build"]["load"]
    assert (BUNDLE / entry).is_file(), entry
    files = [p for p in BUNDLE.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix == ".map"], "source maps in the bundle: build without --development"
    total = sum(p.stat().st_size for p in files)
    assert total < 200_000, f"the bundle is {total} bytes: shared JupyterLab packages bundled?"


def test_stale_chunks_are_not_shipped():
    """A rebuild cleans static/ first (npm run clean), so every chunk there is reachable from the entry."""
    static = BUNDLE / "static"
    entry = next(static.glob("remoteEntry.*.js")).read_text()
    for chunk in static.glob("[0-9]*.js"):
        assert chunk.name.split(".")[1] in entry, f"{chunk.name} is not loaded by the entry: a leftover build"
