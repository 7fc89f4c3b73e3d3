"""ROUGE-1/2/L/Lsum as a local `evaluate` metric, backed by Google's `rouge-score` package.

`evaluate.load("rouge")` fetches its script from the Hugging Face hub; this folder is loaded by path
instead, which never touches the network:

    evaluate.load("/abs/path/to/loraflow/metrics/rouge")   # folder holding rouge.py
    metric.compute(predictions=["a summary"], references=[["ref one", "ref two"]])
    -> {"rouge1_precision": 0.5, "rouge1_recall": ..., "rouge1_fmeasure": ..., ..., "rougeLsum_fmeasure": ...}

Scores are 0..1 floats, the mean over examples (or per-example lists with use_aggregator=False).
With several references an example takes, per ROUGE type, the reference with the best F1, exactly as
`RougeScorer.score_multi` does. `evaluate` copies this file into its module cache and imports it on
its own, so it must stay self-contained (no imports from loraflow).
"""

from __future__ import annotations

import re

import datasets
import evaluate
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
PARTS = ("precision", "recall", "fmeasure")

# A sentence ends at . ! or ? (plus closing quotes/brackets), then whitespace, then a character that
# is not lowercase: "e.g. the model" stays one sentence, "works. The model" splits. nltk's punkt
# would do better but needs a data download we cannot make offline.
_BOUNDARY = re.compile(r"""([.!?]+["'”’)\]]*)\s+(?=[^\sa-z])""")
# Tokens that end in a period without ending a sentence (followed by a capital or a digit).
_ABBREVIATIONS = {
    "al.", "approx.", "cf.", "dr.", "e.g.", "eq.", "eqs.", "fig.", "figs.", "i.e.", "mr.", "mrs.",
    "ms.", "no.", "prof.", "resp.", "sec.", "st.", "tab.", "vs.",
}
_INITIAL = re.compile(r"[A-Z]\.")  # "J. Smith": a single capital letter is a name initial


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences: at existing newlines, then at sentence-ending punctuation."""
    sentences = []
    for line in text.splitlines():
        start = 0
        for m in _BOUNDARY.finditer(line):
            last_token = line[start : m.end(1)].split()[-1]
            if last_token.lower() in _ABBREVIATIONS or _INITIAL.fullmatch(last_token):
                continue
            sentences.append(line[start : m.end(1)].strip())
            start = m.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


class Rouge(evaluate.Metric):
    """ROUGE precision/recall/F1 with best-of-references scoring (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE-1/2/L/Lsum precision, recall and F1 (rouge-score), best reference per example.",
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries. ACL Workshop.",
            inputs_description=(
                "predictions: list of str. references: list of (list of str), one or more references per "
                "prediction; a plain str per prediction is one reference. use_stemmer: Porter-stem words "
                "(default True). use_aggregator: mean over examples (default True) or per-example lists."
            ),
            # evaluate tries these in order against the first example, so both input shapes are accepted.
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, use_stemmer=True, use_aggregator=True):
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        rows = {f"{t}_{p}": [] for t in ROUGE_TYPES for p in PARTS}
        for i, (prediction, refs) in enumerate(zip(predictions, references)):
            refs = [refs] if isinstance(refs, str) else list(refs)
            if not refs:
                raise ValueError(f"rouge: example {i} has no reference: give every prediction at least one reference")
            # One sentence per line: only rougeLsum reads the newlines; the tokenizer drops them for the others.
            scores = scorer.score_multi(
                ["\n".join(split_sentences(r)) for r in refs], "\n".join(split_sentences(prediction))
            )
            for t in ROUGE_TYPES:
                for p in PARTS:
                    rows[f"{t}_{p}"].append(float(getattr(scores[t], p)))
        if not use_aggregator:
            return rows
        n = len(predictions)
        return {k: (sum(v) / n if n else 0.0) for k, v in rows.items()}
