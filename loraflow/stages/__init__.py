"""The stages, one module each, with what only they use.

data (splits, chat) -> tokenize (prompts) -> model -> train (its own package: the stage, the Trainer subclass,
the collators, the launcher and the training process, the memory estimate, DDP) -> evaluate (generation,
parity) -> export (gguf); preflight checks a run's inputs before any of them. A stage builds into the folder
the store gives it; the key naming that folder comes from the run (`loraflow.store.chain`).
"""
