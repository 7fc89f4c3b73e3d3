"""Concurrent stages (a sweep's children) each get their own `loraflow` log lines in their task log."""

from __future__ import annotations

import logging
import threading
import time


def test_concurrent_stages_keep_their_own_log_lines(prefect_harness, tmp_path):
    import anyio
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    from loraflow import store
    from loraflow.config import DataConfig, RunConfig
    from tasks.stages import stage_logs

    source = tmp_path / "d.jsonl"
    source.write_text('{"input": "a", "target": "b"}\n')
    both_inside = threading.Barrier(2, timeout=60)

    @task(cache_policy=None)
    def noisy(name: str, data: DataConfig, run: RunConfig, key: store.StageKey) -> str:
        from prefect.context import TaskRunContext

        with stage_logs("data", str(tmp_path / name)):
            both_inside.wait()  # both tasks forward at the same time
            for i in range(5):
                logging.getLogger("loraflow").info("line %d from %s", i, name)
                time.sleep(0.01)
            both_inside.wait()
        return str(TaskRunContext.get().task_run.id)

    @flow
    def two_at_once() -> list[str]:
        ids: dict[str, str] = {}
        data, runs = DataConfig(source=str(source)), {n: RunConfig(output_dir=str(tmp_path / n)) for n in ("alpha", "beta")}
        threads = [threading.Thread(target=lambda n=n: ids.update({n: noisy(n, data, runs[n], store.data_key(data))})) for n in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [ids["alpha"], ids["beta"]]

    alpha, beta = two_at_once()

    async def messages(task_run_id: str) -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
            return [log.message for log in logs if log.message.startswith("line ")]

    # Logs reach the server in batches: wait for them.
    for task_run_id, own in ((alpha, "alpha"), (beta, "beta")):
        deadline = time.time() + 60
        while len(lines := anyio.run(messages, task_run_id)) < 5 and time.time() < deadline:
            time.sleep(0.5)
        assert sorted(lines) == [f"line {i} from {own}" for i in range(5)], lines
    assert logging.getLogger("loraflow").propagate is True  # restored once the last stage finished
