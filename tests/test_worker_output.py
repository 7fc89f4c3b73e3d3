"""The training process's output as the flow process reads it (`loraflow.stages.launch`): its answers to the stages
asked of it, its progress and error lines, and what the user sees of it on stderr."""

from __future__ import annotations

import json
import subprocess
import sys

from loraflow.stages import launch
from loraflow.stages.train.callbacks import PROGRESS_MARK
from loraflow.stages.worker import DONE_MARK


def _process(*lines: str) -> subprocess.Popen:
    """A real process that prints `lines` (no newline after a line ending in \\r) and exits; read once it has."""
    script = "import sys\n" + "".join(f"sys.stdout.write({line + ('' if line.endswith(chr(13)) else chr(10))!r})\n"
                                      for line in lines)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.wait()  # everything is in the pipe now: one read gets it all, as when answers come close together
    return proc


def test_two_answers_read_in_one_chunk_both_reach_their_tasks_and_nothing_after_them_is_lost(capsys):
    proc = _process(DONE_MARK + json.dumps({"id": "tokenize-1", "result": {"rows": 8}}),
                    DONE_MARK + json.dumps({"id": "model-1", "result": {"params": 4}}),
                    "train: gradient checkpointing on (auto): on a CPU")
    launch._EARLY["k"] = proc
    try:
        assert launch._await("k", proc, "model-1", "model") == {"params": 4}
        assert launch._await("k", proc, "tokenize-1", "tokenize") == {"rows": 8}  # kept aside for its task
        tail, errors = [], []
        assert launch._forward(launch._output(proc), tail, errors) is None  # the output's end
    finally:
        launch._EARLY.pop("k", None)
        launch._ANSWERS.pop("k", None)
    assert tail == ["train: gradient checkpointing on (auto): on a CPU"]
    assert "gradient checkpointing on" in capsys.readouterr().err


def test_the_user_sees_the_processs_text_and_progress_bars_but_not_its_marked_lines(capsys):
    progress = PROGRESS_MARK + json.dumps({"step": 1, "max_steps": 2})
    proc = _process("loading the model", " 50%|#####     | 1/2\r", progress,
                    DONE_MARK + json.dumps({"id": "x", "result": {}}), "100%|##########| 2/2", "done")
    seen: list[dict] = []
    launch._forward(launch._output(proc), [], [], on_progress=seen.append)
    err = capsys.readouterr().err
    assert seen == [{"step": 1, "max_steps": 2}]
    assert "loading the model\n" in err and " 50%|#####     | 1/2\r" in err and "2/2\ndone\n" in err
    assert "loraflow-" not in err, err


def test_a_partial_line_is_shown_up_to_where_a_mark_may_begin():
    assert launch._showable(b" 10%|#  | 1/10\r") == len(b" 10%|#  | 1/10\r")
    assert launch._showable(b" 10%|#  | 1/10\rloraf") == len(b" 10%|#  | 1/10\r")
    assert launch._showable(b"bar\r" + DONE_MARK.encode() + b'{"id"') == len(b"bar\r")
    assert launch._showable(b"a plain line") == len(b"a plain line")


def test_two_tasks_awaiting_answers_that_come_together_both_get_theirs_from_an_idle_process():
    """The tokenize and model tasks wait side by side; their answers come in one write, and then the process waits
    for its next request (it does not end). A task whose answer the other read for it must find it, not wait on
    output that will not come (the demo hung here, 2026-12-05)."""
    import threading

    script = ("import sys\n"
              "sys.stdin.readline()\n"
              f"sys.stdout.write({DONE_MARK!r} + '{{\"id\": \"model-1\", \"result\": 4}}\\n'"
              f" + {DONE_MARK!r} + '{{\"id\": \"tokenize-1\", \"result\": 8}}\\n')\n"
              "sys.stdout.flush()\n"
              "sys.stdin.read()\n")  # idle until its input closes, as the training process waits for a request
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    launch._EARLY["k2"] = proc
    got: dict[str, object] = {}

    def wait_for(request: str) -> None:
        try:
            got[request] = launch._await("k2", proc, request, request.split("-")[0])
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            got[request] = err

    try:
        tasks = [threading.Thread(target=wait_for, args=(r,), daemon=True) for r in ("tokenize-1", "model-1")]
        tasks[0].start()  # reading: the process has written nothing yet
        import time

        time.sleep(0.5)
        tasks[1].start()  # waits for the reader
        time.sleep(0.5)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        for t in tasks:
            t.join(timeout=20)
        assert got == {"tokenize-1": 8, "model-1": 4}, got
    finally:
        proc.stdin.close()  # a task still waiting now sees the output end
        proc.wait(timeout=20)
        launch._EARLY.pop("k2", None)
        launch._ANSWERS.pop("k2", None)


def test_every_task_waiting_on_a_process_that_ended_gets_its_failure_not_a_closed_file():
    import pytest

    proc = _process("Traceback: the process died before answering")
    launch._EARLY["k3"] = proc
    try:
        for stage in ("tokenize", "model"):  # the second reads after the first has closed the output
            with pytest.raises(launch.WorkerFailed, match=f"{stage}: the training process running it"):
                launch._await("k3", proc, f"{stage}-1", stage)
    finally:
        launch._EARLY.pop("k3", None)
        launch._ANSWERS.pop("k3", None)


def test_an_answer_another_thread_wrote_into_before_its_newline_still_reaches_its_task(capsys):
    """The process prints an answer while another of its threads draws a progress bar or logs (the model stage's
    error while the tokenize stage maps): a write can land between the answer and its newline. The answer must
    still reach its task; it was lost there, and the model task waited for it forever (an everyday-tier hang,
    2026-12-06)."""
    answers = [DONE_MARK + json.dumps({"id": f"model-{i}", "result": i}) + tail
               for i, tail in enumerate(["\rMap:  50%|#####     | 4/8 [00:00<00:00]", "a log line", " 100%|##########| 8/8"])]
    proc = _process(*answers, "the end")
    launch._EARLY["k4"] = proc
    try:
        assert [launch._await("k4", proc, f"model-{i}", "model") for i in range(3)] == [0, 1, 2]
        assert launch._forward(launch._output(proc), [], []) is None
    finally:
        launch._EARLY.pop("k4", None)
        launch._ANSWERS.pop("k4", None)
    err = capsys.readouterr().err  # what was written after each answer is shown as its own line: nothing is lost
    assert "\rMap:  50%|#####     | 4/8 [00:00<00:00]\n" in err and "a log line\n" in err and "8/8\n" in err, err
    assert "the end\n" in err and "loraflow-" not in err
