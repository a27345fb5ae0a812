"""Inference: a paged KV cache, continuous batching, sampling, tensor parallelism, and ``trainer serve``.

Example (one process, TP=1)::

    from trainer.infer import Request, SamplingParams, engine_for, load_chunk, inference_state
    with default_group(device), inference_state(tp=1) as ps:
        chunk, cfg, tokenizer = load_chunk("ckpts", ps)
        _, engine = engine_for(chunk, tokenizer)
        (out,) = engine.generate([Request("def ", SamplingParams(max_tokens=32, temperature=0))])
"""

from .engine import Completion, Engine, Output, Request
from .load import default_blocks, engine_for, find_checkpoint, inference_state, load_chunk
from .paged import BlockPool, PagedBatch, Segment
from .runner import ModelRunner
from .sampling import SamplingParams, sample
from .scheduler import Scheduler

__all__ = [
    "BlockPool",
    "Completion",
    "Engine",
    "ModelRunner",
    "Output",
    "PagedBatch",
    "Request",
    "SamplingParams",
    "Scheduler",
    "Segment",
    "default_blocks",
    "engine_for",
    "find_checkpoint",
    "inference_state",
    "load_chunk",
    "sample",
]
