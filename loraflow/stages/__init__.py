"""The stages, one module each, with what only they use.

data (splits, chat) -> tokenize (prompts) -> model -> train (its own package: the stage, the Trainer subclass,
the collators, the launcher and the training process, the memory estimate, DDP) -> evaluate (generation,
parity) -> export (gguf); preflight checks a run's inputs before any of them.

Each stage module has `run(config sections, inputs, out) -> summary`: it builds into the folder `out` and never
computes or sees a key. Its Prefect task (`tasks.stages`) asks the store with the key the run computed
(`loraflow.store.chain`), and `loraflow.store.build` runs it on a miss. The train stage is handed its key too,
and keeps its own folder protocol (checkpoints to resume from).
"""
