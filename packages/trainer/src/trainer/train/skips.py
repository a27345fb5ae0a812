"""Which non-finite steps a run skips and which stop it.

In fp16 the loss scaler finds an overflow in the scaled gradients now and then, by design: the step is
skipped and the scale lowered. That is counted, never a failure. ``on_nan="stop"`` stops on a non-finite
loss, on a non-finite gradient without a loss scaler (fp32, bf16: a real divergence), and after
``max_skipped_steps`` skipped steps in a row (a scale that no longer recovers); ``"skip"`` skips every
such step but still stops after that many in a row.
"""

from __future__ import annotations

import math

from ..exits import NotFinite


class SkipCounter:
    """Counts skipped steps (all, fp16 overflows, in a row) and raises :class:`NotFinite` when one stops
    the run."""

    def __init__(self, on_nan: str, max_in_a_row: int, scaled: bool) -> None:
        self.on_nan, self.max_in_a_row, self.scaled = on_nan, max_in_a_row, scaled
        self.skipped = self.overflows = self.in_a_row = 0

    def check(self, step: int, loss: float, norm: float, skipped: bool) -> bool:
        """Account for ``step`` (1-based); return whether it was skipped."""
        overflow = self.scaled and skipped and math.isfinite(loss)
        skipped = skipped or not math.isfinite(loss) or not math.isfinite(norm)
        if not skipped:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.overflows += overflow
        self.in_a_row += 1
        if self.on_nan == "stop" and not overflow:
            raise NotFinite(
                f"step {step}: the loss ({loss}) or gradient norm ({norm}) is not finite "
                "(train.on_nan='stop'; 'skip' skips such steps)"
            )
        if self.in_a_row >= self.max_in_a_row:
            what = "fp16 loss-scale overflows" if overflow else "non-finite losses or gradients"
            raise NotFinite(
                f"step {step}: {self.in_a_row} steps in a row were skipped for {what} "
                f"(train.max_skipped_steps={self.max_in_a_row})"
            )
        return True

    def summary(self) -> str:
        """One line for the end of the run."""
        return f"skipped steps: {self.skipped} ({self.overflows} fp16 loss-scale overflows)"
