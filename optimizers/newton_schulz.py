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
# After which steps (0-based) the Gram form restarts from X, by compute dtype.
# In bf16 a rounding that makes an eigenvalue of R negative runs away at every later step; the
# rule is measured in docs/results/newton_schulz_restarts.md.
GRAM_RESTARTS = {torch.float32: (), torch.float64: (), torch.bfloat16: (1, 3)}
# `auto` runs the Gram form where its FLOPs are at most this share of the plain form's: on
# the CPU its time follows its FLOPs (docs/results/bench_newton_schulz_gram_cpu.md).
GRAM_PAYS = 0.85


def coefficients(use_polar_express):
    """The (a, b, c) list and the normalisation (scale, eps) of the chosen iteration."""
    if use_polar_express:
        return POLAR_EXPRESS, POLAR_EXPRESS_SAFETY, 1e-6
    return QUINTIC, 1.0, 1e-7


def gram_restarts(dtype):
    """After which steps the Gram form restarts from X in `dtype`: GRAM_RESTARTS, and the
    low-precision rule for dtypes it does not list."""
    return GRAM_RESTARTS.get(dtype, GRAM_RESTARTS[torch.bfloat16])


def newton_schulz_flops(m, n, use_polar_express=True, use_gram=False, dtype=torch.float32):
    """The FLOPs of `newton_schulz` on one m x n matrix (X short x long), counting every product
    as a full one. Plain, per step: A = X X^T and (b A + c A^2) X (2 s^2 l each), A^2 (2 s^3).
    Gram with r restarts: R = X X^T and Q X once each and at each restart (2 s^2 l each); per
    step R^2, per step but the first after a start Q <- P Q, and per step but the last and
    the restarting ones R <- R P^2 (two products); every s x s product 2 s^3."""
    short, long = min(m, n), max(m, n)
    steps = len(coefficients(use_polar_express)[0])
    if not use_gram:
        return steps * (4 * short * short * long + 2 * short**3)
    r = len(gram_restarts(dtype))
    small_products = steps + (steps - 1 - r) + 2 * (steps - 1 - r)
    return 4 * (1 + r) * short * short * long + 2 * small_products * short**3


def gram_pays(m, n, dtype, use_polar_express=True):
    """The `auto` rule: the Gram form where its FLOPs are at most GRAM_PAYS of the plain
    form's (where the long side is at least 2x the short one), in fp32 or fp64 only.
    In bf16 the Gram form can run away on the ill-conditioned momenta of real training even
    with restarts (a compiled bf16 step of a small GPT did), so `auto` keeps it plain there."""
    if dtype.itemsize < 4:
        return False
    plain = newton_schulz_flops(m, n, use_polar_express)
    return newton_schulz_flops(m, n, use_polar_express, True, dtype) <= GRAM_PAYS * plain


def use_gram(setting, m, n, dtype, use_polar_express=True):
    """Whether `use_gram_newton_schulz` = `setting` (True, False or "auto") runs an m x n
    matrix in the Gram form."""
    return gram_pays(m, n, dtype, use_polar_express) if setting == "auto" else setting


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


def torch_gram(x, y=None, alpha=1.0, beta=0.0):
    """alpha x x^T + beta y (y symmetric), by `gram`: the signature of the Triton kernel's."""
    out = gram(x)
    if alpha != 1.0:
        out.mul_(alpha)
    return out if y is None else out.add_(y, alpha=beta)


def triton_gram(x, y=None, alpha=1.0, beta=0.0):
    """alpha x x^T + beta y (y symmetric) in the Triton kernel."""
    from optimizers.triton_ns import sym_gram  # lazy: triton is optional

    return sym_gram(x, y, alpha=alpha, beta=beta)


def plain_steps(X, steps, use_triton):
    """The iteration on X itself: each step multiplies the long side twice. A = X X^T is
    symmetric, so b A + c A^2 = b A + c A A^T is one symmetric product too."""
    sym = triton_gram if use_triton else torch_gram
    for a, b, c in steps:
        A = sym(X)
        X = torch.baddbmm(X, sym(A, A, alpha=c, beta=b), X, beta=a, alpha=1.0)
    return X


def gram_steps(X, steps, use_triton, restarts=()):
    """The same iteration on the short side's Gram matrix R = X X^T.

    Every step's factor P = a I + b R + c R^2 is a polynomial in R, so the steps multiply X
    from the left by Q, the product of the Ps, and R evolves as P R P; the long side is
    touched to form R and to apply Q at the end. Rounding breaks the commuting the
    recurrence assumes, most in bf16: after each step in `restarts` X is rebuilt as Q X and
    R from it. All products but Q's and R P^2 are symmetric (`gram` or the Triton kernel).
    """
    sym = triton_gram if use_triton else torch_gram
    R, Q = sym(X), None
    last = len(steps) - 1
    for i, (a, b, c) in enumerate(steps):
        P = sym(R, R, alpha=c, beta=b)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else torch.bmm(P, Q)
        if i in restarts:
            X, Q = torch.bmm(Q, X), None
            R = sym(X)
        elif i < last:
            R = torch.bmm(R, sym(P))
            R = R.add_(R.mT.clone()).mul_(0.5)  # symmetric again, as the next sym(R) assumes
    return X if Q is None else torch.bmm(Q, X)


def newton_schulz(
    x,
    use_polar_express=True,
    dtype=torch.float32,
    out_dtype=None,
    use_triton=False,
    use_gram=False,
    restarts=None,
):
    """Orthonormalize each matrix of x (..., m, n): returns about U V^T of its SVD.

    The work runs in `dtype`; the result is in `out_dtype` (default: x's dtype). Tall
    matrices are transposed so that X X^T is the smaller Gram matrix, and transposed back.
    With `use_triton`, the symmetric products run in the Triton kernels; with `use_gram`, the
    steps run on the Gram matrix (`gram_steps`), restarted after `restarts` (default: the
    dtype's GRAM_RESTARTS).
    """
    steps, safety, eps = coefficients(use_polar_express)
    tall = x.size(-2) > x.size(-1)
    X = x.mT if tall else x
    X = X.to(dtype, copy=True)
    X /= torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) * safety + eps
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    if use_gram:
        X = gram_steps(X, steps, use_triton, gram_restarts(dtype) if restarts is None else restarts)
    else:
        X = plain_steps(X, steps, use_triton)
    X = X.reshape(*batch_shape, *X.shape[-2:])
    return (X.mT if tall else X).to(out_dtype or x.dtype)


def orthogonality_error(x):
    """How far the matrix x is from orthonormal, over its singular values sigma: a 2-element
    tensor of the RMS of sigma - 1 and the largest |sigma - 1|, left on x's device. The RMS
    says how much of the matrix is orthonormal; the largest is set by its smallest directions,
    which five steps cannot lift from near 0."""
    distance = torch.linalg.svdvals(x.float()) - 1
    return torch.stack([distance.square().mean().sqrt(), distance.abs().max()])
