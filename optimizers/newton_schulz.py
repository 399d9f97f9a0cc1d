"""Batched Newton-Schulz orthonormalization, shared by Muon, NorMuon and Dion2.

All matrices of one shape go through one chain of batched matmuls. Each step applies
X <- a X + (b A + c A^2) X with A = X X^T, on the orientation where A is the small side.
"""

import math

import torch

# One (a, b, c) for all five steps: the classic quintic. Singular values land in about [0.7, 1.2].
QUINTIC = ((3.4445, -4.7750, 2.0315),) * 5
# Polar Express (Amsel et al., 2025): per-step minimax-optimal coefficients, safe in bf16.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Polar Express's coefficients assume the spectrum starts a little below 1.
POLAR_EXPRESS_SAFETY = 1.02


def coefficients(use_polar_express):
    """The (a, b, c) list and the normalisation (scale, eps) of the chosen iteration."""
    if use_polar_express:
        return POLAR_EXPRESS, POLAR_EXPRESS_SAFETY, 1e-6
    return QUINTIC, 1.0, 1e-7


def newton_schulz_flops(m, n, use_polar_express=True):
    """The FLOPs of `newton_schulz` on one m x n matrix: per step, with X the wide orientation
    (s x l, s <= l), A = X X^T (2 s^2 l), A A (2 s^3) and (b A + c A A) X (2 s^2 l)."""
    short, long = min(m, n), max(m, n)
    return len(coefficients(use_polar_express)[0]) * (4 * short * short * long + 2 * short**3)


def gram(x, block_rows=None):
    """x @ x^T for a batch x (b, m, n), using its symmetry where that pays.

    On the CPU (for m >= 128 and n >= 256) only the row blocks on and above the diagonal are
    multiplied and then mirrored, which saves up to half the flops; on this project's 2-core
    machines it paid from 128 rows up, not at 96, and not for a 128 x 128 A^2 (0.28 ms against
    0.19 for one bmm). Elsewhere one bmm beats several small ones.
    """
    m = x.size(-2)
    if block_rows is None:
        if x.device.type != "cpu" or m < 128 or x.size(-1) < 256:
            return torch.bmm(x, x.mT)
        block_rows = max(48, math.ceil(m / 8))
    out = x.new_empty(x.size(0), m, m)
    for start in range(0, m, block_rows):
        stop = min(start + block_rows, m)
        upper = torch.bmm(x[:, start:stop], x[:, start:].mT)
        out[:, start:stop, start:] = upper
        out[:, start:, start:stop] = upper.mT
    return out


def torch_products(X, b, c):
    """b A + c A^2 with A = X X^T; A is symmetric, so A^2 = A A^T."""
    A = gram(X)
    return gram(A).mul_(c).add_(A, alpha=b)


def triton_products(X, b, c):
    """b A + c A^2 with A = X X^T, both products in the Triton kernel."""
    from optimizers.triton_ns import sym_gram  # lazy: triton is optional

    A = sym_gram(X)
    return sym_gram(A, A, alpha=c, beta=b)


def newton_schulz(x, use_polar_express=True, dtype=torch.float32, out_dtype=None, use_triton=False):
    """Orthonormalize each matrix of x (..., m, n): returns about U V^T of its SVD.

    The work runs in `dtype`; the result is in `out_dtype` (default: x's dtype). Tall
    matrices are transposed so that X X^T is the smaller Gram matrix, and transposed back.
    With `use_triton`, the two symmetric products of each step run in the Triton kernels.
    """
    steps, safety, eps = coefficients(use_polar_express)
    tall = x.size(-2) > x.size(-1)
    X = x.mT if tall else x
    X = X.to(dtype, copy=True)
    X /= torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) * safety + eps
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    products = triton_products if use_triton else torch_products
    for a, b, c in steps:
        X = torch.baddbmm(X, products(X, b, c), X, beta=a, alpha=1.0)
    X = X.reshape(*batch_shape, *X.shape[-2:])
    return (X.mT if tall else X).to(out_dtype or x.dtype)


def orthogonality_error(x):
    """How far the matrix x is from orthonormal, over its singular values sigma: a 2-element
    tensor of the RMS of sigma - 1 and the largest |sigma - 1|, left on x's device. The RMS
    says how much of the matrix is orthonormal; the largest is set by its smallest directions,
    which five steps cannot lift from near 0."""
    distance = torch.linalg.svdvals(x.float()) - 1
    return torch.stack([distance.square().mean().sqrt(), distance.abs().max()])
