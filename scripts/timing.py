"""Timing shared by the benchmark scripts."""

import time

import torch


def synchronize(device):
    """Wait for the device's queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(calls, steps, warmup, device):
    """Time each of `calls` ({name: function}) once per round, in a rotating order, so that
    the machine's noise falls on all alike; returns {name: [seconds, ...]} of the rounds
    after the first `warmup`."""
    names = list(calls)
    times = {name: [] for name in names}
    for i in range(warmup + steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times
