"""Where the stage results live: Prefect result storage that several workers can share.

A stage's result is a small JSON handle; the heavy artifacts sit in `run.output_dir`. Prefect keeps
the handles (and the cache records that make a rerun hit) in its result storage. `run.result_storage`
points that at a folder or an fsspec URL (s3://..., gs://...): Prefect only accepts storage saved as a
block, so we save one per location, named after it, and refer to it by slug.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from loraflow.store.remote import is_url, local_path


def result_storage_slug(location: str) -> str:
    """Save (or update) a storage block for `location` and return its slug, e.g. 'local-file-system/loraflow-…'."""
    if is_url(location):
        from prefect.filesystems import RemoteFileSystem

        block, basepath = RemoteFileSystem, location.rstrip("/")
    else:
        from prefect.filesystems import LocalFileSystem

        folder = local_path(location)
        folder.mkdir(parents=True, exist_ok=True)
        block, basepath = LocalFileSystem, str(folder)
    name = "loraflow-results-" + hashlib.sha256(basepath.encode()).hexdigest()[:10]
    block(basepath=basepath).save(name, overwrite=True)
    return f"{block.get_block_type_slug()}/{name}"


def lock_folder(output_dir: str, result_storage: str | None, cache_dir: Path) -> Path:
    """Stage locks sit beside a local (or mounted) output folder, so every machine writing there shares them; with
    a URL output_dir, next to local results (workers sharing that folder share the locks), else in this machine's
    cache."""
    if not is_url(output_dir):
        return local_path(output_dir) / ".locks"
    if result_storage and not is_url(result_storage):
        return local_path(result_storage) / ".locks"
    return cache_dir / "locks"
