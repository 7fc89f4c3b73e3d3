"""Score predictions with the project's local ROUGE metric (no hub access needed)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "rouge"


@lru_cache(maxsize=1)
def load_metric():
    import evaluate

    return evaluate.load(str(METRIC_DIR))


def score(predictions: list[str], references: list[list[str]] | list[str], use_stemmer: bool = True,
          per_example: bool = False) -> dict:
    """ROUGE precision/recall/F1 (0..1), the mean over examples unless `per_example`."""
    if len(predictions) != len(references):
        raise ValueError(
            f"rouge: {len(predictions)} predictions but {len(references)} references: pass one reference (list) per prediction"
        )
    if not predictions:
        raise ValueError("rouge: no predictions to score: evaluate at least one example")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    return load_metric().compute(predictions=predictions, references=refs, use_stemmer=use_stemmer,
                                 use_aggregator=not per_example)
