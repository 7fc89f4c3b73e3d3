"""The train stage. To change training, read these and `config.TrainConfig`:

- stage.py: the stage (train_adapter: TrainingArguments, the run's folders, checkpoints, resume, metrics)
- trainer.py: CompletionTrainer (the loss at label positions only, the length-grouped sampler)
- collators.py: padding a batch
- dropout.py: the LoRA dropout on a CPU (the same dropout, from fewer random draws)
- callbacks.py: every TrainerCallback the stage adds (throughput, last step saved, save-and-stop, progress, MLflow)
- distributed.py: several processes through torchrun (DDP)
- ../launch.py: the training process started with the run, the stages asked of it before training, its request,
  its errors
- ../worker.py: the training process itself (`python -m loraflow.stages.worker`): its signals, the stages it runs
  before training (pre-flight, tokenize, model), its request
- ../memory.py: the memory estimate behind `gradient_checkpointing: auto` and the pre-flight check
"""
