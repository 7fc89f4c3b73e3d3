"""A lead, not a lever yet: the CPU dropout's mask from NumPy's SFC64 (seeded by one draw of torch's generator, so a
checkpointed layer's recomputation draws the same mask) against torch's random_, in one process on the same 8
length-sorted SciTLDR batches (SmolLM2 NF4 + LoRA r16, dropout 0.05, checkpointed), three rounds each, alternating.

    uv run python benchmarks/results/variants/2026-12-05-dropout-rng/sfc64.py   # about 3 min
"""
import json, statistics, time, torch, numpy as np
from benchmarks.data import INSTRUCTIONS, REPO
from benchmarks.levers import _load
from loraflow.config import PromptConfig
from loraflow.store.sources import resolve_model_dir
from loraflow.stages.tokenize import bos_prefix, encode_batch, load_tokenizer
from loraflow.stages.train.collators import CompletionCollator
from loraflow.stages.train.trainer import body_and_head, label_only_loss
from loraflow.stages.train.dropout import use_cpu_dropout, _module_class, LANES
model_dir = str(resolve_model_dir("smollm2-gguf", None, None, False))
data = REPO / "runs" / "bench-levers-data"
tok = load_tokenizer(model_dir)
prompt = PromptConfig(style="chat", template=INSTRUCTIONS["scitldr"], max_length=512)
rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
enc = encode_batch({"input": [r["input"] for r in rows], "target": [r["target"][0] for r in rows]}, prompt, tok, bos_prefix(tok))
ex = sorted([{"input_ids": i, "labels": l} for i, l in zip(enc["input_ids"], enc["labels"])], key=lambda e: len(e["input_ids"]))
batches = [ex[i*4:(i+1)*4] for i in range(8)]
m = _load(model_dir, upcast=False, checkpointing=True, dropout=0.05); use_cpu_dropout(m)
parts = body_and_head(m); pad = CompletionCollator(pad_token_id=0)
cls = _module_class(); Masked = cls.forward.__closure__[cls.forward.__code__.co_freevars.index("_Masked")].cell_contents
torch_fwd = cls.forward
def sfc_fwd(self, x):
    if not self.training or self.threshold == -LANES // 2:
        return x
    n = x.numel()
    seed = int(torch.randint(0, 2**62, (1,)))  # one draw of torch's generator: checkpoint replay gives the same seed
    raw = np.random.SFC64(seed).random_raw((n + 3) // 4)
    keep = torch.from_numpy(raw.view(np.int16)[:n]).view(x.shape) >= self.threshold
    return Masked.apply(x, keep, self.scale)
T = {"torch": [], "sfc64": []}
def run(name):
    cls.forward = torch_fwd if name == "torch" else sfc_fwd
    torch.manual_seed(0)
    for i, b in enumerate(batches):
        inp = pad(b); t = time.perf_counter()
        loss = label_only_loss(*parts, inp)[0]; loss.backward()
        T[name].append((i, time.perf_counter() - t)); m.zero_grad()
run("sfc64")
T = {"torch": [], "sfc64": []}
for r in range(3):
    for name in (("torch", "sfc64") if r % 2 == 0 else ("sfc64", "torch")):
        run(name)
ratios = [statistics.median([t for j, t in T["torch"] if j == i]) / statistics.median([t for j, t in T["sfc64"] if j == i]) for i in range(8)]
print("s/step median torch %.3f sfc64 %.3f" % (statistics.median(t for _, t in T["torch"]), statistics.median(t for _, t in T["sfc64"])))
print("per-batch torch/sfc64:", " ".join(f"{x:.3f}" for x in ratios), "median", round(statistics.median(ratios), 3))
