"""The allowed values of the optimizers' hyperparameters, by constructor argument name.

Every range and every list of choices lives here once: the optimizers check their param
groups against it, and the training config checks its keys against it through the registry.
"""

import math
from typing import NamedTuple

ADJUST_LR = ("spectral_norm", "rms_norm", None)
SELECTIONS = ("l1", "random")
DECAYS = ("selective", "full")
SCOPES = ("local", "global")
QR_METHODS = ("cholesky_qr", "qr")
# Newton-Schulz on the Gram matrix: always, never, or per shape by its cost (newton_schulz.gram_pays).
GRAM_NEWTON_SCHULZ = (True, False, "auto")


class Range(NamedTuple):
    """An interval of numbers, each end open or closed."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value):
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self):
        if self.high == math.inf:
            return f"be {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"lie in {left}{self.low:g}, {self.high:g}{right}"


FRACTION = Range(0, 1, low_open=True, high_open=False)
DECAY_RATE = Range(0, 1)
NON_NEGATIVE = Range(0)

RANGES = {
    "lr": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "epsilon": NON_NEGATIVE,
    "beta1": DECAY_RATE,
    "beta2": DECAY_RATE,
    "mu": DECAY_RATE,
    "ef_decay": DECAY_RATE,
    "muon_beta2": DECAY_RATE,
    "fraction": FRACTION,
    "rank_fraction": FRACTION,
}
CHOICES = {
    "adjust_lr": ADJUST_LR,
    "selection": SELECTIONS,
    "decay": DECAYS,
    "selection_scope": SCOPES,
    "qr_method": QR_METHODS,
    "use_gram_newton_schulz": GRAM_NEWTON_SCHULZ,
}


def choice_text(choices):
    """Choices as a config file writes them: null for None, true and false for the booleans."""
    return ", ".join(
        "null" if c is None else str(c).lower() if isinstance(c, bool) else str(c) for c in choices
    )


def check_value(name, value, shown=None):
    """Raise ValueError, naming the value as `shown` (default: `name`), when `value` is not
    allowed for the hyperparameter `name`; names this module does not know pass unchecked."""
    shown = shown or name
    if name in RANGES and value not in RANGES[name]:
        raise ValueError(f"{shown} must {RANGES[name]}, got {value}")
    if name in CHOICES and value not in CHOICES[name]:
        raise ValueError(f"{shown} must be one of {choice_text(CHOICES[name])}, got '{value}'")


def check_compressed_sync(selection):
    """Raise ValueError unless a selection can run under compressed sync (random only: with
    l1, each replica would select by its own momentum, and the replicas would disagree)."""
    if selection != "random":
        raise ValueError(
            f"replicate_mesh_grad_sync needs selection random, got selection {selection}: l1 selects by "
            "the full momentum, which no replica holds"
        )
