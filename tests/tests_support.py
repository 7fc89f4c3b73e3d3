"""Small helpers shared by the test modules (not fixtures)."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "mouse", "sheep", "goat"]


def write_examples(path: Path, n: int = 96) -> Path:
    """A learnable toy task: the target repeats two words of the input."""
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(n):
            color, animal = rng.choice(COLORS), rng.choice(ANIMALS)
            text = f"Report {i}: yesterday we saw a {color} {animal} near the old river bank at dawn."
            fh.write(json.dumps({"text": text, "summary": f"a {color} {animal}"}) + "\n")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
