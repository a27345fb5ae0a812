"""The training loop's pieces: the pipeline step, gradient completion, and (later) the loop itself."""

from .pipeline import local_batch, make_executor, sync_model_parallel_grads

__all__ = ["local_batch", "make_executor", "sync_model_parallel_grads"]
