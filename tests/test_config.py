"""Config tree: presets load, overrides apply, bad input fails early with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow.cli.main import main
from loraflow.config import ConfigError, PipelineConfig, build_config, load_config, parse_value

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_preset_validates(path, capsys):
    assert main(["validate", str(path), "--config-only"]) == 0  # the GPU preset's hub ids are out of reach here
    assert "ok:" in capsys.readouterr().out
    load_config(path)


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(PipelineConfig)


def test_overrides_use_dotted_keys_and_yaml_values():
    cfg = load_config(None, ["train.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]", "train.bf16=false"])
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.bf16 is False
    assert parse_value("3") == 3 and parse_value("abc") == "abc"


def test_an_override_of_a_text_field_stays_the_text_typed():
    # YAML would read 'Question: {input}' as a mapping and '1.0' as a float
    cfg = load_config(None, ["prompt.template=Question: {input}", "model.revision=1.0", "data.revision=null",
                             "lora.target_modules=all-linear", "run.refresh=[train]"])
    assert cfg.prompt.template == "Question: {input}" and cfg.model.revision == "1.0" and cfg.data.revision is None
    assert cfg.lora.target_modules == "all-linear" and cfg.run.refresh == ["train"]
    assert load_config(None, ['prompt.template="Read:\\n{input}"']).prompt.template == "Read:\n{input}"  # YAML-quoted


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learnig_rate' \(did you mean 'learning_rate'\?\)"):
        load_config(None, ["train.learnig_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        build_config({"trian": {}})


def test_bad_values_name_the_field_and_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        build_config({"data": {"test_size": 1.5}, "quantization": {"mode": "int3"}})
    msg = str(err.value)
    assert "data.test_size" in msg and "quantization.mode" in msg and "\n" not in msg


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="max_target_length .* must be below prompt.max_length"):
        build_config({"prompt": {"max_length": 64, "max_target_length": 64}})
    with pytest.raises(ConfigError, match="load_best_model_at_end needs train.eval_steps"):
        build_config({"train": {"load_best_model_at_end": True}})


def test_cli_reports_bad_config_in_one_line_and_exits_nonzero(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'max_steps'" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_validate_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from loraflow.cli.main import main; main(['validate', '--config-only']); import flows.finetune; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_a_partial_config_is_laid_over_the_deployment_config():
    from loraflow.config import PipelineConfig, over_defaults

    base = build_config({"data": {"source": "x.jsonl", "input_column": "text"},
                         "train": {"max_steps": 4, "learning_rate": 1e-2}}).model_dump(mode="json")
    partial = PipelineConfig.model_validate({"train": {"max_steps": 2}})  # what Prefect validates `--params` into
    merged = over_defaults(partial, base)
    assert (merged.train.max_steps, merged.train.learning_rate, merged.data.source) == (2, 1e-2, "x.jsonl")
    assert merged.data.input_column == "text"
    assert over_defaults(partial, None) is partial


@pytest.mark.parametrize("override, error", [
    ("run.mlflow_tracking_uri=http://ana:s3cret@mlflow.internal:5000",
     "run.mlflow_tracking_uri holds a password (user:password@): a run's settings are shown in the UI"),
    ("run.output_dir=https://ana:s3cret@files.internal/runs", "run.output_dir holds a password"),
    ("run.name=../../etc", "run.name '../../etc' names files and folders, so it must be a slug"),
    ("run.name=a/b", "must be a slug (letters, digits, '.', '_', '-'; no '/' or '..'), e.g. my-run"),
])
def test_settings_that_would_leak_a_password_or_escape_a_folder_fail_in_one_line(override, error, capsys):
    """(Before: accepted, and the password reached MLflow params, the flow log, the UI's run parameters.)"""
    from loraflow.cli.main import main

    assert main(["validate", "--config-only", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and error in err and "s3cret" not in err


def test_a_password_in_mlflow_tracking_uri_from_the_environment_never_reaches_the_published_link():
    from loraflow.config import redact
    from loraflow.ops.tracking import Tracker

    assert redact("http://ana:s3cret@mlflow.internal:5000/x") == "http://ana:***@mlflow.internal:5000/x"
    assert redact("s3://bucket/runs") == "s3://bucket/runs"
    tracker = Tracker.__new__(Tracker)  # no server: only what the link artifact and the log would show
    tracker.uri, tracker.run_id, tracker.experiment_id = "http://ana:s3cret@mlflow.internal:5000", "r1", "7"
    assert tracker.url == "http://ana:***@mlflow.internal:5000/#/experiments/7/runs/r1"


def _deployment(**run) -> PipelineConfig:
    return build_config({"data": {"source": "/srv/data/incoming"}, "run": {"output_dir": "/srv/runs", **run}})


@pytest.mark.parametrize("overrides, error", [
    ({"model": {"trust_remote_code": True}}, "cfg.model.trust_remote_code: a run of this deployment may not set it"),
    ({"model": {"allow_pickle_weights": True}}, "cfg.model.allow_pickle_weights: a run of this deployment may not set it"),
    ({"run": {"output_dir": "/tmp/elsewhere"}}, "cfg.run.output_dir: a run of this deployment may not set it"),
    ({"promotion": {"margin": -1.0}}, "cfg.promotion.margin: a run of this deployment may not set it"),
    ({"train": {"extra_args": {"max_grad_norm": 0.5}}}, "cfg.train.extra_args: a run of this deployment may not set it"),
    ({"run": {"run_may_set": ["*"]}}, "cfg.run.run_may_set: a run of this deployment may not set it"),
    ({"data": {"source": "/etc"}}, "cfg.data.source: '/etc' is outside the places this deployment lets a run read from "
                                   "(run.source_roots: none)"),
])
def test_a_deployment_run_cannot_widen_its_own_privileges(overrides, error):
    """(Before: a run's `cfg` could set any field, e.g. trust_remote_code on a model repo of its choosing.)"""
    from loraflow.config import check_run_overrides

    with pytest.raises(ConfigError) as raised:
        check_run_overrides(overrides, _deployment())
    assert str(raised.value).startswith(error) and "\n" not in str(raised.value)


def test_what_a_deployment_lets_its_runs_set_is_the_deployments_say():
    from loraflow.config import check_run_overrides

    check_run_overrides({"train": {"max_steps": 5, "learning_rate": 1e-4}, "lora": {"r": 4}}, _deployment())
    check_run_overrides({"run": {"output_dir": "/srv/runs"}}, _deployment())  # its own value, passed back
    roots = _deployment(source_roots=["/srv/data", "HuggingFaceTB/*"])
    check_run_overrides({"data": {"source": "/srv/data/new"}, "model": {"name_or_path": "HuggingFaceTB/SmolLM2-360M"}}, roots)
    with pytest.raises(ConfigError, match=r"^cfg.data.source: '/srv/data/../secrets' is outside"):
        check_run_overrides({"data": {"source": "/srv/data/../secrets"}}, roots)
    trusting = _deployment(run_may_set=["train.*", "model.trust_remote_code"])
    check_run_overrides({"model": {"trust_remote_code": True}}, trusting)  # named exactly: allowed
    with pytest.raises(ConfigError, match=r"^cfg.train.extra_args: a run"):  # a pattern never covers it
        check_run_overrides({"train": {"extra_args": {"max_grad_norm": 0.5}}}, trusting)


@pytest.mark.parametrize("key, error", [
    ("output_dir", "train.extra_args.output_dir is set by loraflow itself: use its own field"),
    ("hub_token", "train.extra_args.hub_token would carry a secret or publish the model"),
    ("push_to_hub", "train.extra_args.push_to_hub would carry a secret or publish the model"),
])
def test_extra_args_never_override_loraflow_nor_carry_a_secret(key, error, capsys):
    assert main(["validate", "--config-only", "--set", f"train.extra_args={{{key}: x}}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and error in err
