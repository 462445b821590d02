"""What a batch costs on this model and machine, from the batches' measured times: the line
``t(n) = fixed_s + per_item_s * n`` fitted by least squares over recent batches, older ones weighing
less (exponential forgetting, so a machine that gets busier is followed).

The batcher budgets the bulk items it adds to an interactive batch with it: on a CPU a batch's time
grows about linearly with its size (each item is one more row through every layer), so an item costs
about ``per_item_s``; on a GPU the line is nearly flat and an item costs little. Until the sizes seen
vary by at least :data:`MIN_SIZE_SPREAD` (the slope is unknown), the cost of an item is taken as the
mean time per item, the dearest it can be (no fixed part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_SIZE_SPREAD = 1.0
"""Standard deviation of the recent batch sizes (items) from which the fitted slope is trusted."""


@dataclass
class BatchCost:
    decay: float = 0.97
    """Weight of the batches seen so far at each new one (about 23 batches to half weight)."""
    _weight: float = 0.0
    _sizes: float = 0.0
    _times: float = 0.0
    _sizes_squared: float = 0.0
    _sizes_times: float = 0.0

    def observe(self, size: int, seconds: float) -> None:
        """One batch of ``size`` items took ``seconds`` on the model."""
        if size < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        d = self.decay
        self._weight = d * self._weight + 1
        self._sizes = d * self._sizes + size
        self._times = d * self._times + seconds
        self._sizes_squared = d * self._sizes_squared + size * size
        self._sizes_times = d * self._sizes_times + size * seconds

    @property
    def known(self) -> bool:
        return self._weight > 0 and self._sizes > 0

    def per_item_s(self) -> float:
        """The time one more item adds to a batch (0 before any batch was seen)."""
        if not self.known:
            return 0.0
        mean_per_item = self._times / self._sizes
        mean_size = self._sizes / self._weight
        variance = self._sizes_squared / self._weight - mean_size * mean_size
        if variance < MIN_SIZE_SPREAD**2:
            return mean_per_item
        covariance = self._sizes_times / self._weight - mean_size * self._times / self._weight
        return min(max(covariance / variance, 0.0), mean_per_item)

    def predict_s(self, size: int) -> float:
        """The time a batch of ``size`` items is expected to take (0 before any batch was seen)."""
        if not self.known:
            return 0.0
        per_item = self.per_item_s()
        fixed = max(0.0, (self._times - per_item * self._sizes) / self._weight)
        return fixed + per_item * size
