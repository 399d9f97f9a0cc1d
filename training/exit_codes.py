"""The exit codes of train.py, which cluster scripts read to decide what to do next."""

from enum import IntEnum


class ExitCode(IntEnum):
    """How a run ended."""

    FINISHED = 0
    BAD_INPUT = 1  # a one-line error before any work: config, data, checkpoint
    NON_FINITE = 3  # the loss or gradient norm was NaN or inf; the last good checkpoint is kept
    PREEMPTED = 75  # a signal asked the run to stop: it checkpointed its last step (EX_TEMPFAIL)
