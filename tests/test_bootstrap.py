"""Intervals: the seeded cluster bootstrap, and promotion decided by the paired validation interval."""

from __future__ import annotations

import random

import pytest

from loraflow.metrics.bootstrap import cluster_bootstrap, fmt_interval, paired_bootstrap
from loraflow.ops.registry import Candidate, decide


def test_deterministic_under_its_seed():
    rng = random.Random(0)
    a, b = [rng.random() for _ in range(50)], [rng.random() for _ in range(50)]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b, seed=3)["ci95"] != paired_bootstrap(a, b, seed=4)["ci95"]


def test_the_interval_covers_a_known_difference():
    # 200 rows, system a better than b by 0.05 on average, with row noise much larger than that.
    covered = 0
    for trial in range(40):
        rng = random.Random(trial)
        base = [rng.random() for _ in range(200)]
        a = [x + 0.05 + rng.gauss(0, 0.1) for x in base]
        out = paired_bootstrap(a, base, samples=500, seed=trial)
        lo, hi = out["ci95"]
        covered += lo <= 0.05 <= hi
        assert lo < out["mean_diff"] < hi and out["n"] == 200 and out["n_clusters"] == 200
    assert covered >= 34  # a 95% interval: ~38 of 40 expected


def test_pairing_is_tighter_than_separate_intervals():
    rng = random.Random(1)
    hard = [rng.random() for _ in range(100)]  # how hard each row is: shared by both systems
    a, b = [h + 0.03 for h in hard], [h + rng.gauss(0, 0.01) for h in hard]
    paired = paired_bootstrap(a, b)["ci95"]
    alone = cluster_bootstrap(a)["ci95"]
    assert paired[1] - paired[0] < (alone[1] - alone[0]) / 5


def test_clusters_are_resampled_whole():
    # 30 papers with 3 rows each whose scores move together: rows are not independent, so resampling
    # rows would pretend there are 90 samples; resampling papers gives the honest, wider interval.
    rng = random.Random(2)
    per_paper = [rng.gauss(0, 0.2) for _ in range(30)]
    values = [p + rng.gauss(0, 0.01) for p in per_paper for _ in range(3)]
    clusters = [f"paper{i}" for i in range(30) for _ in range(3)]
    rows = cluster_bootstrap(values, None)
    papers = cluster_bootstrap(values, clusters)
    assert papers["n"] == 90 and papers["n_clusters"] == 30
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(papers) > 1.4 * width(rows)


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match="no values"):
        cluster_bootstrap([])
    with pytest.raises(ValueError, match="paired comparison needs both on the same rows"):
        paired_bootstrap([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="one key per value"):
        cluster_bootstrap([1.0, 2.0], ["a"])


def test_format():
    assert fmt_interval({"mean_diff": 0.0657, "ci95": [0.031, 0.0985]}) == "+6.57 [+3.10, +9.85]"
    assert fmt_interval({"mean": 0.2345, "ci95": [0.21, 0.259]}) == "23.45 [21.00, 25.90]"


CHAMPION = Candidate(adapter="a", train_fingerprint="t", data_fingerprint="d", test_fingerprint="x",
                     metric="rougeL", score=0.30, promoted=True, reason="first")


def test_promotion_needs_the_lower_bound_to_clear_the_margin():
    assert decide("rougeL", 0.0, "interval", None, None) == (True, "no champion yet")
    noisy = {"mean_diff": 0.02, "ci95": [-0.01, 0.05], "n": 64, "n_clusters": 64}
    clear = {"mean_diff": 0.04, "ci95": [0.015, 0.065], "n": 64, "n_clusters": 64}
    promoted, reason = decide("rougeL", 0.01, "interval", CHAMPION, noisy)  # the mean beats the margin, the bound does not
    assert promoted is False and "lower bound does not clear the required margin +1.00" in reason
    assert "+2.00 [-1.00, +5.00]" in reason and "n=64" in reason
    assert decide("rougeL", 0.01, "interval", CHAMPION, clear)[0] is True
    assert decide("rougeL", 0.02, "interval", CHAMPION, clear)[0] is False
    assert decide("rougeL", 0.01, "mean", CHAMPION, noisy)[0] is True  # the old rule, when asked for
    assert decide("rougeL", 0.03, "mean", CHAMPION, noisy)[0] is False


def test_the_seeded_bootstrap_widens_with_training_seed_spread():
    """Rows alike, seeds not: one seed's +3 and another's -3 average to 0, and the interval must say that the
    training draw decides the sign; a one-level bootstrap over rows of the pooled differences does not."""
    import numpy as np

    from loraflow.metrics.bootstrap import seeded_paired_bootstrap

    rng = np.random.default_rng(0)
    rows = 64
    b = [list(rng.uniform(0.2, 0.4, rows)) for _ in range(3)]
    a = [[x + shift + rng.normal(0, 0.01) for x in seed_rows] for shift, seed_rows in zip((0.03, -0.03, 0.0), b)]
    two = seeded_paired_bootstrap(a, b, samples=2000, seed=0)
    assert two["seeds"] == 3 and two["n"] == rows and two["n_clusters"] == rows
    assert abs(two["mean_diff"]) < 0.005
    lo, hi = two["ci95"]
    assert lo < -0.02 and hi > 0.02  # the seed spread is in the interval
    pooled = paired_bootstrap([x for s in a for x in s], [x for s in b for x in s], samples=2000, seed=0)
    assert pooled["ci95"][1] - pooled["ci95"][0] < (hi - lo) / 4  # rows alone would claim a false precision
    # one seed, constant difference: a point interval at the difference
    same = seeded_paired_bootstrap([[0.5] * 8], [[0.25] * 8], clusters=list("aabbccdd"), samples=200)
    assert same["ci95"] == [0.25, 0.25] and same["n_clusters"] == 4
    assert seeded_paired_bootstrap(a, b, samples=500, seed=1) == seeded_paired_bootstrap(a, b, samples=500, seed=1)


def test_the_seeded_bootstrap_refuses_unpaired_input():
    from loraflow.metrics.bootstrap import seeded_paired_bootstrap

    with pytest.raises(ValueError, match="same seeds and scored on the same rows"):
        seeded_paired_bootstrap([[0.1, 0.2]], [[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError, match="one key per row"):
        seeded_paired_bootstrap([[0.1, 0.2]], [[0.1, 0.2]], clusters=["a"])
