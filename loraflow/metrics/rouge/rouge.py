"""ROUGE as a local `evaluate` metric, backed by Google's `rouge-score` package.

`evaluate.load("rouge")` fetches its script from the hub; this module is loaded by path instead:
    evaluate.load("<repo>/loraflow/metrics/rouge")
Returns precision, recall and F1 of rouge1/rouge2/rougeL/rougeLsum. With several references an
example scores against its best reference (per ROUGE type, by F1, as `RougeScorer.score_multi`).
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# rougeLsum treats newlines as sentence boundaries; split on end punctuation followed by space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> str:
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip())


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-1/2/L/Lsum precision, recall and F1 with best-of-references scoring.",
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of list of str (or list of str).",
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, use_stemmer=True, use_aggregator=True):
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        per_example = {f"{t}_{part}": [] for t in ROUGE_TYPES for part in ("precision", "recall", "fmeasure")}
        for pred, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else list(refs)
            scores = scorer.score_multi([split_sentences(r) for r in refs], split_sentences(pred))
            for t in ROUGE_TYPES:
                s = scores[t]
                per_example[f"{t}_precision"].append(s.precision)
                per_example[f"{t}_recall"].append(s.recall)
                per_example[f"{t}_fmeasure"].append(s.fmeasure)
        if not use_aggregator:
            return per_example
        n = max(len(predictions), 1)
        return {k: sum(v) / n for k, v in per_example.items()}
