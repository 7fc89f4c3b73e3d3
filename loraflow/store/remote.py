"""Artifact folders at an fsspec URL (`run.output_dir: s3://bucket/prefix`, `gs://...`).

Stages read and write local files (datasets, safetensors, Trainer checkpoints), so with a URL each
machine works in a local mirror, `<cache_dir>/mirror/<scheme>/<bucket/prefix>`, and every finished
stage folder is uploaded to `<url>/<stage>/<fingerprint>/`, its manifest last: a folder whose
manifest is there is complete. A worker that gets a cached stage from the shared result storage
downloads the folder into its own mirror and checks it against the manifest before using it.
Credentials and endpoints come from the storage library's usual settings (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible servers, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from loraflow.store.artifacts import MANIFEST, default_cache_dir, verify


def is_url(location: str | None) -> bool:
    return bool(location) and "://" in str(location) and not str(location).startswith("file://")


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        scheme = url.split("://")[0]
        hint = "pip install 'loraflow[s3]'" if scheme in ("s3", "s3a") else f"install the fsspec package for {scheme}://"
        raise ValueError(f"run.output_dir '{url}': no filesystem for {scheme}:// ({err}); {hint}") from None


def local_path(location: str) -> Path:
    """A folder given as a path or a file:// URL, made absolute."""
    return Path(location.removeprefix("file://")).expanduser().resolve()


def local_root(output_dir: str, cache_dir: str | None) -> Path:
    """Where stages write: `output_dir` itself, or this machine's mirror of a URL."""
    if not is_url(output_dir):
        return local_path(output_dir)
    scheme, rest = output_dir.rstrip("/").split("://", 1)
    return default_cache_dir(cache_dir) / "mirror" / scheme / rest


def remote_folder(output_dir: str, stage: str, key: str) -> str:
    return f"{output_dir.rstrip('/')}/{stage}/{key}"


def check_writable(output_dir: str) -> None:
    """Write and delete a probe object, so a wrong bucket or credentials fail before any stage runs."""
    fs, root = _fs(output_dir)
    probe = f"{root.rstrip('/')}/.write-test-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as err:  # noqa: BLE001 - any storage error means the same thing to the user
        raise PermissionError(
            f"run.output_dir '{output_dir}' is not writable ({type(err).__name__}: {err}): create the bucket "
            "or fix the credentials (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)"
        ) from None


def upload(folder: Path, url: str) -> None:
    """Copy a finished stage folder to `url`, the manifest last (it marks the remote copy complete)."""
    fs, root = _fs(url)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for f in sorted(files, key=lambda p: p.name == MANIFEST):
        fs.put_file(str(f), f"{root}/{f.relative_to(folder).as_posix()}")


def download(url: str, folder: Path) -> str | None:
    """Fetch a complete remote stage folder into `folder`: the files its manifest lists, each of them inside the
    folder (a listed or stored name with `..` could otherwise write anywhere); None on success, else what is wrong."""
    fs, root = _fs(url)
    if not fs.exists(f"{root}/{MANIFEST}"):
        return f"{url} has no {MANIFEST} (missing or not completely uploaded)"
    tmp = folder.with_name(f".{folder.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        fs.get_file(f"{root}/{MANIFEST}", str(tmp / MANIFEST))
        try:
            listed = json.loads((tmp / MANIFEST).read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"download of {url}: its {MANIFEST} is not readable"
        inside = tmp.resolve()
        for rel in listed:  # only what the manifest lists, and only inside the folder
            target = (tmp / rel).resolve()
            if Path(rel).is_absolute() or ".." in Path(rel).parts or inside not in target.parents:
                return f"download of {url}: {MANIFEST} lists {rel!r}, a path outside the stage folder: refused"
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{Path(rel).as_posix()}", str(target))
        problem = verify(tmp)
        if problem is not None:
            return f"download of {url}: {problem}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
