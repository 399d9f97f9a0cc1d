"""torch.compile for the optimizers' per-shape math, without recompile storms.

A function compiled the usual way keeps one cache per code object: every new matrix shape
is a guard failure and a recompile, and after `torch._dynamo.config.recompile_limit` (8)
of them it silently runs eagerly. A GPT already has more distinct shapes than that once
Newton-Schulz, selection and update each see every bucket.

Here each distinct input signature (the shapes, strides, dtypes and devices of the tensors,
and the values of the other arguments) gets its own compiled region, which compiles exactly
once (with `fullgraph=True` a second compile is an error, not a silent slowdown). From torch
2.13 a region is `torch.compile(..., isolate_recompiles=True, recompile_limit=1)`. Older
releases (the 2.11 of our GPU image) have neither argument, and Dynamo keeps its cache on the
function's code object: there a region compiles a copy of the function with a code object of
its own, and runs under `recompile_limit=1`. The limit this relies on is
`torch._dynamo.config.accumulated_recompile_limit` (256 by default), the cap on all regions of
one function: past it, new signatures run eagerly, with one warning.

Values that change from step to step (the scheduled lr) must come as 0-d tensors: a Python
number is part of the signature and would compile anew each step.
"""

import functools
import inspect
import types
import warnings

import torch
from torch.utils._pytree import tree_flatten

# The torch.compile backend; tests swap in a counting backend.
BACKEND = "inductor"

# Whether this torch can scope a compiled function's recompiles to one torch.compile call.
ISOLATES_RECOMPILES = "isolate_recompiles" in inspect.signature(torch.compile).parameters

_regions = {}
_warned = set()


def signature(leaf):
    """What a compiled region is specialized on, for one argument."""
    if isinstance(leaf, torch.Tensor):
        return (leaf.shape, leaf.stride(), leaf.dtype, leaf.device)
    return leaf


def run_compiled(fn, *args):
    """fn(*args) through the region compiled for the arguments' signature."""
    leaves, spec = tree_flatten(args)
    key = (fn, BACKEND, spec, tuple(signature(leaf) for leaf in leaves))
    region = _regions.get(key)
    if region is None:
        limit = torch._dynamo.config.accumulated_recompile_limit
        if sum(k[0] is fn for k in _regions) >= limit:
            if fn not in _warned:
                _warned.add(fn)
                warnings.warn(
                    f"{fn.__name__} has {limit} compiled signatures, torch._dynamo.config."
                    "accumulated_recompile_limit: new ones run eagerly",
                    stacklevel=2,
                )
            return fn(*args)
        region = compile_region(fn)
        _regions[key] = region
    return region(*args)


def compile_region(fn):
    """fn compiled as a region of its own that compiles once (see the module docstring)."""
    if ISOLATES_RECOMPILES:
        return torch.compile(
            fn, backend=BACKEND, fullgraph=True, dynamic=False, isolate_recompiles=True, recompile_limit=1
        )
    # code.replace() always builds a new code object, so the copy's cache starts empty.
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    compiled = torch.compile(copy, backend=BACKEND, fullgraph=True, dynamic=False)

    @functools.wraps(fn)
    def region(*args):
        with torch._dynamo.config.patch(recompile_limit=1):
            return compiled(*args)

    return region
