"""Prefect concurrency slots a dead run still holds, released before a later run waits on them.

The train, evaluate and export tasks carry the `gpu` tag; `loraflow up` limits it to 1 slot. Prefect takes the
slot with a lease the running task renews; a run killed by SIGKILL or the OOM killer stops renewing, and the
lease expires ~60 s later. A full server's repossessor then frees the slot, but a temporary server (`loraflow
run` without PREFECT_API_URL) runs no such service, and with leases kept in the server's memory (Prefect's
default) a slot taken under an earlier temporary server stays taken forever.

So: loraflow's servers keep leases in files (`loraflow.ops.tempserver.LEASE_STORAGE`); a task holding a slot
writes `<PREFECT_HOME>/loraflow-slot-holders/<task run id>.json` (host, pid); and before a run submits a
tagged task, `wait_for_slots` releases every lease whose holder is a dead process on this machine, or
that has expired, and logs what it waits for while the limit stays full.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from uuid import UUID

import anyio

from loraflow.ops import tempserver
from loraflow.procs import gone, identity
from loraflow.ops.tempserver import LEASE_STORAGE


def _holders_dir() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser() / "loraflow-slot-holders"


@contextmanager
def holding() -> Iterator[None]:
    """Inside a tagged task: record which process holds its slots, for as long as it runs."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None or not ctx.task_run.tags:
        yield
        return
    folder = _holders_dir()
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{ctx.task_run.id}.json"
    record.write_text(json.dumps({**identity(), "task_run": ctx.task_run.name}))
    try:
        yield
    finally:
        record.unlink(missing_ok=True)


def _dead_holder(task_run_id: UUID) -> str | None:
    """'task run NAME (pid N, gone)' when the recorded holder is a process of this machine that is gone."""
    record = _holders_dir() / f"{task_run_id}.json"
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if gone(info) is not True:  # alive, or another machine's: its lease expires instead
        return None
    return f"task run {info.get('task_run', task_run_id)} (pid {info['pid']}, gone)"


async def _release_stale(client: Any, tag: str) -> tuple[dict | None, list[str], list[str]]:
    """Release the leases on `tag:<tag>` that dead or expired holders keep; returns (the limit as it is now or
    None when there is none, what was released, who still holds a slot)."""
    from prefect.exceptions import ObjectNotFound
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage
    from prefect.settings import get_current_settings

    try:
        limit = await client.read_global_concurrency_limit_by_name(f"tag:{tag}")
    except ObjectNotFound:
        return None, [], []
    ours = tempserver.current() is not None  # a temporary server runs no repossessor: its leases are ours to expire
    if not ours and get_current_settings().server.concurrency.lease_storage != LEASE_STORAGE:
        return limit.model_dump(), [], []  # the leases are in a server's memory: its repossessor frees them
    storage = ConcurrencyLeaseStorage()
    released: list[str] = []
    for lease_id in await storage.read_expired_lease_ids() if ours else []:
        lease = await storage.read_lease(lease_id)
        if lease is not None and limit.id in lease.resource_ids:
            await client.release_concurrency_slots_with_lease(lease_id)
            released.append(f"lease {lease_id} (expired)")
    holders = []
    for lease_id, holder in await storage.list_holders_for_limit(limit.id):
        dead = _dead_holder(holder.id) if holder.type == "task_run" else None
        if dead is not None:
            await client.release_concurrency_slots_with_lease(lease_id)
            (_holders_dir() / f"{holder.id}.json").unlink(missing_ok=True)
            released.append(dead)
        else:
            holders.append(f"{holder.type} {holder.id}")
    limit = await client.read_global_concurrency_limit_by_name(f"tag:{tag}")
    if ours and limit.active_slots > len(holders):
        # Slots no lease accounts for: taken under a server that kept its leases in memory and is gone.
        # Counted twice, a moment apart, so a slot being taken right now (slot first, then its lease) is not freed.
        await anyio.sleep(1)
        again = await client.read_global_concurrency_limit_by_name(f"tag:{tag}")
        now = [h for _, h in await storage.list_holders_for_limit(limit.id)]
        if again.active_slots > len(now) and again.active_slots == limit.active_slots:
            from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

            await client.update_global_concurrency_limit(f"tag:{tag}", GlobalConcurrencyLimitUpdate(active_slots=len(now)))
            released.append(f"{again.active_slots - len(now)} slot(s) held by no lease")
        limit = await client.read_global_concurrency_limit_by_name(f"tag:{tag}")
    return limit.model_dump(), released, holders


def wait_for_slots(tags: list[str], what: str, logger: Any, poll: float = 2.0) -> list[str]:
    """Before submitting a task with `tags`: free the slots dead runs hold, then wait (saying for what) until
    each tag's limit has a free slot; Prefect then takes it as usual. Returns the tags a limit exists for: the task
    is submitted with those only, since Prefect asks the server for a slot of every tag a task carries, and on a
    temporary SQLite server that request for a limit that is not there was answered 503 (an error Prefect's
    server calls retryable) and retried ~2 s later in half the benchmark's cold runs."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    limited: list[str] = []

    async def check(tag: str) -> tuple[bool, str]:
        async with get_client() as client:
            limit, released, holders = await _release_stale(client, tag)
        for item in released:
            logger.warning("%s: released the `%s` slot held by %s", what, tag, item)
        if limit is not None and tag not in limited:
            limited.append(tag)
        if limit is None or not limit["active"] or limit["active_slots"] < limit["limit"]:
            return True, ""
        return False, (f"{what}: waiting for a `{tag}` slot ({limit['active_slots']} of {limit['limit']} taken, by "
                       f"{', '.join(holders) or 'runs whose leases have not expired yet'})")

    for tag in tags:
        said = None
        while True:
            free, why = run_coro_as_sync(check(tag))
            if free:
                break
            if why != said:
                logger.info("%s", why)
                said = why
            time.sleep(poll)
    return limited
