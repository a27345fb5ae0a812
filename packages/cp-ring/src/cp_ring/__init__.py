"""Context parallel attention in plain PyTorch: ring (p2p, zigzag), all-to-all (Ulysses) and the two combined
(hierarchical), sequence sharding.

Sequences are split along their sequence dimension over a CP group (:func:`shard_sequence`, zigzag by
default); :func:`ring_attention`, :func:`ulysses_attention` and :func:`hierarchical_attention` attend over
the whole sequence from each rank's part. Every function takes its group explicitly, as a
``pstate.Axis`` (``ps.cp``) or a ``ProcessGroup``. Gradients of parameters replicated over CP ranks are
reduced over ``ps.dp_cp``.
"""

from .all_to_all import all_to_all_hp2sp, all_to_all_sp2hp
from .errors import ContextParallelError
from .hierarchical import hierarchical_attention
from .kernel import AttentionKernel, MathKernel
from .kernel_choice import KERNEL_NAMES, make_kernel
from .ring import ring_attention
from .sdpa_kernel import SDPAKernel
from .sharding import shard_sequence, unshard_sequence
from .ulysses import document_mask, ulysses_attention, zigzag_permutation

__all__ = [
    "KERNEL_NAMES",
    "AttentionKernel",
    "ContextParallelError",
    "MathKernel",
    "SDPAKernel",
    "all_to_all_hp2sp",
    "all_to_all_sp2hp",
    "document_mask",
    "hierarchical_attention",
    "make_kernel",
    "ring_attention",
    "shard_sequence",
    "ulysses_attention",
    "unshard_sequence",
    "zigzag_permutation",
]
