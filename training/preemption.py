"""Preemption: the signals that ask a run to checkpoint its step and stop.

A handler only notes the signal. The training loop asks `requested` once per step and every
rank agrees on it in the step's one all-reduce, so all ranks stop after the same step, even
when the signal reached them at different times (or only some of them).
"""

import signal
import threading

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


def parse_signals(text):
    """The signal names of a `preempt_signals` value ("none": no signal); ValueError names a bad one."""
    if text.strip().lower() == "none":
        return ()
    names = tuple(name.strip().upper() for name in text.split(","))
    for name in names:
        if name not in SIGNALS:
            raise ValueError(
                f"preempt_signals must be comma-separated names from {', '.join(SIGNALS)}, or none; "
                f"got '{name}' in '{text}'"
            )
    return names


class PreemptionHandler:
    """Notes the first of `names` that arrives; leaving the `with` block restores the previous
    handlers.

    Signal handlers can only be installed from the main thread; elsewhere (a run driven from
    a worker thread) nothing is installed and `requested` stays False.
    """

    def __init__(self, names):
        self.received = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    @property
    def requested(self):
        """Whether a preemption signal has arrived at this process."""
        return self.received is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Restore the handlers that were there before."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
