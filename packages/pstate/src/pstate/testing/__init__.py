"""Multi-rank test harness: run a function on N processes over gloo (or NCCL) and get each rank's result.

``Harness`` keeps warm rank processes across calls; ``run`` is the one-off form; the pytest plugin in
:mod:`pstate.testing.plugin` provides the ``run_ranks`` fixture. Failures raise ``RankError`` tagged with
the rank; hangs raise ``RankTimeout`` with every stuck rank's stack.
"""

from .errors import RankError, RankTimeout, error_messages
from .harness import Harness, run

__all__ = ["Harness", "RankError", "RankTimeout", "error_messages", "run"]
