"""The training loop (``train(cfg)``) and its pieces: the pipeline step and gradient completion."""

from .loop import train, train_step
from .pipeline import local_batch, make_executor, split_batch, sync_model_parallel_grads

__all__ = ["local_batch", "make_executor", "split_batch", "sync_model_parallel_grads", "train", "train_step"]
