"""Tensor and sequence parallel layers, mappings, vocab-parallel cross entropy and TP-aware RNG.

Every layer and function takes its tensor-parallel group explicitly (a ``pstate`` axis or a process
group). Activations are ``[seq, batch, hidden]``; sequence parallelism splits dimension 0. Weights keep
``nn.Linear``'s ``[out, in]`` shape and are initialised so that ``tp=N`` holds exactly the slices of the
``tp=1`` weights (see :mod:`tp_layers.init`).
"""

from . import init
from .cross_entropy import vocab_parallel_cross_entropy
from .embedding import VocabParallelEmbedding, padded_vocab_size
from .errors import TensorParallelError
from .linear import ColumnParallelLinear, RowParallelLinear
from .linear_fn import column_parallel_linear, row_parallel_linear
from .mappings import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence_region,
    reduce_from_region,
    reduce_scatter_to_sequence_region,
    scatter_to_region,
    scatter_to_sequence_region,
)
from .params import (
    allreduce_sequence_parallel_grads,
    is_sequence_parallel,
    mark_sequence_parallel,
    mark_tensor_parallel,
    reduce_sequence_parallel_grads_in_backward,
    sequence_parallel_params,
    tensor_parallel_dim,
)
from .recompute import recompute
from .rng import MODEL_PARALLEL, RNGTracker, seed_tensor_parallel

__all__ = [
    "MODEL_PARALLEL",
    "ColumnParallelLinear",
    "RNGTracker",
    "RowParallelLinear",
    "TensorParallelError",
    "VocabParallelEmbedding",
    "allreduce_sequence_parallel_grads",
    "column_parallel_linear",
    "copy_to_region",
    "gather_from_region",
    "gather_from_sequence_region",
    "init",
    "is_sequence_parallel",
    "mark_sequence_parallel",
    "mark_tensor_parallel",
    "padded_vocab_size",
    "recompute",
    "reduce_from_region",
    "reduce_scatter_to_sequence_region",
    "reduce_sequence_parallel_grads_in_backward",
    "row_parallel_linear",
    "scatter_to_region",
    "scatter_to_sequence_region",
    "seed_tensor_parallel",
    "sequence_parallel_params",
    "tensor_parallel_dim",
    "vocab_parallel_cross_entropy",
]
