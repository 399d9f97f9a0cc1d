"""What a rank holds: under TP, its split of the logits, with the loss and every gradient those
of one process; under DDP, gradients that are views of its buckets, and no buffer broadcasts."""

import zlib

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, distribute_tensor

from models.gpt_model import GPT, GPTConfig
from models.parallelize import sync_tp_partial_grads, tp_loss_context, wrap_model
from parallel.layout import Layout
from parallel.process_group import DistContext
from tests.conftest import gloo, train_argv
from training.config import load_config
from training.run_setup import build_run, layout_of


def set_weights(model):
    """Seeded weights by name, none zero: the lm_head starts at zero, and zero logits would
    make every vocabulary split look alike."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            full = 1 + 0.5 * torch.randn(p.shape, generator=generator) if p.ndim == 1 else None
            if full is None:
                full = torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements).to_local()
            (p.to_local() if isinstance(p, DTensor) else p).copy_(full)


def loss_and_grads(cfg, layout, ctx):
    """One forward and backward on a fixed batch: the loss, each parameter's whole gradient,
    and the shape of this rank's logits."""
    run = build_run(cfg, layout, ctx, data="random")
    model, forward = run.model, run.forward
    set_weights(model)
    logits = []
    model.lm_head.register_forward_hook(
        lambda _, args, out: logits.append(tuple((out.to_local() if isinstance(out, DTensor) else out).shape))
    )
    with tp_loss_context(layout.tp_enabled):
        loss = forward(*run.train_data.next_batch())  # the same batch on every TP rank
        loss.backward()
    if layout.tp_enabled:
        sync_tp_partial_grads(model, run.tp_mesh)
    grads = {
        n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        for n, p in model.named_parameters()
    }
    return loss.detach(), grads, logits[0]


def tp_worker(rank, world_size, init_file, out_dir):
    with gloo(rank, world_size, init_file):
        torch.manual_seed(0)
        cfg = load_config(train_argv(out_dir, "tp", tp_size=2))
        result = loss_and_grads(
            cfg, layout_of(cfg, world_size), DistContext(rank, world_size, torch.device("cpu"))
        )
        torch.save(result, f"{out_dir}/tp_{rank}.pt")


@pytest.mark.slow
def test_tp_loss_on_split_logits_equals_one_process(tmp_path):
    # Before, lm_head's output was replicated: every TP rank held all the vocabulary's logits.
    mp.spawn(tp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    cfg = load_config(train_argv(tmp_path, "one"))
    loss, grads, logits = loss_and_grads(cfg, Layout(), DistContext(0, 1, torch.device("cpu")))
    vocab = logits[-1]
    for rank in range(2):
        tp_loss, tp_grads, tp_logits = torch.load(tmp_path / f"tp_{rank}.pt")
        assert tp_logits == (*logits[:-1], vocab // 2)
        torch.testing.assert_close(tp_loss, loss, atol=1e-5, rtol=1e-5)
        assert tp_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(tp_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def ddp_counts(rank, world_size):
    """(broadcasts in a forward, distinct gradient storages, parameters) of a DDP model."""
    from tests.test_cuda_path import CountCollectives

    model = GPT(GPTConfig(model_dim=32, n_layer=1, n_head=2, sequence_length=16))
    model.init_weights(0)
    ddp = wrap_model(model, DistContext(rank, world_size, torch.device("cpu")))
    tokens = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(rank))
    with CountCollectives("broadcast") as broadcasts:
        loss = ddp(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    return broadcasts.count, len(storages), len(list(model.parameters()))


def ddp_worker(rank, world_size, init_file, out_dir):
    # The DDP model lives in ddp_counts' frame, so it is freed before the ranks leave the group.
    # Held past it, its reducer would free the destroyed group at exit, joining gloo's worker
    # thread under the GIL that thread waits for: a hang, one run in three here.
    with gloo(rank, world_size, init_file):
        counts = ddp_counts(rank, world_size)
    if rank == 0:
        torch.save(counts, f"{out_dir}/ddp.pt")


@pytest.mark.slow
def test_ddp_gradients_are_bucket_views_and_buffers_are_not_broadcast(tmp_path):
    # Before, every gradient had its own fp32 tensor beside DDP's buckets (4 GB more at 1B),
    # and each forward broadcast the rotary tables from rank 0.
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    broadcasts, storages, params = torch.load(tmp_path / "ddp.pt")
    assert broadcasts == 0
    assert storages < params  # the gradients share the buckets' storage
