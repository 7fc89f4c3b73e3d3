"""Cache keys cover what determines a stage's output; a miss says what changed."""

from __future__ import annotations

from loraflow.artifacts import Handle
from loraflow.config import PipelineConfig, RunConfig, build_config
from tasks.caching import StageSpec, explain_miss

SPEC = StageSpec("train", ("loraflow.training",), sections=("train",))


def params(cfg: PipelineConfig, fp: str = "abc") -> dict:
    return {"cfg": cfg, "tokenized": Handle(stage="tokenize", path="/x", fingerprint=fp)}


def test_key_depends_on_its_sections_and_upstream_only(tmp_path):
    base = build_config({"run": {"output_dir": str(tmp_path)}})
    key = SPEC.key(None, params(base))
    assert SPEC.key(None, params(base)) == key
    other_eval = base.model_copy(update={"eval": base.eval.model_copy(update={"max_new_tokens": 3})})
    assert SPEC.key(None, params(other_eval)) == key
    other_lr = base.model_copy(update={"train": base.train.model_copy(update={"learning_rate": 1e-5})})
    assert SPEC.key(None, params(other_lr)) != key
    assert SPEC.key(None, params(base, fp="def")) != key
    moved = base.model_copy(update={"run": RunConfig(output_dir=str(tmp_path / "elsewhere"))})
    assert SPEC.key(None, params(moved)) != key


def test_miss_explains_what_changed(tmp_path):
    base = build_config({"run": {"output_dir": str(tmp_path)}})
    assert explain_miss(SPEC, params(base), tmp_path) == "no earlier run in this output folder"
    lr = base.model_copy(update={"train": base.train.model_copy(update={"learning_rate": 1e-5})})
    assert explain_miss(SPEC, params(lr), tmp_path) == "train.learning_rate changed"
    assert explain_miss(SPEC, params(lr, fp="new"), tmp_path) == "upstream tokenized changed"
    assert "same inputs" in explain_miss(SPEC, params(lr, fp="new"), tmp_path)
