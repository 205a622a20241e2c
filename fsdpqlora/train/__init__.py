"""Training, in the workers that torchrun starts (`torchrun -m fsdpqlora.train`, __main__.py).

    trainer.py     the Trainer: set-up, the loop, evaluation, checkpoints, the summary
    step.py        one optimizer step: token-weighted loss over the global batch, one collective
    optim.py       the optimizer over the adapter and the learning-rate schedule
    evaluate.py    the evaluation loss over all ranks, when it is due
    checkpoint.py  resumable checkpoints, written atomically by every rank
    preemption.py  stop signals (SLURM's, SIGTERM) turned into a checkpoint and exit 75
    metrics.py     the progress bar, metrics.jsonl and wandb
"""
