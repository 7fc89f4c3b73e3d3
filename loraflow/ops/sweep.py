"""Sweeps as plain functions: expand a grid of overrides into validated child configs, rank the results.

    plan_sweep(cfg, grid={"train.learning_rate": [1e-4, 2e-4], "lora.r": [4, 8]})   # 4 children
    plan_sweep(cfg, runs=[{"lora": {"r": 4, "alpha": 8}}, {"train.max_steps": 50}])   # 2 children

`flows/sweep.py` runs each child as a `loraflow-finetune` subflow. Overrides use the dotted keys of
`--set`, or nested dicts; every child config is validated by `loraflow.config.build_config` (same
did-you-mean messages), all before the first child starts. Nothing here imports Prefect or torch.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from loraflow.config import ConfigError, PipelineConfig, build_config, deep_merge, field_annotation, parse_value
from loraflow.metrics.rouge import KEYS

Metric = Literal["rouge1", "rouge2", "rougeL", "rougeLsum"]

# Short labels for run names (sweep-lr=0.0002-r=8); other keys use their last part.
SHORT = {"learning_rate": "lr", "per_device_train_batch_size": "bs", "gradient_accumulation_steps": "accum",
         "num_train_epochs": "epochs", "max_steps": "steps", "target_modules": "targets"}


@dataclass(frozen=True)
class Child:
    """One run of the sweep: its flow run name, its overrides (dotted keys) and its validated config."""

    name: str
    overrides: dict[str, Any]
    cfg: PipelineConfig
    origin: str  # 'grid' or 'runs[i]', for messages
    values: dict[str, Any] = field(default_factory=dict)  # every swept key -> this child's value


def flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'learning_rate': 1e-4}, 'lora.r': 8} -> {'train.learning_rate': 1e-4, 'lora.r': 8}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        for k, v in (flatten(value, dotted + ".") if isinstance(value, dict) and value else {dotted: value}).items():
            if k in out and out[k] != v:
                raise ConfigError(f"'{k}' is given twice ({out[k]!r} and {v!r}): keep one")
            out[k] = v
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'train.learning_rate': 1e-4} -> {'train': {'learning_rate': 1e-4}} (the shape build_config reads)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = out
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{key}': '{part}' is set to a value and also used as a section: keep one")
        node[leaf] = value
    return out


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product, first key outermost: {a: [1, 2], b: [3]} -> [{a: 1, b: 3}, {a: 2, b: 3}]."""
    if not grid:
        return []
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def parse_grid_arg(text: str) -> tuple[str, list[Any]]:
    """CLI `--grid train.learning_rate=1e-4,2e-4` -> ('train.learning_rate', [0.0001, 0.0002]).
    Values parse as `--set` values do; commas inside [...] stay in one value (`lora.target_modules=[q_proj,v_proj],all-linear`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise ConfigError(f"--grid '{text}' is not key=v1,v2: write e.g. --grid train.learning_rate=1e-4,2e-4")
    parts, depth, current = [], 0, ""
    for ch in raw:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return key.strip(), [parse_value(p.strip(), field_annotation(key.strip())) for p in parts]


def _check(base: dict[str, Any], flat: dict[str, Any]) -> PipelineConfig:
    try:
        return build_config(deep_merge(base, nest(flat)))
    except ConfigError as err:
        raise ConfigError(str(err).removeprefix("invalid config: ")) from None


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(v) for v in value)
    return str(value).replace(" ", "_")


def _labels(keys: list[str]) -> dict[str, str]:
    short = {k: SHORT.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
    clash = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clash else s) for k, s in short.items()}


def _lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def plan_sweep(cfg: PipelineConfig, grid: dict[str, list[Any]] | None = None,
               runs: list[dict[str, Any]] | None = None) -> list[Child]:
    """The children of a sweep: the grid's product, then `runs`, each validated over `cfg`.
    Raises one single-line ConfigError (a ValueError) listing every problem, before anything runs."""
    grid, runs = grid or {}, runs or []
    base = cfg.model_dump(mode="json")
    problems: list[str] = []
    if not isinstance(grid, dict) or not isinstance(runs, list):
        raise ConfigError("invalid sweep: grid must map dotted keys to lists, runs must be a list of override dicts")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid '{key}' needs a non-empty list of values, e.g. {{'{key}': [a, b]}}")
    for key, values in grid.items():  # each value alone: a bad one is reported once, not once per combination
        errors: dict[str, list[str]] = {}  # message -> the values that cause it (an unknown key: all of them)
        for value in values if isinstance(values, list) else []:
            try:
                _check(base, flatten({key: value}))
            except ConfigError as err:
                errors.setdefault(str(err), []).append(_fmt(value))
        problems += [f"grid {key}={','.join(vals)}: {msg}: fix or drop it in the grid" for msg, vals in errors.items()]
    candidates: list[tuple[str, dict[str, Any]]] = []
    if not problems:
        candidates = [("grid", flatten(combo)) for combo in expand_grid(grid)]
    for i, run in enumerate(runs):
        try:
            if not isinstance(run, dict):
                raise ConfigError(f"expected a dict of overrides such as {{'lora.r': 8}}, got {run!r}")
            candidates.append((f"runs[{i}]", flatten(run)))
        except ConfigError as err:
            problems.append(f"runs[{i}]: {err}")
    if not problems and not candidates:
        raise ConfigError("invalid sweep: nothing to run: give a grid such as {'train.learning_rate': [1e-4, 2e-4]} "
                          "(CLI: --grid train.learning_rate=1e-4,2e-4) and/or a list of runs")

    swept = list(dict.fromkeys(k for _, flat in candidates for k in flat))
    labels = _labels(swept)
    children: list[Child] = []
    seen: dict[str, str] = {}
    for origin, flat in candidates:
        name = "sweep-" + ("-".join(f"{labels[k]}={_fmt(v)}" for k, v in flat.items()) or "base")
        where = f"{origin} ({', '.join(f'{k}={_fmt(v)}' for k, v in flat.items()) or 'no overrides'})"
        try:
            child_cfg = _check(base, flat)
        except ConfigError as err:
            problems.append(f"{where}: {err}: fix or drop it")
            continue
        fingerprint = child_cfg.model_dump_json()
        if fingerprint in seen:
            problems.append(f"{where} gives the same config as {seen[fingerprint]}: drop one")
            continue
        seen[fingerprint] = where
        names = {c.name for c in children}
        unique = next(n for n in itertools.chain([name], (f"{name}-{i}" for i in itertools.count(2))) if n not in names)
        dump = child_cfg.model_dump(mode="json")
        children.append(Child(unique, flat, child_cfg, origin, {k: _lookup(dump, k) for k in swept}))
    if problems:
        raise ConfigError("invalid sweep (nothing was run): " + "; ".join(problems))
    return children


# --------------------------------------------------------------------------- ranking


def rank(results: list[dict[str, Any]], metric: Metric) -> list[dict[str, Any]]:
    """Completed runs by the fine-tuned model's `metric` F1 on the *validation* split, best first (ties keep
    sweep order); then failed runs. The test scores are reported beside it, never ranked by.
    A result is {'run', 'values', 'state', 'flow_run_id', 'metrics' (evaluate's dict, or None), 'train', 'error'}."""
    key = f"{metric}_fmeasure"
    done = sorted((r for r in results if r.get("metrics")),
                  key=lambda r: -r["metrics"]["validation"]["finetuned"][key])
    failed = [r for r in results if not r.get("metrics")]
    return [{**r, "rank": i} for i, r in enumerate(done, 1)] + [{**r, "rank": None} for r in failed]


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


def ranking_rows(ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows (ROUGE F1 x100): rank, run, swept values, validation ROUGE-L with its interval (what ranks),
    test ROUGE of the fine-tuned model, base ROUGE-L, train loss, state."""
    from loraflow.metrics.bootstrap import fmt_interval

    rows = []
    for r in ranked:
        metrics, train = r.get("metrics") or {}, r.get("train") or {}
        finetuned, base = metrics.get("finetuned", {}), metrics.get("base") or {}
        val = (metrics.get("validation") or {}).get("intervals", {}).get("finetuned", {}).get("rougeL_fmeasure")
        loss = train.get("train_loss")
        rows.append({
            "rank": r["rank"], "run": r["run"],
            **{k: _fmt(v) if isinstance(v, (list, dict)) else v for k, v in r["values"].items()},
            "validation rougeL": fmt_interval(val) if val else None,
            **{k: _pct(finetuned.get(f"{k}_fmeasure")) for k in KEYS},
            "base rougeL": _pct(base.get("rougeL_fmeasure")),
            "train loss": None if loss is None else round(loss, 4),
            "state": r["state"], "flow run id": r["flow_run_id"], "error": r.get("error") or "",
        })
    return rows


def ranking_text(rows: list[dict[str, Any]]) -> str:
    """The ranking as a plain-text table for logs and the CLI."""
    cols = [c for c in rows[0] if c not in ("flow run id", "error")] if rows else []
    cells = [[("" if row[c] is None else str(row[c])) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    lines += [f"{row['run']}: {row['error']}" for row in rows if row["error"]]
    return "\n".join(lines)
