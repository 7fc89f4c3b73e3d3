"""Score predictions with the project's local ROUGE metric (`loraflow/metrics/rouge`), no hub needed.

    score(["the model works"], [["the model works well", "it works"]])
    -> {"rouge1_precision": 1.0, "rouge1_recall": 0.75, "rouge1_fmeasure": 0.857..., ..., "rougeLsum_fmeasure": ...}

`evaluate.load("rouge")` would fetch the script from the hub; loading the folder by path goes straight
to evaluate's local-module factory, which makes no network request (so HF_HUB_OFFLINE does not matter).
`evaluate` is imported inside the functions: importing it pulls in transformers (~15 s on a cold CPU).
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

METRIC_DIR = Path(__file__).resolve().parent  # evaluate loads rouge.py from this folder
KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")  # the ROUGE types scored and reported

# One metric object per process; compute() buffers inputs on the object, so calls take turns.
_compute_lock = threading.Lock()


@lru_cache(maxsize=1)
def load_metric() -> Any:
    """The local ROUGE `evaluate.Metric`, loaded once per process."""
    import evaluate

    # keep_in_memory: no Arrow cache files under ~/.cache, so parallel runs cannot contend for them.
    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def _checked_references(predictions: list[str], references: list[list[str]] | list[str]) -> list[list[str]]:
    """References as one list per prediction; a one-line ValueError that says the fix otherwise."""
    if len(predictions) != len(references):
        raise ValueError(
            f"rouge: {len(predictions)} predictions but {len(references)} references: "
            "pass exactly one reference (a string or a list of strings) per prediction"
        )
    if not predictions:
        raise ValueError("rouge: no predictions to score: pass at least one prediction and its reference")
    # Normalise to lists: evaluate picks the input schema from the first example, so mixed shapes would fail.
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _compute(predictions: list[str], references: list[list[str]] | list[str], use_stemmer: bool, aggregate: bool):
    refs = _checked_references(predictions, references)
    with _compute_lock:
        return load_metric().compute(
            predictions=list(predictions), references=refs, use_stemmer=use_stemmer, use_aggregator=aggregate
        )


def score(
    predictions: list[str], references: list[list[str]] | list[str], use_stemmer: bool = True
) -> dict[str, float]:
    """Mean ROUGE precision/recall/F1 (0..1) over examples, keys like `rougeL_fmeasure`.

    references: one entry per prediction, a string or a list of strings (best reference counts).
    use_stemmer: Porter-stem words before matching (EvalConfig.use_stemmer).
    """
    return _compute(predictions, references, use_stemmer, aggregate=True)


def per_example(
    predictions: list[str], references: list[list[str]] | list[str], use_stemmer: bool = True
) -> dict[str, list[float]]:
    """The same keys as `score`, each a list with one value per example (e.g. `["rougeL_fmeasure"][i]`)."""
    return _compute(predictions, references, use_stemmer, aggregate=False)
