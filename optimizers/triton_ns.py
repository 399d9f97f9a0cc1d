"""Triton kernels for Newton-Schulz: X @ X^T (and b*A + c*A@A) computing only the tiles on and
above the diagonal, mirrored below, batched over a leading dimension.

Precision rule, the same as the PyTorch path's: the products run in the dtype they are given.
bf16 inputs multiply in bf16 with fp32 accumulation; fp32 inputs multiply in full fp32
(`input_precision="ieee"`), never in TF32, which `tl.dot` would otherwise pick on NVIDIA GPUs
and which PyTorch's matmuls do not use unless a user enables it. So `ns_dtype: fp32` gives the
same answer, to fp32 rounding, with and without `use_triton`.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _sym_gram_kernel(
    x_ptr,
    y_ptr,
    out_ptr,
    m,
    n,
    stride_xb,
    stride_xm,
    stride_xn,
    stride_yb,
    stride_ym,
    stride_yn,
    stride_ob,
    stride_om,
    stride_on,
    alpha,
    beta,
    HAS_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per (batch, upper tile): tile (i, j) with i <= j, found from its linear index.
    batch = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    tiles = tl.cdiv(m, BLOCK_M)
    i = 0
    row_len = tiles
    while t >= row_len:
        t -= row_len
        i += 1
        row_len -= 1
    j = i + t
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = j * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    x = x_ptr + batch * stride_xb
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        k = k0 + ks
        a = tl.load(
            x + rows[:, None].to(tl.int64) * stride_xm + k[None, :] * stride_xn,
            mask=(rows[:, None] < m) & (k[None, :] < n),
            other=0.0,
        )
        b = tl.load(
            x + cols[None, :].to(tl.int64) * stride_xm + k[:, None] * stride_xn,
            mask=(cols[None, :] < m) & (k[:, None] < n),
            other=0.0,
        )
        acc += tl.dot(a, b, input_precision="ieee")
    acc = acc * alpha
    mask = (rows[:, None] < m) & (cols[None, :] < m)
    if HAS_Y:
        y = y_ptr + batch * stride_yb
        acc += beta * tl.load(
            y + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn, mask=mask, other=0.0
        )
    out = out_ptr + batch * stride_ob
    value = acc.to(out_ptr.dtype.element_ty)
    tl.store(out + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on, value, mask=mask)
    # The mirror image of an off-diagonal tile: Y is symmetric wherever the kernel is used.
    if i != j:
        tl.store(out + cols[None, :].to(tl.int64) * stride_om + rows[:, None] * stride_on, value, mask=mask)


def kernels_usable(device):
    """Whether the kernels can run on `device`: CUDA, or any device in Triton's CPU interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def sym_gram(x, y=None, alpha=1.0, beta=0.0):
    """alpha * x @ x^T (+ beta * y, y symmetric) for a batch x (b, m, n), from the upper tiles."""
    b, m, n = x.shape
    out = torch.empty(b, m, m, dtype=x.dtype, device=x.device)
    block_m, block_k = (64, 32) if x.device.type == "cuda" else (16, 16)
    tiles = triton.cdiv(m, block_m)
    y_arg = out if y is None else y  # never read when HAS_Y is false
    # Triton launches on the current CUDA device, which need not be the one x lives on.
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _sym_gram_kernel[(b, tiles * (tiles + 1) // 2)](
            x,
            y_arg,
            out,
            m,
            n,
            *x.stride(),
            *y_arg.stride(),
            *out.stride(),
            alpha,
            beta,
            HAS_Y=y is not None,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
        )
    return out
