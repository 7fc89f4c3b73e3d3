"""Bad inputs not covered beside their stage's tests: each fails early, in one line that names the fix."""

from __future__ import annotations

import sys

import pytest

from loraflow.artifacts import ensure_writable
from loraflow.config import ModelConfig, QuantizationConfig
from loraflow.modeling import ModelError, check_bitsandbytes, load_base
from loraflow.sources import ModelSourceError, resolve_model_dir


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match=r"run.output_dir '.*a-file/runs' is not writable .*--set run.output_dir="):
        ensure_writable(blocker / "runs")
    assert ensure_writable(tmp_path / "new" / "runs").is_dir()


def test_four_bit_without_a_usable_bitsandbytes(monkeypatch, tiny_llama_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when it is absent
    with pytest.raises(ModelError, match=r"quantization.mode=nf4 needs bitsandbytes.*set quantization.mode=none"):
        check_bitsandbytes("nf4")
    with pytest.raises(ModelError, match="quantization.mode=fp4"):
        load_base(tiny_llama_dir, ModelConfig(name_or_path=str(tiny_llama_dir)), QuantizationConfig(mode="fp4"))


def test_pickle_weights_need_an_explicit_opt_in(tmp_path, tiny_llama_dir):
    import shutil

    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="allow_pickle_weights=true"):
        resolve_model_dir(str(folder))
    assert resolve_model_dir(str(folder), allow_pickle=True) == folder.resolve()
    assert ModelConfig().allow_pickle_weights is False and ModelConfig().trust_remote_code is False
