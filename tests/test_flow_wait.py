"""While the flow process waits for the early training process's pre-flight, it uses its idle core: it imports what
the data stage needs, then freezes what is alive out of the cyclic collector, so that the full collection after each
stage before training (`store.build`) walks only what was made since. It unfreezes when training is over, so that a
process running many flows keeps no run's objects from the collector, and it leaves a freeze of someone else's alone."""

import gc

from flows import pipeline


def test_the_flow_process_freezes_what_is_alive_while_it_waits_and_unfreezes_after():
    assert gc.get_freeze_count() == 0
    walked_before = len(gc.get_objects())  # what a full collection walks (the frozen generation is not in it)
    with pipeline._ready_beside("a-train-key", modules=("json",)) as thread:
        thread.join()
        frozen, walked = gc.get_freeze_count(), len(gc.get_objects())
    assert frozen > 10_000  # Prefect's, pydantic's, pytest's objects: alive in this process
    assert walked < walked_before / 10
    assert gc.get_freeze_count() == 0


def test_nothing_is_frozen_without_an_early_training_process_or_over_a_freeze_of_someone_elses():
    with pipeline._ready_beside(None) as thread:
        assert thread is None and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        theirs = gc.get_freeze_count()
        with pipeline._ready_beside("a-train-key") as thread:
            assert thread is None
        assert gc.get_freeze_count() > theirs * 0.9  # still theirs (what refcounting frees leaves the count)
    finally:
        gc.unfreeze()
