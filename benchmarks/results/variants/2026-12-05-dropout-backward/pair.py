"""The CPU dropout's backward as its own product (grad.mul(keep).mul_(scale)) against aten.native_dropout_backward,
in one process on the same 8 length-sorted batches (SciTLDR rows, SmolLM2 NF4 + LoRA r16 with dropout 0.05, checkpointed),
alternating three rounds each. 3-5x faster alone on a (4, 400, d) tensor, no faster in a step: not kept.

    uv run python benchmarks/results/variants/2026-12-05-dropout-backward/pair.py   # about 3 min
"""
import statistics, time, torch
from benchmarks.levers import _load, scitldr_data
from loraflow.stages.train.collators import CompletionCollator
from loraflow.stages.train.trainer import body_and_head, label_only_loss
from loraflow.stages.train.dropout import use_cpu_dropout, _module_class
model_dir, _, _, ex, _ = scitldr_data(32, 12, 512)
ex = sorted(ex, key=lambda e: len(e["input_ids"]))
batches = [ex[i*4:(i+1)*4] for i in range(8)]
m = _load(model_dir, upcast=False, checkpointing=True, dropout=0.05)
print("replaced", use_cpu_dropout(m))
parts = body_and_head(m); pad = CompletionCollator(pad_token_id=0)
cls = _module_class(); Masked = cls.forward.__closure__[cls.forward.__code__.co_freevars.index("_Masked")].cell_contents
new_bwd = Masked.backward
def old_bwd(ctx, grad):
    (keep,) = ctx.saved_tensors
    return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None
T = {"old": [], "new": []}
def run(name):
    Masked.backward = staticmethod(old_bwd if name == "old" else new_bwd)
    torch.manual_seed(0)
    for i, b in enumerate(batches):
        inp = pad(b); t = time.perf_counter()
        loss = label_only_loss(*parts, inp)[0]; loss.backward()
        T[name].append((i, time.perf_counter() - t)); m.zero_grad()
run("new")  # warm-up
T = {"old": [], "new": []}
for r in range(3):
    for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
        run(name)
ratios = []
for i in range(8):
    o = [t for j, t in T["old"] if j == i]; n = [t for j, t in T["new"] if j == i]
    ratios.append(statistics.median(o) / statistics.median(n))
print("s/step median old %.3f new %.3f" % (statistics.median(t for _, t in T["old"]), statistics.median(t for _, t in T["new"])))
print("per-batch old/new:", " ".join(f"{x:.3f}" for x in ratios), "median", round(statistics.median(ratios), 3))
