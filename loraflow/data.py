"""The **data** stage: load a source, map its columns, validate, split train/test deterministically.

Output: `<output_dir>/data/<key>/dataset` = a `DatasetDict` (train, test) saved as Arrow with columns
`input` (str), `target` (str: the first reference, used for training), `references` (list[str]) and
any other string columns of the source (so templates can use e.g. `{aspect}`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from loraflow.artifacts import Handle, atomic_dir, file_digest, fingerprint, is_complete, stage_dir, write_json
from loraflow.config import DataConfig, section_dict

log = logging.getLogger("loraflow")
CODE_VERSION = "data-1"
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_PREFIXES = {"train": "train", "test": "test", "validation": "validation", "valid": "validation", "dev": "validation", "val": "validation"}


class DataError(ValueError):
    """A data problem the user can fix; the message names it and the fix."""


def _local_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in FORMATS)
    if not files:
        raise DataError(f"data.source: '{path}' holds no .jsonl/.json/.csv/.parquet files: point it at a data file or folder")
    bad = [p.name for p in files if p.suffix not in FORMATS]
    if bad:
        raise DataError(f"data.source: unsupported file type '{bad[0]}': use .jsonl, .json, .csv or .parquet")
    if len({p.suffix.replace(".jsonl", ".json") for p in files}) > 1:
        raise DataError(f"data.source: '{path}' mixes file types: keep one format per folder")
    return files


def is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or Path(source).suffix in FORMATS


def source_fingerprint(cfg: DataConfig) -> str:
    """Content identity of the source: file bytes for local data, package files for aclsum, id@revision for hub."""
    if cfg.source == "aclsum":
        from loraflow.aclsum import split_files

        return fingerprint([file_digest(p) for p in split_files().values()])
    if is_local(cfg.source):
        path = Path(cfg.source).expanduser()
        if not path.exists():
            raise DataError(f"data.source: '{cfg.source}' does not exist: check the path (relative to {Path.cwd()})")
        return fingerprint([(p.name, file_digest(p)) for p in _local_files(path)])
    return f"{cfg.source}:{cfg.hub_config}@{cfg.revision or 'main'}"


def _check_jsonl(path: Path) -> None:
    """datasets' JSON errors don't say where; find the first bad line ourselves."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {lineno} is not valid JSON ({err.msg}): fix or remove that line") from None


def _split_name(file: Path) -> str | None:
    stem = file.stem.lower()
    for prefix, name in SPLIT_PREFIXES.items():
        if stem == prefix or stem.startswith((prefix + "-", prefix + "_", prefix + ".")):
            return name
    return None


def load_source(cfg: DataConfig):
    """A DatasetDict of the source's splits (one "pool" split when it has none)."""
    import datasets

    if cfg.source == "aclsum":
        from loraflow.aclsum import load_aclsum

        return datasets.DatasetDict(
            {s: datasets.Dataset.from_list(load_aclsum(s, cfg.aclsum_aspect)) for s in ("train", "validation", "test")}
        )
    if is_local(cfg.source):
        path = Path(cfg.source).expanduser()
        if not path.exists():
            raise DataError(f"data.source: '{cfg.source}' does not exist: check the path (relative to {Path.cwd()})")
        files = _local_files(path)
        for f in files:
            if f.suffix == ".jsonl":
                _check_jsonl(f)
        named = {f: _split_name(f) for f in files} if path.is_dir() else {}
        if named and all(named.values()):
            data_files: dict[str, Any] = {}
            for f, split in named.items():
                data_files.setdefault(split, []).append(str(f))
        else:
            data_files = {"pool": [str(f) for f in files]}
        try:
            return datasets.load_dataset(FORMATS[files[0].suffix], data_files=data_files)
        except Exception as err:
            raise DataError(f"data.source: could not read {path} ({type(err).__name__}): check the file format") from None
    try:
        return datasets.load_dataset(cfg.source, cfg.hub_config, revision=cfg.revision)
    except Exception as err:
        raise DataError(
            f"data.source: could not load hub dataset '{cfg.source}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}): "
            "check the id, data.hub_config, your network, or use a local file"
        ) from None


def _normalise(ds, cfg: DataConfig, split: str):
    """Map columns onto input/target/references, drop empty rows; returns (dataset, dropped)."""
    for col in (cfg.input_column, cfg.target_column):
        if col not in ds.column_names:
            which = "input_column" if col == cfg.input_column else "target_column"
            raise DataError(
                f"data.{which}: no column '{col}' in the {split} split: available columns are {', '.join(ds.column_names)}"
            )
    extra = [c for c, f in ds.features.items() if c not in (cfg.input_column, cfg.target_column)
             and getattr(f, "dtype", None) == "string" and c not in ("input", "target", "references")]

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        src, tgt = row[cfg.input_column], row[cfg.target_column]
        if isinstance(src, list) and cfg.join_input_lists:
            src = " ".join(str(s).strip() for s in src)
        refs = [str(t).strip() for t in (tgt if isinstance(tgt, list) else [tgt]) if t is not None and str(t).strip()]
        return {"input": str(src or "").strip(), "target": refs[0] if refs else "", "references": refs,
                **{c: row[c] or "" for c in extra}}

    mapped = ds.map(convert, remove_columns=ds.column_names, desc=f"map columns ({split})")
    kept = mapped.filter(lambda r: bool(r["input"]) and bool(r["target"]))
    return kept, len(mapped) - len(kept)


def _cap(ds, n: int | None, seed: int):
    """Seeded shuffle, then the first n: a deterministic random sample."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def build_splits(cfg: DataConfig) -> tuple[Any, int]:
    import datasets

    source = load_source(cfg)
    if len(source) == 0 or sum(len(s) for s in source.values()) == 0:
        raise DataError(f"data.source: '{cfg.source}' has no rows: check the file or folder")
    dropped = 0
    if cfg.train_split in source and cfg.test_split in source:
        train, d1 = _normalise(source[cfg.train_split], cfg, cfg.train_split)
        test, d2 = _normalise(source[cfg.test_split], cfg, cfg.test_split)
        dropped = d1 + d2
    else:
        pool_name = cfg.train_split if cfg.train_split in source else next(iter(source))
        pool, dropped = _normalise(source[pool_name], cfg, pool_name)
        if len(pool) < 2:
            raise DataError(f"data.source: only {len(pool)} usable example(s): need at least 2 to split train/test")
        parts = pool.train_test_split(test_size=cfg.test_size, seed=cfg.seed)
        train, test = parts["train"], parts["test"]
    for name, ds in (("train", train), ("test", test)):
        if len(ds) == 0:
            raise DataError(f"data: the {name} split is empty after dropping {dropped} empty rows: check data.test_size and the data")
    out = datasets.DatasetDict({"train": _cap(train, cfg.max_train_samples, cfg.seed),
                                "test": _cap(test, cfg.max_eval_samples, cfg.seed)})
    return out, dropped


def prepare_data(cfg: DataConfig, output_dir: str | Path) -> Handle:
    """Load, map, validate and split; returns a handle to the Arrow dataset folder."""
    key = fingerprint(section_dict(cfg), source_fingerprint(cfg), CODE_VERSION)
    final = stage_dir(output_dir, "data", key)
    if not is_complete(final):
        splits, dropped = build_splits(cfg)
        info = {"n_train": len(splits["train"]), "n_test": len(splits["test"]), "dropped_empty": dropped, "source": cfg.source}
        if dropped:
            log.warning("data: dropped %d rows with an empty input or target", dropped)
        with atomic_dir(final, {"stage": "data"}) as tmp:
            splits.save_to_disk(str(tmp / "dataset"))
            write_json(tmp / "info.json", info)
    info = json.loads((final / "info.json").read_text())
    return Handle(stage="data", path=str(final), fingerprint=key, info=info)


def load_split(handle: Handle | str | Path, split: str):
    import datasets

    path = Path(handle.path if isinstance(handle, Handle) else handle)
    return datasets.load_from_disk(str(path / "dataset"))[split]
