"""Sweeps: grid expansion, validation before anything runs, ranking; and a real sweep of child flow runs
on the tiny model that shares its cached stages."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import yaml

from loraflow.cli.main import main
from loraflow.config import ConfigError, build_config
from loraflow.ops.sweep import expand_grid, flatten, nest, parse_grid_arg, plan_sweep, rank, ranking_rows, ranking_text
from test_flow_e2e import tiny_config
from tests_support import write_examples

BASE = build_config({})


# --------------------------------------------------------------------------- planning


def test_grid_expands_to_the_cartesian_product_first_key_outermost():
    assert expand_grid({"a": [1, 2], "b": ["x", "y", "z"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
        {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"},
    ]
    assert expand_grid({"a": [1]}) == [{"a": 1}]
    assert expand_grid({}) == []


def test_overrides_may_be_dotted_or_nested():
    flat = flatten({"train": {"learning_rate": 1e-4, "extra_args": {}}, "lora.r": 8})
    assert flat == {"train.learning_rate": 1e-4, "train.extra_args": {}, "lora.r": 8}
    assert nest(flat) == {"train": {"learning_rate": 1e-4, "extra_args": {}}, "lora": {"r": 8}}
    with pytest.raises(ConfigError, match=r"'lora.r' is given twice \(8 and 4\)"):
        flatten({"lora.r": 8, "lora": {"r": 4}})


def test_plan_runs_the_grid_then_the_explicit_runs_each_validated_over_the_base():
    children = plan_sweep(BASE, {"train.learning_rate": [1e-4, 2e-4], "lora.r": [4, 8]},
                          [{"lora": {"r": 16, "alpha": 8}}, {}])
    assert [c.name for c in children] == [
        "sweep-lr=0.0001-r=4", "sweep-lr=0.0001-r=8", "sweep-lr=0.0002-r=4", "sweep-lr=0.0002-r=8",
        "sweep-r=16-alpha=8", "sweep-base",
    ]
    assert [c.origin for c in children] == ["grid"] * 4 + ["runs[0]", "runs[1]"]
    last_grid, nested, base = children[3], children[4], children[5]
    assert last_grid.cfg.train.learning_rate == 2e-4 and last_grid.cfg.lora.r == 8
    assert nested.cfg.lora.r == 16 and nested.cfg.lora.alpha == 8 and nested.cfg.train.learning_rate == BASE.train.learning_rate
    assert base.cfg == BASE and base.overrides == {}
    # Every child reports every swept key (its own value, or the base's), for the ranking table's columns.
    assert nested.values == {"train.learning_rate": BASE.train.learning_rate, "lora.r": 16, "lora.alpha": 8}
    # Keys whose last part clashes keep their full dotted name in run names.
    assert [c.name for c in plan_sweep(BASE, {"train.seed": [1], "lora.seed": [2, 3]})] == [
        "sweep-train.seed=1-lora.seed=2", "sweep-train.seed=1-lora.seed=3"]


@pytest.mark.parametrize("grid, runs, expected", [
    ({"train.learnig_rate": [1e-4, 2e-4], "lora.r": [4, 8]}, None,
     r"grid train.learnig_rate=0.0001,0.0002: unknown config key 'train.learnig_rate' \(did you mean 'learning_rate'\?\)"),
    ({"train.learning_rate": [-1.0, 2e-4]}, None,
     r"grid train.learning_rate=-1: train.learning_rate: Input should be greater than 0 \(got -1.0\): fix or drop it"),
    ({"lora.r": []}, None, r"grid 'lora.r' needs a non-empty list of values"),
    (None, [{"trian": {"max_steps": 3}}], r"runs\[0\] \(trian.max_steps=3\): unknown config key 'trian' \(did you mean 'train'\?\)"),
    (None, [{"prompt.max_length": 32}], r"runs\[0\] \(prompt.max_length=32\): prompt.max_target_length \(128\) must be below"),
    (None, ["lora.r=8"], r"runs\[0\]: expected a dict of overrides"),
    ({"lora.r": [8, 16]}, [{"lora": {"r": 16}}], r"runs\[0\] \(lora.r=16\) gives the same config as grid \(lora.r=16\): drop one"),
    (None, None, r"nothing to run: give a grid such as .* \(CLI: --grid train.learning_rate=1e-4,2e-4\)"),
])
def test_a_bad_sweep_is_rejected_in_one_line_naming_the_key_and_the_fix(grid, runs, expected):
    with pytest.raises(ValueError, match=expected) as err:
        plan_sweep(BASE, grid, runs)
    assert "\n" not in str(err.value) and str(err.value).startswith("invalid sweep")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        plan_sweep(BASE, {"train.learning_rate": [0.0], "lora.r": [0, 8]}, [{"trian.max_steps": 3}])
    msg = str(err.value)
    assert "train.learning_rate=0" in msg and "lora.r=0" in msg and "'trian'" in msg and "lora.r=8" not in msg


def test_grid_values_on_the_command_line_parse_like_set_values():
    assert parse_grid_arg("train.learning_rate=1e-4,2e-4") == ("train.learning_rate", [1e-4, 2e-4])
    assert parse_grid_arg("lora.r=4,8") == ("lora.r", [4, 8])
    assert parse_grid_arg("train.bf16=true,false") == ("train.bf16", [True, False])
    assert parse_grid_arg("lora.target_modules=[q_proj,v_proj],all-linear") == (
        "lora.target_modules", [["q_proj", "v_proj"], "all-linear"])
    with pytest.raises(ConfigError, match=r"--grid 'lora.r' is not key=v1,v2"):
        parse_grid_arg("lora.r")


def test_cli_sweep_rejects_a_bad_grid_before_starting_anything(capsys):
    assert main(["sweep", "--grid", "train.learnig_rate=1e-4,2e-4", "--grid", "lora.r=4,8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'train.learnig_rate' (did you mean 'learning_rate'?)" in err[0]
    assert main(["sweep", "--grid", "lora.r=4", "--grid", "lora.r=8"]) == 2
    assert "--grid lora.r is given twice" in capsys.readouterr().err
    assert main(["sweep", "--grid", "lora.r=4,8", "--max-concurrent", "0"]) == 2
    assert main(["sweep"]) == 2
    assert "nothing to run" in capsys.readouterr().err


# --------------------------------------------------------------------------- ranking


def _result(run: str, rouge_l: float | None, error: str | None = None, test_rouge_l: float | None = None) -> dict:
    """A child's result: `rouge_l` on validation, `test_rouge_l` (default: the same) on test."""
    def scores(x):
        return {k: x for k in ("rouge1_fmeasure", "rouge2_fmeasure", "rougeL_fmeasure", "rougeLsum_fmeasure")}

    metrics = None
    if rouge_l is not None:
        test = scores(rouge_l if test_rouge_l is None else test_rouge_l)
        interval = {"mean": rouge_l, "ci95": [rouge_l - 0.05, rouge_l + 0.05], "n": 8, "n_clusters": 8}
        metrics = {"finetuned": test, "base": {**test, "rougeL_fmeasure": 0.1}, "n_examples": 4,
                   "validation": {"finetuned": scores(rouge_l), "n_examples": 8,
                                  "intervals": {"finetuned": {"rougeL_fmeasure": interval}}}}
    return {"run": run, "values": {"train.learning_rate": 1e-4, "lora.target_modules": ["q_proj", "v_proj"]},
            "state": "Failed" if error else "Completed", "flow_run_id": f"id-{run}",
            "metrics": metrics, "train": metrics and {"train_loss": 1.234567}, "error": error}


def test_ranking_puts_the_best_first_keeps_ties_in_order_and_failures_last():
    results = [_result("a", 0.2), _result("b", None, "ValueError: boom"), _result("c", 0.5), _result("d", 0.2)]
    ranked = rank(results, "rougeL")
    assert [(r["rank"], r["run"]) for r in ranked] == [(1, "c"), (2, "a"), (3, "d"), (None, "b")]
    rows = ranking_rows(ranked)
    assert list(rows[0]) == ["rank", "run", "train.learning_rate", "lora.target_modules", "validation rougeL",
                             "rouge1", "rouge2", "rougeL", "rougeLsum", "base rougeL", "train loss", "state",
                             "flow run id", "error"]
    assert rows[0]["rougeL"] == 50.0 and rows[0]["base rougeL"] == 10.0 and rows[0]["train loss"] == 1.2346
    assert rows[0]["validation rougeL"] == "50.00 [45.00, 55.00]"
    assert rows[0]["lora.target_modules"] == "q_proj+v_proj"
    assert rows[-1]["rougeL"] is None and rows[-1]["state"] == "Failed" and rows[-1]["error"] == "ValueError: boom"
    text = ranking_text(rows)
    assert text.splitlines()[1].startswith("1 ") and "b: ValueError: boom" in text


def test_ranking_reads_validation_never_test():
    # The test split would rank b first; validation says a. The sweep must follow validation.
    ranked = rank([_result("a", 0.4, test_rouge_l=0.1), _result("b", 0.3, test_rouge_l=0.9)], "rougeL")
    assert [r["run"] for r in ranked] == ["a", "b"]


# --------------------------------------------------------------------------- the flow, on the tiny model


def _child_runs(sweep_state) -> list:
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def fetch():
        async with get_client() as client:
            parent = FlowRunFilterParentFlowRunId(any_=[sweep_state.state_details.flow_run_id])
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))

    return anyio.run(fetch)


def _runs_named(names: list[str]) -> list:
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def fetch():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))

    return anyio.run(fetch)


def _stage_states(flow_run_ids: list[str]) -> dict[str, list[str]]:
    """Each stage's task-run state names across the given flow runs, sorted."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))
            out: dict[str, list[str]] = {}
            for r in runs:
                out.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
            return {k: sorted(v) for k, v in out.items()}

    return anyio.run(fetch)


def _artifact_rows(key: str) -> list[dict]:
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def fetch():
        async with get_client() as client:
            found = await client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert len(found) == 1, found
            data = found[0].data
            return json.loads(data) if isinstance(data, str) else data

    return anyio.run(fetch)


def test_sweep_runs_children_that_share_cached_stages_and_ranks_them(tmp_path, tiny_llama_dir, prefect_harness):
    from flows.sweep import sweep

    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir,
                      max_steps=16, save_steps=16, logging_steps=4)
    grid = {"train.learning_rate": [1e-3, 1e-2]}  # sweep order: lr=0.001, lr=0.01, then the runs
    runs = [{"lora": {"r": 4}}, {"lora.target_modules": ["no_such_proj"]}]  # the last fails in the model stage
    state = sweep(cfg, grid=grid, runs=runs, max_concurrent=2, return_state=True)

    # One child failed: the sweep still completes, and says which child failed and why.
    assert state.is_completed(), state.message
    assert "1 of 4 runs failed: sweep-targets=no_such_proj" in state.message
    result = state.result()
    ranked = result["ranking"]
    names = ["sweep-lr=0.001", "sweep-lr=0.01", "sweep-r=4", "sweep-targets=no_such_proj"]
    assert sorted(r["run"] for r in ranked) == names
    assert [r["rank"] for r in ranked] == [1, 2, 3, None] and result["best"] == ranked[0]
    # Best validation rougeL first; equal scores (likely on a tiny model) keep the sweep's order.
    score = {r["run"]: r["metrics"]["validation"]["finetuned"]["rougeL_fmeasure"] for r in ranked[:3]}
    expected = sorted(names[:3], key=lambda name: (-score[name], names.index(name)))
    assert [r["run"] for r in ranked[:3]] == expected, score
    assert ranked[3]["state"] == "Failed" and "lora.target_modules ['no_such_proj'] not found" in ranked[3]["error"]
    assert len({r["adapter"] for r in ranked[:3]}) == 3  # three distinct trainings

    # Every child is a child flow run of the sweep, named after its overrides; at most two ran at once.
    children = _child_runs(state)
    assert sorted(c.name for c in children) == names
    assert {c.name: c.state.name for c in children} == {r["run"]: r["state"] for r in ranked}
    spans = [(c.start_time, c.end_time) for c in children]
    overlap = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert overlap == 2, spans

    # Shared stages computed once and Cached for the other children; the model once per LoRA config
    # (r=8 for both learning rates, r=4; the bad target modules fail); train/evaluate once per child.
    stages = _stage_states([str(c.id) for c in children])
    assert stages["data"] == ["Cached", "Cached", "Cached", "Completed"], stages
    assert stages["tokenize"] == ["Cached", "Cached", "Cached", "Completed"], stages
    assert stages["model"] == ["Cached", "Completed", "Completed", "Failed"], stages
    assert stages["train"] == ["Completed"] * 3 and stages["evaluate"] == ["Completed"] * 3, stages

    # The ranking artifact on the server, best first by the chosen metric.
    rows = _artifact_rows("loraflow-sweep-ranking")
    assert [row["run"] for row in rows] == [r["run"] for r in ranked]
    assert [row["rank"] for row in rows] == [1, 2, 3, None]
    val = [float(row["validation rougeL"].split()[0]) for row in rows[:3]]
    assert val == sorted(val, reverse=True)
    assert [row["train.learning_rate"] for row in rows if row["run"] == "sweep-r=4"] == [1e-2]  # the base's value
    assert {row["flow run id"] for row in rows} == {str(c.id) for c in children}
    assert rows[-1]["state"] == "Failed" and "no_such_proj" in rows[-1]["error"]
    assert all(row["train loss"] > 0 and row["base rougeL"] is not None for row in rows[:3])

    # The same grid again from the command line: new child runs, every stage Cached, the same ranking.
    preset = tmp_path / "sweep.yaml"
    preset.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # not capsys: Prefect's console log handler would keep its stream
        assert main(["sweep", str(preset), "--grid", "train.learning_rate=1e-3,1e-2", "--max-concurrent", "2"]) == 0
    out = stdout.getvalue()
    order = [r["run"] for r in ranked if r["run"].startswith("sweep-lr=")]
    printed = [line.split()[1] for line in out.splitlines() if line[:1].isdigit()]
    assert printed == order, out
    again = [r for r in _runs_named(order) if str(r.id) not in {str(c.id) for c in children}]
    assert len(again) == 2
    assert {s for states in _stage_states([str(r.id) for r in again]).values() for s in states} == {"Cached"}


def test_sweep_with_a_bad_override_fails_before_any_child_runs(tmp_path, tiny_llama_dir, prefect_harness):
    from flows.sweep import sweep

    cfg = tiny_config(tmp_path, write_examples(tmp_path / "toy.jsonl"), tiny_llama_dir, max_steps=2, save_steps=2)
    state = sweep(cfg, grid={"train.learning_rate": [1e-3, 1e-2]}, runs=[{"lora.alpah": 4}], return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"runs\[0\] \(lora.alpah=4\): unknown config key 'lora.alpah' \(did you mean 'alpha'"):
        state.result()
    assert _child_runs(state) == []
    assert not list((tmp_path / "runs").rglob("manifest.json"))  # no stage ran

    # Prefect checks the parameter types and bounds before the flow body runs.
    bad = sweep(cfg, grid={"lora.r": [4]}, max_concurrent=0, return_state=True)
    assert bad.is_failed() and "max_concurrent" in str(bad.message)
