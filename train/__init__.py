"""Training: `python -m kvjax.train {lm,eval,eagle,coprocessor}` (`kvjax.train.cli`).

loop.py: the trainer core every task shares (run config and its field domains, AdamW under
  warmup + cosine, the compiled-step cache, batch checks, the run loop, metrics and plots).
checkpoints.py: a run's files (run.json, orbax checkpoints and their damage checks, the best
  state). errors.py: TrainError, TrainInterrupted.
lm.py, eagle.py, coprocessor.py: the tasks (`train`, their configs, losses and validation).
corpus.py, data.py, text.py, tokenizer.py: the Shakespeare corpus (TFDS + grain), batches,
  plain-text data, tokenizer training. metrics.py: metrics.jsonl and the loss plot.

The modules are imported on use (`from kvjax.train import lm`), so `import kvjax` never loads
the training stack.
"""
