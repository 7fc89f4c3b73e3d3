"""The **data** stage: load a source, map its columns, validate, split train/validation/test.

The split policy is `loraflow.stages.splits`: the source's own splits, else carved from train by a hash of
each row's cluster key, so a row keeps its split as the data grows. Validation drives every choice
(checkpoints, early stopping, sweep ranking, promotion); test is only read for the final report.

Output folder `<output_dir>/data/<key>/`:
    dataset/        a `DatasetDict` {train, validation, test} saved with `save_to_disk` (Arrow), columns
                    input (str), target (str: the reference training uses),
                    references (list[str]: every reference, what ROUGE scores against),
                    cluster (str: rows with one key share a split and are resampled together),
                    plus the source's other string columns (so templates can use e.g. {aspect}).
    info.json       {n_train, n_validation, n_test, source, dropped, format}: what `run` returns, the Handle's info
    splits.json     where each split came from, e.g. {"train": "train", "validation": "train (hash < 0.1)"}
    manifest.json   file checksums, the stage and its key (`store.build`)

The key (`store.data_key`: data config, source content (`sources.source_fingerprint`), code, libraries): editing a local file in place,
upgrading the aclsum package, a hub branch that moved, editing this stage's code or upgrading a
library that shapes its numbers gives a new folder.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import shutil
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from loraflow.config import DataConfig
from loraflow.store.artifacts import Handle, write_json
from loraflow.store.sources import FORMATS, DataError, is_local, local_files
from loraflow.stages.splits import carve, smallest_hash_first

log = logging.getLogger("loraflow")
# Folder files named train*/test*/validation*/dev* are splits ("train-00000-of-00002.parquet" too);
# the prefix must not run on into a letter, so "trainer.jsonl" or "testimonials.csv" are not splits.
_SPLIT_FILE = re.compile(r"^(training|train|testing|test|validation|valid|val|dev)(?![a-z])", re.IGNORECASE)
_CANONICAL = {"training": "train", "testing": "test", "valid": "validation", "val": "validation", "dev": "validation"}
OWN_COLUMNS = ("input", "target", "references", "cluster", "messages")


def _is_network_error(err: BaseException | None) -> bool:
    """Whether `err` or one of its causes is a connection failure or time-out (worth a retry)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, (ConnectionError, TimeoutError)) or any(
            word in type(err).__name__ for word in ("Connect", "Timeout")
        ):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _canonical(split: str) -> str:
    return _CANONICAL.get(split.lower(), split.lower())


def _check_file(path: Path) -> None:
    """Catch empty and corrupt files ourselves: datasets' errors for them don't name the file or line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        empty = pq.read_metadata(path).num_rows == 0
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        empty = len(lines) < (2 if path.suffix == ".csv" else 1)  # a csv needs a header and a row
        whole_json = False
        if path.suffix == ".json" and not empty:  # one JSON document ([{...}, ...]) or JSON lines
            try:
                empty, whole_json = json.loads(text) in ([], {}), True
            except json.JSONDecodeError as err:
                if len(lines) == 1 or lines[0].strip() in ("[", "{"):
                    raise DataError(f"{path}: line {err.lineno} is not valid JSON ({err.msg}): fix the file") from None
        if path.suffix in (".jsonl", ".json") and not whole_json:
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}: line {lineno} is not valid JSON ({err.msg}): fix or remove that line"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object: "
                                    'write one {"column": value, ...} object per line')
    if empty:
        raise DataError(f"data.source: '{path}' has no rows: add examples or remove the file")


def _local_splits(cfg: DataConfig) -> dict[str, list[str]]:
    """data_files for datasets.load_dataset: {split: [file, ...]}; one "pool" when files are not named by split."""
    files = local_files(cfg.source)
    for f in files:
        _check_file(f)
    if len(files) == 1 and Path(cfg.source).expanduser().is_file():
        return {"pool": [str(files[0])]}
    named = {f: _SPLIT_FILE.match(f.stem) for f in files}
    if not any(named.values()):
        return {"pool": [str(f) for f in files]}
    others = [f.name for f, m in named.items() if not m]
    if others:
        raise DataError(f"data.source: folder '{cfg.source}' mixes split files (train*/test*/validation*/dev*) with "
                        f"{', '.join(others)}: rename those to a split name or move them out")
    out: dict[str, list[str]] = {}
    for f, m in named.items():
        out.setdefault(_canonical(m.group(1)), []).append(str(f))
    return out


def load_source(cfg: DataConfig, cache_dir: str | Path | None = None):
    """The source as a DatasetDict of its splits (a single "pool" split when it has none).

    Local files are parsed into `cache_dir` (the stage's scratch folder) so no stray cache is left behind.
    """
    import datasets

    if cfg.source == "aclsum":
        from loraflow.store.aclsum import AclsumError, load_aclsum

        try:
            splits = {s: load_aclsum(s, cfg.aclsum_aspect) for s in ("train", "validation", "test")}
        except AclsumError as err:
            raise DataError(str(err)) from None
        return datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in splits.items()})
    if is_local(cfg.source):
        data_files = _local_splits(cfg)
        builder = FORMATS[Path(next(iter(data_files.values()))[0]).suffix]
        # Each split on its own: a train file with one target string per row and a test file with a list of
        # references (the usual shape) have different types, which one load would refuse. `_normalise` makes
        # both a list of references.
        # `Dataset.from_json` (csv, parquet) reads with the same builder as `load_dataset` without resolving a module
        # for it first, and without the download-count request `load_dataset` sends the hub for a packaged builder
        # (a network round trip, per split, on the way to the first step, to read a local file).
        read = getattr(datasets.Dataset, f"from_{builder}")
        out = {}
        for split, files in data_files.items():
            try:
                out[split] = read(files, split=split, cache_dir=str(cache_dir) if cache_dir else None)
            except Exception as err:  # e.g. a column that is a string in one row and a list in another
                raise DataError(f"data.source: could not read the {split} split of '{cfg.source}' as {builder} "
                                f"({type(err).__name__}: {_first_line(err)}): check that every row of "
                                f"{', '.join(Path(f).name for f in files)} has the same columns and types") from None
        return datasets.DatasetDict(out)
    from loraflow.store.sources import hub_commit

    try:  # the commit the key holds, so a branch that moves after keying cannot change the rows
        return datasets.load_dataset(cfg.source, cfg.hub_config, revision=hub_commit(cfg.source, cfg.revision, "dataset"))
    except Exception as err:
        error = DataError(f"data.source: could not load hub dataset '{cfg.source}' ({type(err).__name__}: "
                        f"{_first_line(err)}); there is no local file or folder of that name either: check the id, "
                        "data.hub_config, your network/HF_TOKEN, or point data.source at a local file")
        error.transient = _is_network_error(err)
        raise error from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _kind(feature: Any) -> str:
    """'text' (string), 'scalar' (number/bool, used via str), 'list' (of strings), or 'other'."""
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return "text"
    if type(feature).__name__ in ("List", "LargeList", "Sequence"):
        inner = getattr(feature, "feature", None)
        return "list" if getattr(inner, "dtype", None) in ("string", "large_string", "null") else "other"
    return "scalar" if dtype is not None else "other"


def _missing_column(field: str, col: str, ds, split: str, source: str) -> DataError:
    close = difflib.get_close_matches(col, ds.column_names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return DataError(f"data.{field}: no column '{col}' in the {split} split of '{source}': "
                     f"{hint}available columns are {', '.join(ds.column_names)}")


def _normalise(ds, cfg: DataConfig, split: str):
    """Map columns onto input/target/references and drop empty rows; returns (dataset, n_dropped)."""
    if cfg.cluster_column is not None and cfg.cluster_column not in ds.column_names:
        raise _missing_column("cluster_column", cfg.cluster_column, ds, split, cfg.source)
    if cfg.format == "messages":
        return _normalise_messages(ds, cfg, split), 0
    for field, col in (("input_column", cfg.input_column), ("target_column", cfg.target_column)):
        if col not in ds.column_names:
            raise _missing_column(field, col, ds, split, cfg.source)
        kind = _kind(ds.features[col])
        if kind == "other":
            raise DataError(f"data.{field}: column '{col}' holds {ds.features[col]}, not text or a list of "
                            f"strings: choose a text column (available: {', '.join(ds.column_names)})")
        if kind == "list" and col == cfg.input_column and not cfg.join_input_lists:
            raise DataError(f"data.input_column: column '{col}' holds lists of strings: set data.join_input_lists=true "
                            "to join them with spaces, or choose a text column")
    extra = [c for c, f in ds.features.items()
             if _kind(f) == "text" and c not in (cfg.input_column, cfg.target_column, *OWN_COLUMNS)]

    def convert(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input": [], "target": [], "references": [], "cluster": [], **{c: [] for c in extra}}
        for i, (src, tgt) in enumerate(zip(batch[cfg.input_column], batch[cfg.target_column])):
            if isinstance(src, list):
                src = " ".join(str(s).strip() for s in src if s is not None)
            refs = [str(t).strip() for t in (tgt if isinstance(tgt, list) else [tgt]) if t is not None]
            refs = [r for r in refs if r]
            out["input"].append("" if src is None else str(src).strip())
            out["target"].append(refs[0] if refs else "")
            out["references"].append(refs)
            key = batch[cfg.cluster_column][i] if cfg.cluster_column else out["input"][-1]
            out["cluster"].append("" if key is None else str(key))
            for c in extra:
                out[c].append(batch[c][i] or "")
        return out

    mapped = ds.map(convert, batched=True, remove_columns=ds.column_names, desc=f"data: map columns ({split})")
    kept = mapped.filter(lambda b: [bool(x and y) for x, y in zip(b["input"], b["target"])], batched=True)
    if len(kept) == 0:
        raise DataError(f"data: all {len(mapped)} rows of the {split} split have an empty '{cfg.input_column}' or "
                        f"'{cfg.target_column}': check data.input_column / data.target_column and the data")
    return kept, len(mapped) - len(kept)


def _normalise_messages(ds, cfg: DataConfig, split: str):
    """A conversation per row (`loraflow.stages.chat`): messages (JSON), input (the history as text), target (the last
    answer), references (it, and the references column's), cluster."""
    from loraflow.stages.chat import ChatError, conversation, history_text

    for field, col in (("messages_column", cfg.messages_column), ("references_column", cfg.references_column)):
        if col is not None and col not in ds.column_names:
            raise _missing_column(field, col, ds, split, cfg.source)
    extra = [c for c, f in ds.features.items() if _kind(f) == "text" and c not in (cfg.messages_column, *OWN_COLUMNS)]

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input": [], "target": [], "references": [], "cluster": [], "messages": [],
                                **{c: [] for c in extra}}
        for j, (raw, index) in enumerate(zip(batch[cfg.messages_column], indices)):
            try:
                messages = conversation(raw, cfg.role_map, f"row {index} of the {split} split")
            except ChatError as err:
                raise DataError(str(err)) from None
            extra_refs = batch[cfg.references_column][j] if cfg.references_column else None
            refs = [messages[-1]["content"].strip()] + [str(r).strip() for r in (
                extra_refs if isinstance(extra_refs, list) else [extra_refs]) if r is not None and str(r).strip()]
            out["input"].append(history_text(messages))
            out["target"].append(refs[0])
            out["references"].append(refs)
            out["messages"].append(json.dumps(messages, ensure_ascii=False))
            key = batch[cfg.cluster_column][j] if cfg.cluster_column else out["input"][-1]
            out["cluster"].append("" if key is None else str(key))
            for c in extra:
                out[c].append(batch[c][j] or "")
        return out

    import datasets

    text = datasets.Value("string")
    # Explicit: a same-named source column's feature (datasets may read messages as Json) must not be reused.
    features = datasets.Features({"input": text, "target": text, "references": datasets.List(text), "cluster": text,
                                  "messages": text, **{c: text for c in extra}})
    return ds.map(convert, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
                  desc=f"data: read conversations ({split})")


def _find_split(names: list[str], wanted: str) -> str | None:
    """The source split matching a configured name; 'dev'/'val'/'valid' and 'validation' are one name."""
    if wanted in names:
        return wanted
    return next((n for n in names if _canonical(n) == _canonical(wanted)), None)


def _cap(ds, n: int | None, seed: int):
    """A seeded random sample: shuffle with `seed`, keep the first n (files are often sorted, the head is biased).

    Same seed, same rows; a smaller cap is a prefix of a larger one.
    """
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def _carve(pool, size: float | int, seed: int, salt: str, what: str, field: str, source: str):
    """(rest, carved) of `pool` by `splits.carve`; a one-line error when nothing is carved."""
    if len(set(pool["cluster"])) < 2:
        raise DataError(f"data: only {len(pool)} usable example{'s' * (len(pool) != 1)} in '{source}' "
                        f"({len(set(pool['cluster']))} distinct inputs): need at least 2 to hold out {what}")
    chosen = carve(pool["cluster"], size, seed, salt)
    carved = [i for i, c in enumerate(chosen) if c]
    if not carved or len(carved) == len(pool):
        raise DataError(f"data.{field}={size} carves {len(carved)} of the {len(pool)} usable rows of '{source}' "
                        f"into {what}: change data.{field} (a fraction, or a count of rows such as 20)")
    return pool.select([i for i, c in enumerate(chosen) if not c]), pool.select(carved)


def _explode_references(ds):
    """One training row per reference (data.multi_reference=all)."""
    def explode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in batch}
        for i, refs in enumerate(batch["references"]):
            for ref in refs:
                for k in batch:
                    out[k].append(ref if k == "target" else batch[k][i])
        return out

    return ds.map(explode, batched=True, desc="data: one row per reference")


def build_splits(cfg: DataConfig, cache_dir: str | Path | None = None) -> tuple[Any, int, dict[str, str]]:
    """(DatasetDict {train, validation, test}, rows dropped as empty, where each split came from)."""
    import datasets

    source = load_source(cfg, cache_dir)
    names = list(source)
    for name in names:
        if len(source[name]) == 0:
            raise DataError(f"data.source: the {name} split of '{cfg.source}' has no rows: add examples or remove it")
    train_name = _find_split(names, cfg.train_split)
    if train_name is None and len(names) == 1:
        train_name = names[0]  # a single pool (one file, or a hub dataset with one split): carve the others
    if train_name is None:
        raise DataError(f"data.train_split: '{cfg.source}' has no split '{cfg.train_split}'; its splits are "
                        f"{', '.join(names)}: set data.train_split (and data.test_split) to one of them")
    test_name, val_name = _find_split(names, cfg.test_split), _find_split(names, cfg.validation_split)
    test_name = None if test_name == train_name else test_name
    val_name = None if val_name in (train_name, test_name) else val_name
    train, dropped = _normalise(source[train_name], cfg, train_name)
    origin = {"train": train_name}
    parts: dict[str, Any] = {}
    for split, name, size, field in (("test", test_name, cfg.test_size, "test_size"),
                                     ("validation", val_name, cfg.validation_size, "validation_size")):
        if name is not None:
            parts[split], n_dropped = _normalise(source[name], cfg, name)
            dropped += n_dropped
            origin[split] = name
        else:
            train, parts[split] = _carve(train, size, cfg.seed, split, f"a {split} split", field, cfg.source)
            rule = f"hash < {size:g}" if isinstance(size, float) else f"{size} smallest hashes"
            origin[split] = f"{train_name} ({rule}, seed {cfg.seed}, by {cfg.cluster_column or 'input'})"
    validation = parts["validation"]
    if cfg.max_validation_samples is not None and len(validation) > cfg.max_validation_samples:
        order = smallest_hash_first(validation["cluster"], cfg.seed, "validation-cap")
        validation = validation.select(sorted(order[: cfg.max_validation_samples]))
        if val_name is None:  # carved rows beyond the cap go back to training, not to waste
            rest = sorted(order[cfg.max_validation_samples :])
            train = datasets.concatenate_datasets([train, parts["validation"].select(rest)])
    if cfg.multi_reference == "all":
        train = _explode_references(train)
    out = datasets.DatasetDict({"train": _cap(train, cfg.max_train_samples, cfg.seed), "validation": validation,
                                "test": _cap(parts["test"], cfg.max_eval_samples, cfg.seed)})
    return out, dropped, origin


# Splits built ahead (`reserve_ahead`, `build_ahead`), by the data config as JSON: the result (or error) to come,
# and the folder it is built in.
_AHEAD: dict[str, tuple[Future, Path]] = {}
_AHEAD_LOCK = threading.Lock()
_AHEAD_FILE = "ahead.json"  # written last: {config, dropped, origin} beside `dataset/`, once the splits are saved


def reserve_ahead(cfg: DataConfig) -> Path | None:
    """A private folder outside the workspace (`tempfile.mkdtemp`) that `build_ahead` will build `cfg`'s splits in,
    for a local source (a file, a folder, aclsum); None for a hub source (the pre-flight downloads it) or when one
    is reserved already. The training process's pre-flight reads them there (`splits_ahead`), and the data stage's
    `run` of an equal config in this process saves them instead of building them again."""
    if not (cfg.source == "aclsum" or is_local(cfg.source)):
        return None
    key = cfg.model_dump_json()
    with _AHEAD_LOCK:
        if key in _AHEAD:
            return None
        folder = Path(tempfile.mkdtemp(prefix="loraflow-data-ahead-"))
        _AHEAD[key] = (Future(), folder)
    return folder


def build_ahead(cfg: DataConfig) -> None:
    """Build the splits of a config `reserve_ahead` reserved a folder for, and save them there for the pre-flight.
    The flow calls it on an idle core while the training process imports torch; like the pre-flight, it writes
    nothing to the workspace. An error is not raised here: `run` builds again and raises it as the stage's."""
    with _AHEAD_LOCK:
        entry = _AHEAD.get(cfg.model_dump_json())
    if entry is None or not entry[0].set_running_or_notify_cancel():
        return
    future, folder = entry
    try:
        splits, dropped, origin = build_splits(cfg, folder / "scratch")
        splits.save_to_disk(str(folder / "dataset"))
        done = folder / f"{_AHEAD_FILE}.partial"
        write_json(done, {"config": cfg.model_dump_json(), "dropped": dropped, "origin": origin})
        done.replace(folder / _AHEAD_FILE)
        future.set_result((splits, dropped, origin))
    except BaseException as err:  # noqa: BLE001 - `run` builds again and raises it as the stage's error
        future.set_exception(err)


def splits_ahead(cfg: DataConfig, folder: str | Path | None) -> tuple[Any, int, dict[str, str]] | None:
    """`build_splits`' answer for `cfg` where `build_ahead` has finished it in `folder` (another process's), else
    None: the caller builds them itself, never waits."""
    import datasets

    if folder is None or not (Path(folder) / _AHEAD_FILE).is_file():
        return None
    done = json.loads((Path(folder) / _AHEAD_FILE).read_text())
    if done["config"] != cfg.model_dump_json():
        return None
    return datasets.load_from_disk(str(Path(folder) / "dataset")), done["dropped"], done["origin"]


def drop_ahead(cfg: DataConfig) -> None:
    """Forget splits built ahead that no `run` took (a cache hit, a failed pre-flight), and remove their folder."""
    with _AHEAD_LOCK:
        entry = _AHEAD.pop(cfg.model_dump_json(), None)
    if entry is not None:
        entry[0].cancel()
        shutil.rmtree(entry[1], ignore_errors=True)


def _take_ahead(cfg: DataConfig) -> tuple[tuple[Any, int, dict[str, str]], Path] | None:
    """What `build_ahead` built for `cfg` (waiting for it to finish), and its folder; None when nothing is built
    ahead, or its build failed or never began."""
    with _AHEAD_LOCK:
        entry = _AHEAD.pop(cfg.model_dump_json(), None)
    if entry is None:
        return None
    future, folder = entry
    if not future.cancel():  # cancelled: reserved, never begun (no thread built it): the caller builds
        try:
            return future.result(), folder
        except Exception:  # noqa: BLE001 - built again by the caller, which raises the error as the stage's
            pass
    shutil.rmtree(folder, ignore_errors=True)
    return None


def run(cfg: DataConfig, out: Path) -> dict[str, Any]:
    """Load, map, validate and split the source into `out/dataset`; returns the summary (`info.json`). Splits
    `build_ahead` built for this config are saved as they are, not built again."""
    ahead = _take_ahead(cfg)
    if ahead is None:
        scratch = out / "scratch"
        splits, dropped, origin = build_splits(cfg, scratch)
    else:
        (splits, dropped, origin), scratch = ahead
        log.info("data: the splits built while the pre-flight ran")
    if dropped:
        log.warning("data: dropped %d rows with an empty input or target", dropped)
    info = {"n_train": len(splits["train"]), "n_validation": len(splits["validation"]),
            "n_test": len(splits["test"]), "source": cfg.source, "dropped": dropped, "format": cfg.format}
    splits.save_to_disk(str(out / "dataset"))
    write_json(out / "splits.json", origin)
    del splits, ahead  # memory-map files in scratch/
    shutil.rmtree(scratch, ignore_errors=True)  # parsed copies of local files: not part of the artifact
    log.info("data: %d train / %d validation / %d test rows", info["n_train"], info["n_validation"], info["n_test"])
    return info


def load_split(handle: Handle | str | Path, split: str):
    """One split ("train", "validation" or "test") of a data stage folder, as a `datasets.Dataset`."""
    import datasets

    path = Path(handle.path if isinstance(handle, Handle) else handle)
    folder = path if (path / "dataset_dict.json").is_file() else path / "dataset"
    if not (folder / "dataset_dict.json").is_file():
        raise DataError(f"no data stage output at '{path}': run the data stage first")
    splits = datasets.load_from_disk(str(folder))
    if split not in splits:
        raise DataError(f"the data stage at '{path}' has no split '{split}': use one of {', '.join(splits)}")
    return splits[split]
