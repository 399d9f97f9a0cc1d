"""microsoft/dion beside ours, for the comparison scripts: its `dion` package imported from a
path, and the same optimizer built on both sides, either each at its defaults or both with
Newton-Schulz in fp32.

Nothing of ours depends on it: only scripts that take `--against PATH` import it.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

from optimizers import Dion2, Dion3, Muon, NorDion2, NorMuon
from optimizers.newton_schulz import coefficients

ALGORITHMS = ("muon", "normuon", "dion2", "nordion2", "dion3")
# Ours and theirs by algorithm; the fraction applies to those that select.
OURS = {"muon": Muon, "normuon": NorMuon, "dion2": Dion2, "nordion2": NorDion2, "dion3": Dion3}
THEIRS = {"muon": "Muon", "normuon": "NorMuon", "dion2": "Dion2", "nordion2": "NorDion2", "dion3": "Dion3"}
SELECTING = ("dion2", "nordion2", "dion3")


def import_reference(path, compiled=False):
    """The `dion` package of a microsoft/dion checkout, or of its `dion` folder, at `path`:
    eager, or with `compiled` as it ships (its torch.compile decorators on).

    Its decorators compile or not when they run, at import, by TORCHDYNAMO_DISABLE; so each
    kind is a copy of its own, imported under its own name with the variable set or unset.
    """
    path = Path(path).resolve()
    if (path / "dion" / "__init__.py").is_file():
        package = path / "dion"
    elif path.name == "dion" and (path / "__init__.py").is_file():
        package = path
    else:
        raise SystemExit(
            f"error: --against {path}: neither a checkout of microsoft/dion (with dion/__init__.py) "
            "nor its dion package folder"
        )
    name = "microsoft_dion_compiled" if compiled else "microsoft_dion_eager"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    saved = os.environ.pop("TORCHDYNAMO_DISABLE", None)
    if not compiled:
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.pop("TORCHDYNAMO_DISABLE", None)
        if saved is not None:
            os.environ["TORCHDYNAMO_DISABLE"] = saved
    return module


def polar_express_fp32(G, epsilon=1e-6):
    """Polar Express in fp32, in the reference's own formulation (A = X X^T on the shorter
    side, B = b A + c A^2, X <- a X + B X, or X B for a tall X), for its `newton_schulz_func`:
    its built-in one computes in bf16 whatever the hardware."""
    steps, safety, _ = coefficients(True)
    X = G.float()
    tall = X.size(-2) > X.size(-1)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + epsilon)
    for a, b, c in steps:
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    return X


def build(reference, algorithm, side, params, fp32, fraction=0.25, lr=0.02, compile=False, gram="auto"):
    """`algorithm` on `params`, ours (side "ours") or theirs ("theirs"), at the side's defaults
    or (with `fp32`) with Newton-Schulz in fp32; ours compiles with `compile` (theirs compiles
    unless dynamo is disabled) and takes `use_gram_newton_schulz=gram` (theirs runs its plain
    Newton-Schulz)."""
    options = {"lr": lr}
    if algorithm in SELECTING:
        options["fraction"] = fraction
    if side == "ours":
        if fp32:
            options["ns_dtype"] = torch.float32
        return OURS[algorithm](params, compile=compile, use_gram_newton_schulz=gram, **options)
    if fp32:
        options["newton_schulz_func"] = polar_express_fp32
    return getattr(reference, THEIRS[algorithm])(params, **options)
