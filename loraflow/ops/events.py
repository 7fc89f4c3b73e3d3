"""`loraflow.data.updated`: the event that says a data source has new content, and the watcher that emits it.

The event's resource is the source: `prefect.resource.id` is `loraflow.stages.data.<name>` (the name a deployment
trigger matches; by default the folder or file name), `loraflow.source` its absolute path; the payload
carries the content fingerprint the data stage keys on (`loraflow.store.sources.source_fingerprint`), so the run a
trigger starts can say which content it was started for. `deployments/prefect.yaml` gives the retraining
deployment a trigger on it (its parameters are taken from the event).

`watch` polls a folder or file every `every` seconds. A change counts once the source has been quiet for
`quiet` seconds (no file added, removed, grown or touched), so a file still being written is not taken
half-way; then the content is fingerprinted and the event emitted if the fingerprint differs from the last
one emitted for this source (kept in `<cache_dir>/watch/`, so a restarted watcher does not emit again for
content it already announced; the first start only records what is there).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loraflow.store.artifacts import default_cache_dir, fingerprint

log = logging.getLogger("loraflow")
EVENT = "loraflow.data.updated"


class WatchError(ValueError):
    """The source cannot be watched; the message says what to pass instead."""


def default_name(source: str) -> str:
    """The resource name of a source when none is given: its folder or file name, e.g. `incoming`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(source).expanduser().resolve().name).strip("-") or "data"


def resource(source: str, name: str | None = None) -> dict[str, str]:
    name = name or default_name(source)
    return {"prefect.resource.id": f"loraflow.stages.data.{name}", "prefect.resource.name": name,
            "loraflow.source": str(Path(source).expanduser().resolve())}


def content_fingerprint(source: str) -> str:
    """What the data stage keys the source's content on (the same files, the same hash)."""
    from loraflow.config import DataConfig
    from loraflow.store.sources import source_fingerprint

    return source_fingerprint(DataConfig(source=str(Path(source).expanduser().resolve())))


def emit_data_updated(source: str, name: str | None = None, fingerprint_: str | None = None):
    """Send `loraflow.data.updated` for `source` to the Prefect server (PREFECT_API_URL) and wait until it is
    sent (a failure raises); returns the event."""
    import asyncio

    from prefect.events.clients import get_events_client
    from prefect.events.schemas.events import Event

    res = resource(source, name)
    event = Event(event=EVENT, resource=res,
                  payload={"fingerprint": fingerprint_ or content_fingerprint(source), "source": res["loraflow.source"]})

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(send())
    return event


def snapshot(source: str) -> tuple:
    """The cheap state a change shows in: (name, size, mtime) of every data file; () when there is none yet."""
    from loraflow.store.sources import DataError, local_files

    try:
        files = local_files(str(Path(source).expanduser()))
    except DataError:
        return ()
    out = []
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed between the listing and the stat: the next poll sees it
            continue
        out.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(out)


@dataclass
class Watcher:
    source: str
    name: str | None = None
    quiet: float = 10.0
    state_file: Path | None = None
    emit: Callable[[str, str | None, str], Any] = emit_data_updated

    def __post_init__(self) -> None:
        self.source = str(Path(self.source).expanduser().resolve())
        if self.state_file is None:
            self.state_file = default_cache_dir(None) / "watch" / f"{fingerprint(self.source)[:16]}.json"
        self._seen = snapshot(self.source)
        self._changed_at = time.monotonic()
        self._last = self._read_state()
        if self._last is None and self._seen:  # first start: what is there now is the baseline, not news
            self._write_state(content_fingerprint(self.source))

    def _read_state(self) -> str | None:
        try:
            return json.loads(self.state_file.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            return None

    def _write_state(self, value: str) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({"source": self.source, "fingerprint": value, "at": time.time()}))
        os.replace(tmp, self.state_file)
        self._last = value

    def poll(self) -> str | None:
        """One look at the source: the fingerprint just announced, or None."""
        now = snapshot(self.source)
        if now != self._seen:
            self._seen, self._changed_at = now, time.monotonic()
            return None
        if not now or time.monotonic() - self._changed_at < self.quiet:
            return None  # nothing there, or still changing
        value = content_fingerprint(self.source)
        if value == self._last:
            return None
        self.emit(self.source, self.name, value)
        self._write_state(value)
        log.info("watch: %s changed: emitted %s (fingerprint %s)", self.source, EVENT, value)
        return value


def watch(source: str, every: float = 60.0, quiet: float = 10.0, name: str | None = None,
          should_stop: Callable[[], bool] = lambda: False) -> None:
    """Poll `source` until `should_stop()` (or Ctrl-C), emitting `loraflow.data.updated` on each settled change."""
    if every <= 0 or quiet < 0:
        raise WatchError(f"watch: --every must be > 0 and --quiet >= 0 (got {every}, {quiet})")
    watcher = Watcher(source, name=name, quiet=quiet)
    print(f"watching {watcher.source} every {every:g} s (quiet period {quiet:g} s) as "
          f"loraflow.stages.data.{name or default_name(source)}; Ctrl-C stops", flush=True)
    while not should_stop():
        value = watcher.poll()
        if value:
            print(f"{EVENT}: {watcher.source} fingerprint {value}", flush=True)
        time.sleep(every)


def parse_seconds(text: str) -> float:
    """'60', '60s', '5m', '1h' -> seconds; a one-line error otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*", text)
    if not match:
        raise WatchError(f"'{text}' is not a duration: write e.g. 30s, 5m or 1h")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
