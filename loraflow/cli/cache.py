"""`loraflow cache ls|why|gc`: what the stage store holds, why a config would (not) hit, and cleaning up.

    loraflow cache ls  [CONFIG] [--set ...]             stage, key, size, created, last used, made by
    loraflow cache why [CONFIG] [--set ...]             per stage: hit, or the fields that differ
    loraflow cache gc  [CONFIG] (--older-than 7d | --keep-last N) [--dry-run]

The store is `run.output_dir` of the config (its local mirror when that is a URL). `gc` never removes the stages
of either registry's champion (JSON, or the MLflow alias) or of a challenger awaiting approval, with their
evaluations and exports, a folder a live run uses, or a stage a live run holds the lock of. With --older-than it
also collects leftovers no stage owns (scratch folders of dead writers, checkpoints of runs that never finished or
were set aside by a refresh); `ls` lists them too.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from loraflow import store
from loraflow.store.artifacts import default_cache_dir, is_complete, verify
from loraflow.config import ConfigError, PipelineConfig
from loraflow.procs import alive
from loraflow.store.remote import is_url, local_root

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not found:
        raise ConfigError(f"--older-than '{text}' is not an age: use a number and a unit, e.g. 90s, 30m, 12h, 7d or 2w")
    return float(found.group(1)) * UNITS[found.group(2)]


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    size: int
    created: float
    last_used: float
    made_by: dict[str, Any]
    complete: bool
    orphan: str = ""  # what a leftover folder is (`orphans`); "" for a stage folder

    def row(self) -> list[str]:
        who = self.made_by.get("flow_run") or (f"pid {self.made_by['pid']}" if "pid" in self.made_by else "?")
        return [self.stage, self.key, _size(self.size), _when(self.created), _when(self.last_used), who,
                self.orphan or ("" if self.complete else "incomplete")]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "?"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def root(cfg: PipelineConfig) -> Path:
    return local_root(cfg.run.output_dir, cfg.run.cache_dir)


def entries(output_dir: Path) -> list[Entry]:
    """Every stage folder under `output_dir`, with what the store remembers about it (a folder that an older
    loraflow wrote has no record: its times are the folder's)."""
    out = []
    for stage in store.STAGES:
        records = {r["key"]: r for r in store.read_records(output_dir, stage) if "key" in r}
        folders = {p.name: p for p in (output_dir / stage).glob("*") if p.is_dir() and not p.name.startswith(".")
                   and ".work" not in p.name} if (output_dir / stage).is_dir() else {}
        for key, path in sorted(folders.items()):
            record = records.get(key, {})
            mtime = path.stat().st_mtime
            size = _du(path) + (_du(store.work_dir(output_dir, key)) if stage == "train" else 0)
            out.append(Entry(stage, key, path, size, record.get("created", mtime), record.get("last_used", mtime), record.get("made_by", {}),
                             is_complete(path)))
    return out


def why(cfg: PipelineConfig) -> list[tuple[str, str, str]]:
    """(stage, key, 'hit' or why it would run) for each stage of `cfg`, computed without running anything."""
    from loraflow.hardware import resolve

    output_dir = root(cfg)
    rows = []
    for stage, sk in store.chain(resolve(cfg)).items():
        problem = verify(store.folder(output_dir, stage, sk.key))
        if problem is None and not cfg.run.refreshes(stage):
            rows.append((stage, sk.key, "hit"))
        elif cfg.run.refreshes(stage):
            rows.append((stage, sk.key, "run: refresh requested (run.refresh)"))
        else:
            rows.append((stage, sk.key, f"run: {store.explain(output_dir, sk)}"))
    return rows


def _locks(cfg: PipelineConfig):
    """The stage locks of `cfg`'s store, as its runs take them."""
    from loraflow.store.locks import AtomicFileLockManager
    from tasks.storage import lock_folder

    return AtomicFileLockManager(lock_folder(cfg.run.output_dir, cfg.run.result_storage, default_cache_dir(cfg.run.cache_dir)),
                                 cfg.run.lock_stale_seconds)


def _candidates_to_keep(cfg: PipelineConfig) -> list[tuple[object, str]]:
    """(candidate, why) for every candidate whose stages may still be needed: the registry's champion, the MLflow
    alias's (promotion.registry=mlflow), and challengers awaiting a person's approval."""
    from loraflow.ops.registry import Registry, current_champion

    folder = cfg.promotion.registry_dir or (None if is_url(cfg.run.output_dir) else Path(cfg.run.output_dir) / "registry")
    if folder is None:
        return []
    registry = Registry(folder)
    state = registry.read()
    # the champion (`registry.current_champion`: with promotion.registry=mlflow, the alias's), and the JSON pointer's too,
    # which a switch back to the JSON registry would read
    keep = [(state.get(state.champion), f"the registry's champion {state.champion}")]
    if cfg.promotion.registry == "mlflow":
        try:
            current = current_champion(cfg, registry)
        except Exception as err:  # noqa: BLE001 - no MLflow, no way to know what it protects
            raise ConfigError(f"cache gc: the MLflow champion cannot be read ({type(err).__name__}: {err}); start the "
                              "tracking server (promotion.registry=mlflow) before collecting") from None
        keep.append((current, f"the MLflow champion {current.id if current else None}"))
    keep += [(c, f"awaiting approval ({c.id})") for c in state.candidates if c.awaiting()]
    return [(c, why) for c, why in keep if c is not None]


def protected(cfg: PipelineConfig, output_dir: Path) -> dict[tuple[str, str], str]:
    """{(stage, key): why} for what gc must keep: the stages of both registries' champions and of challengers awaiting
    approval (with their evaluations and exports), folders live runs use, and stages a live run has locked."""
    keep: dict[tuple[str, str], str] = {}
    for candidate, why in _candidates_to_keep(cfg):
        for stage, key in (("data", candidate.data_fingerprint), ("tokenize", candidate.test_fingerprint),
                           ("train", candidate.train_fingerprint),
                           ("model", (candidate.model_handle or {}).get("fingerprint"))):
            if key:
                keep.setdefault((stage, key), why)
        # what was computed from its adapter: evaluations, and the exports of those
        evaluated = {r["key"] for r in store.read_records(output_dir, "evaluate")
                     if r.get("parts", {}).get("upstream train") == candidate.train_fingerprint}
        exported = {r["key"] for r in store.read_records(output_dir, "export")
                    if r.get("parts", {}).get("upstream evaluate") in evaluated}
        for stage, keys in (("evaluate", evaluated), ("export", exported)):
            for key in keys:
                keep.setdefault((stage, key), why)
    for where, who in store.live_readers(output_dir).items():
        keep.setdefault(where, who)
    locks = _locks(cfg)
    for entry in entries(output_dir):
        if locks.is_locked(store.prefect_key(entry.stage, entry.key, cfg.run.output_dir)):
            keep[(entry.stage, entry.key)] = "locked by a live run"
    return keep


_LEFTOVER = re.compile(r"^\.(?P<key>[0-9a-f]+)\.(?P<kind>tmp|old|download)-(?P<pid>\d+)-[0-9a-f]+$")


def orphans(cfg: PipelineConfig, output_dir: Path) -> list[Entry]:
    """What no finished stage owns: a writer's scratch (`.KEY.tmp-PID-…`, `.KEY.old-…`, `.KEY.download-…`) whose
    process is gone, checkpoints of a train key that never finished (`KEY.work`, unless a live run holds its lock),
    and checkpoints a refresh set aside (`KEY.work.set-aside-…`)."""
    locks = _locks(cfg)
    found = []
    for stage in store.STAGES:
        folder = output_dir / stage
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if not path.is_dir():
                continue
            leftover = _LEFTOVER.match(path.name)
            if leftover:
                if alive(int(leftover["pid"])):
                    continue  # being written right now
                what = f"orphan: {leftover['kind']} folder of a process that is gone"
            elif stage == "train" and ".work.set-aside-" in path.name:
                what = "orphan: checkpoints set aside by a refresh"
            elif stage == "train" and path.name.endswith(".work"):
                key = path.name[: -len(".work")]
                if is_complete(folder / key) or locks.is_locked(store.prefect_key("train", key, cfg.run.output_dir)):
                    continue
                what = "orphan: checkpoints of a run that did not finish (a rerun of its config resumes from them)"
            else:
                continue
            mtime = max([p.stat().st_mtime for p in path.rglob("*")] + [path.stat().st_mtime])
            found.append(Entry(stage, path.name, path, _du(path), path.stat().st_ctime, mtime, {}, False, what))
    return found


def gc(cfg: PipelineConfig, older_than: float | None = None, keep_last: int | None = None,
       dry_run: bool = False) -> tuple[list[Entry], list[tuple[Entry, str]]]:
    """Remove stage folders (and a train stage's checkpoints) unused for `older_than` seconds, or all but the
    `keep_last` most recently used per stage. Returns (removed, kept because protected)."""
    if (older_than is None) == (keep_last is None):
        raise ConfigError("cache gc: give exactly one of --older-than (e.g. 7d) or --keep-last (e.g. 3)")
    if keep_last is not None and keep_last < 0:
        raise ConfigError(f"--keep-last must be 0 or more (got {keep_last})")
    output_dir = root(cfg)
    keep = protected(cfg, output_dir)
    now, doomed = time.time(), []
    for stage in store.STAGES:
        mine = sorted((e for e in entries(output_dir) if e.stage == stage), key=lambda e: e.last_used, reverse=True)
        doomed += [e for e in mine if now - e.last_used > older_than] if older_than is not None else mine[keep_last:]
    if older_than is not None:  # leftovers go by age alone (with --keep-last they stay: there is no "last" of them)
        doomed += [e for e in orphans(cfg, output_dir) if now - e.last_used > older_than]
    removed, spared = [], []
    for entry in doomed:
        if (entry.stage, entry.key) in keep:
            spared.append((entry, keep[(entry.stage, entry.key)]))
            continue
        removed.append(entry)
        if not dry_run:
            shutil.rmtree(entry.path, ignore_errors=True)
            if entry.orphan:
                continue
            if entry.stage == "train":
                shutil.rmtree(store.work_dir(output_dir, entry.key), ignore_errors=True)
            store.forget(output_dir, entry.stage, entry.key)
    return removed, spared


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def main(command: str, cfg: PipelineConfig, older_than: str | None, keep_last: int | None, dry_run: bool) -> int:
    output_dir = root(cfg)
    if command == "ls":
        found = entries(output_dir) + orphans(cfg, output_dir)
        print(table([e.row() for e in found], ["stage", "key", "size", "created", "last used", "made by", ""])
              if found else f"no stage folders in {output_dir}")
        return 0
    if command == "why":
        print(table([list(r) for r in why(cfg)], ["stage", "key", "status"]))
        return 0
    removed, spared = gc(cfg, parse_age(older_than) if older_than is not None else None, keep_last, dry_run)
    verb = "would remove" if dry_run else "removed"
    for entry in removed:
        what = f", {entry.orphan}" if entry.orphan else ""
        print(f"{verb} {entry.stage} {entry.key} ({_size(entry.size)}, last used {_when(entry.last_used)}{what})")
    for entry, reason in spared:
        print(f"kept {entry.stage} {entry.key}: {reason}")
    print(f"{verb} {len(removed)} stage folder(s), {_size(sum(e.size for e in removed))}")
    return 0
