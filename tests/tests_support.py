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


def train_briefly(model, tokenizer, prompts: list[str], answer_ids: list[int], steps: int = 120, lr: float = 1e-2):
    """Teach a (peft) model to answer every prompt with `answer_ids`: a plain loop, confident in ~120 steps."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        prompt = tokenizer(prompts[step % len(prompts)])["input_ids"]
        ids = torch.tensor([prompt + answer_ids])
        model(input_ids=ids, labels=torch.tensor([[-100] * len(prompt) + answer_ids])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
