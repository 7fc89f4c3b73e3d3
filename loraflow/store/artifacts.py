"""Handles, fingerprints and atomic artifact folders shared by every stage.

A stage writes its artifacts into `<output_dir>/<stage>/<fingerprint>/` and returns a small `Handle`
(path + fingerprint + a few numbers). Folders are written under a temporary name and renamed into
place with a `manifest.json`, so a stage killed halfway leaves nothing a later run would accept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, Field

MANIFEST = "manifest.json"


class Handle(BaseModel):
    """What a stage returns: where its output lives and what determines it. Small and JSON-serialisable."""

    stage: str = Field(description="Stage name (data, tokenize, model, train, evaluate).")
    path: str = Field(description="Absolute path of the stage's artifact folder.")
    fingerprint: str = Field(description="Hash of everything that determines the output.")
    info: dict[str, Any] = Field(default_factory=dict, description="A few numbers worth logging.")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dicts are key-sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, or of every file below a folder (names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()[:16]


_DIGESTS: dict[tuple, str] = {}
DISK_MEMO_BYTES = 1 << 20  # files at least this big have their digest remembered on disk, per machine


def content_digest(path: str | Path) -> str:
    """`file_digest` for cache keys, remembered per (path, size, mtime, inode): in this process, and for
    big files (model weights: a 70B folder is ~140 GB) on disk under `<cache>/digests`, so a machine
    hashes a big input once, not in every process that computes a key. An edit in place changes the
    mtime and is seen; `verify` never uses this and always re-reads the bytes."""
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return fingerprint([(str(f.relative_to(path)), content_digest(f)) for f in files])
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        memo = default_cache_dir(None) / "digests" / f"{fingerprint(key)}.txt" if st.st_size >= DISK_MEMO_BYTES else None
        try:
            _DIGESTS[key] = memo.read_text().strip() if memo is not None else file_digest(path)
        except OSError:
            _DIGESTS[key] = file_digest(path)
            try:
                memo.parent.mkdir(parents=True, exist_ok=True)
                tmp = memo.with_name(f".{memo.name}.{uuid.uuid4().hex[:8]}")
                tmp.write_text(_DIGESTS[key])
                os.replace(tmp, memo)  # whole or absent, for concurrent processes
            except OSError:
                pass  # a read-only cache: hashing again next time is only slower
    return _DIGESTS[key]


def stage_dir(output_dir: str | Path, stage: str, key: str) -> Path:
    return Path(output_dir).expanduser().resolve() / stage / key


def verify(path: str | Path) -> str | None:
    """None if the folder is exactly what its manifest lists (names, sizes, checksums), else the problem."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} is missing or has no readable {MANIFEST}"
    if not isinstance(files, dict) or not all(isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in files.values()):
        return f"{MANIFEST} in {path} has no checksums (written by an older loraflow)"
    for rel, expected in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != expected["size"] or file_digest(f) != expected["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def is_complete(path: str | Path) -> bool:
    """True when a stage folder was renamed into place and still matches its manifest."""
    return verify(path) is None


_COMPLETE: dict[Path, tuple] = {}  # folders `complete_in_process` found whole, with the signature they had


def _signature(path: Path) -> tuple | None:
    """The folder's inode and each file's (name, size, mtime, inode); None if it cannot be read."""
    try:
        files = sorted((str(f.relative_to(path)), f.stat()) for f in path.rglob("*") if f.is_file())
        return path.stat().st_ino, tuple((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in files)
    except OSError:
        return None


def complete_in_process(path: str | Path) -> bool:
    """`is_complete` for a machine cache that one process checks again and again (a converted model folder, a base's
    4-bit copy): its bytes are read once per process, then trusted while every file keeps its size, mtime and inode
    (the same rule as `content_digest`'s). Stage folders use `is_complete`, which always reads."""
    path = Path(path).resolve()
    signature = _signature(path)
    if signature is not None and _COMPLETE.get(path) == signature:
        return True
    if not is_complete(path):
        _COMPLETE.pop(path, None)
        return False
    if signature is not None:
        _COMPLETE[path] = signature
    return True


class Rejected(ValueError):
    """A stage refused its own result (an export that fails its parity gate): nothing is published, and `store.build`
    keeps `report` beside the stage's folder as `<key>.rejected.json`, named at the end of the message."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@contextmanager
def atomic_dir(final: str | Path, meta: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a scratch folder; on success write a manifest and rename it to `final`.

    An existing `final` is replaced (the caller decided to recompute): set aside, the new folder renamed
    into place, then the old one removed, so `final` is missing for no longer than two renames.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # unique per writer
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": file_digest(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps({"files": files, **(meta or {})}, indent=2, default=str))
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_writable(folder: str | Path, field: str = "run.output_dir") -> Path:
    """Create `folder` if needed and prove we can write there, before any work starts."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"{field} '{folder}' is not writable ({err.strerror}): choose another folder, e.g. --set {field}=./runs"
        ) from None
    return folder.resolve()


def default_cache_dir(cache_dir: str | None) -> Path:
    """The shared cache folder: the config's, else $LORAFLOW_CACHE, else ~/.cache/loraflow."""
    root = cache_dir or os.environ.get("LORAFLOW_CACHE") or "~/.cache/loraflow"
    return Path(root).expanduser().resolve()


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
