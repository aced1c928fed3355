"""What an iteration would cost without swapping: a model of iteration time learned while m = 0 (pure, no torch).

The expansion controller compares iterations at m > 0 against it, so overhead that is not a stall (copy threads
competing with compute for CPU cores, or for memory bandwidth) is still seen. Iteration time is modeled as
``a + b * num_tokens + c * context_tokens`` (fixed cost such as reading weights, per-token cost, attention over
the KV read), fitted by exponentially weighted least squares with a small ridge so a feature that never varies
(e.g. context not reported) just gets no weight. Predictions are only trusted near the data it has seen.

It also measures its own error: every sample it is given is first predicted from the samples before it, and the
mean absolute relative miss of those held-out predictions is ``error``. The controller counts only the part of
an overhead reading beyond it: a 5% epsilon cannot be judged against a reference that is itself 3% off.

A linear fit is good near the loads it saw and can be far off between them: a box around warm-up's prefill chunks
and 6-request decodes also holds 2-request decodes at long context, which it never saw (on the bench it read 12-14%
"overhead" there where the in-step measurement said 2-3%). So the error is also kept per load bucket (an octave of
tokens by an octave of context tokens), and ``reference`` answers only in a bucket where it has been tested (a
held-out prediction there), with the larger of its overall error and that bucket's.
"""

from __future__ import annotations

# Feature scales keep the normal equations well conditioned (iteration seconds vs token counts).
_TOKEN_SCALE = 1e3
_CONTEXT_SCALE = 1e5
# Once warm, the fit is refreshed every this many samples, not after each: the model learns from every step at
# m = 0 on the engine thread, where solving after every one was most of what the controller cost per step. A fit a
# few samples old (of ~100 that weigh, at decay 0.99) predicts the same; held-out predictions stay held out.
_REFIT_EVERY = 4


def _det3(a: list[list[float]]) -> float:
    return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))


def _solve3(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solve the 3x3 normal equations by Cramer's rule; None if singular.

    NOTE: not numpy: this runs on the engine thread after every step at m = 0, where numpy's per-call overhead
    (about 0.2 ms there, caches cold after the forward pass) was most of what adaptive expansion cost over
    ``--expansion off`` when the KV fits. The ridge keeps the system positive definite, so Cramer is stable."""
    det = _det3(a)
    scale = max(abs(v) for row in a for v in row)
    if not det or abs(det) <= 1e-15 * scale ** 3:
        return None
    return [_det3([[b[i] if j == k else a[i][j] for j in range(3)] for i in range(3)]) / det for k in range(3)]


def load_bucket(num_tokens: int, context_tokens: int) -> tuple[int, int]:
    """Octaves of tokens and context tokens: 1, 2-3, 4-7, ... (0 alone)."""
    return int(num_tokens).bit_length(), int(context_tokens).bit_length()


class _Miss:
    """Exponentially weighted mean of |held-out relative miss|."""

    __slots__ = ("total", "weight", "count")

    def __init__(self) -> None:
        self.total = self.weight = 0.0
        self.count = 0

    def add(self, miss: float, decay: float) -> None:
        self.total, self.weight, self.count = decay * self.total + miss, decay * self.weight + 1.0, self.count + 1

    @property
    def mean(self) -> float:
        return self.total / self.weight


class LatencyBaseline:
    """Exponentially weighted linear model of no-swap iteration seconds."""

    def __init__(self, decay: float = 0.99, min_samples: int = 8, extrapolation: float = 4.0,
                 ridge: float = 1e-6, min_held_out: int = 4) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if extrapolation < 1.0:
            raise ValueError(f"extrapolation must be >= 1, got {extrapolation}")
        self.decay, self.min_samples, self.ridge = decay, min_samples, ridge
        self.extrapolation = extrapolation
        self._xtx = [[0.0] * 3 for _ in range(3)]
        self._xty = [0.0] * 3
        self._coef: list[float] | None = None
        self._fitted_at = 0  # num_samples when _coef was solved
        self.num_samples = 0
        self._tok_range = (float("inf"), 0.0)
        self._ctx_range = (float("inf"), 0.0)
        self.min_held_out = min_held_out
        self._miss = _Miss()  # all held-out predictions
        self._bucket_miss: dict[tuple[int, int], _Miss] = {}  # per load_bucket

    @staticmethod
    def _features(num_tokens: int, context_tokens: int) -> list[float]:
        return [1.0, num_tokens / _TOKEN_SCALE, context_tokens / _CONTEXT_SCALE]

    def add(self, seconds: float, num_tokens: int, context_tokens: int = 0) -> None:
        """One iteration observed without swapping (first predicted, to measure ``error``)."""
        if (pred := self.predict(num_tokens, context_tokens)) is not None:
            miss = abs(seconds / pred - 1.0)
            self._miss.add(miss, self.decay)
            self._bucket_miss.setdefault(load_bucket(num_tokens, context_tokens), _Miss()).add(miss, self.decay)
        x = self._features(num_tokens, context_tokens)
        for i in range(3):
            self._xty[i] = self.decay * self._xty[i] + x[i] * seconds
            for j in range(3):
                self._xtx[i][j] = self.decay * self._xtx[i][j] + x[i] * x[j]
        self.num_samples += 1
        self._tok_range = (min(self._tok_range[0], num_tokens), max(self._tok_range[1], num_tokens))
        self._ctx_range = (min(self._ctx_range[0], context_tokens), max(self._ctx_range[1], context_tokens))
        if self.num_samples - self._fitted_at >= _REFIT_EVERY or self.num_samples < 4 * self.min_samples:
            self._coef = None

    def error(self, min_held_out: int | None = None) -> float | None:
        """Mean absolute relative error of held-out predictions (see module docstring); None before
        ``min_held_out`` of them (default: the constructor's)."""
        need = self.min_held_out if min_held_out is None else min_held_out
        return self._miss.mean if self._miss.count >= need else None

    def reference(self, num_tokens: int, context_tokens: int = 0) -> tuple[float, float] | None:
        """(expected no-swap seconds, the error to allow for) at a load like one it has been tested on (a held-out
        prediction in the same load_bucket), once ``error`` is known; None elsewhere. The error is the larger of
        the overall one and the bucket's."""
        miss = self._bucket_miss.get(load_bucket(num_tokens, context_tokens))
        if miss is None or (err := self.error()) is None or (pred := self.predict(num_tokens, context_tokens)) is None:
            return None
        return pred, max(err, miss.mean)

    def predict(self, num_tokens: int, context_tokens: int = 0) -> float | None:
        """Expected no-swap seconds, or None when the model has too few samples or would extrapolate far.

        Predictions extend up to ``extrapolation`` times beyond the fitted token / context ranges (the controller
        uses 1: cost is not linear far out, e.g. CPU caches); a feature that barely varied has an unreliable
        slope, so for it at most 1.25x is trusted.
        """
        if self.num_samples < self.min_samples:
            return None
        for value, (lo, hi) in ((num_tokens, self._tok_range), (context_tokens, self._ctx_range)):
            limit = self.extrapolation if hi >= 1.5 * lo + 1 else min(1.25, self.extrapolation)
            if value > limit * hi + 1 or value < lo / limit - 1:
                return None
        if self._coef is None:
            lam = self.ridge * max(1e-12, sum(self._xtx[i][i] for i in range(3)))
            a = [[self._xtx[i][j] + (lam if i == j else 0.0) for j in range(3)] for i in range(3)]
            self._coef, self._fitted_at = _solve3(a, self._xty), self.num_samples
            if self._coef is None:
                return None
        x = self._features(num_tokens, context_tokens)
        pred = sum(c * v for c, v in zip(self._coef, x, strict=True))
        return pred if pred > 0 else None
