"""Activation checkpointing: the same losses as none, with fewer activations kept."""

import pytest
import torch

from models.activation_checkpointing import apply_activation_checkpointing, checkpointed_blocks
from models.gpt_model import GPT, GPTConfig
from tests.conftest import REPO, torchrun
from training.config import ConfigError, load_config
from training.metrics import read_metrics

LOSSES = ("step", "train_loss", "val_loss")


def test_checkpointed_blocks():
    assert checkpointed_blocks(5, "none", 2) == []
    assert checkpointed_blocks(5, "full", 2) == [0, 1, 2, 3, 4]
    assert checkpointed_blocks(5, "selective", 2) == [0, 2, 4]
    assert checkpointed_blocks(5, "selective", 3) == [0, 3]
    with pytest.raises(ValueError, match="must be one of none, full, selective, got 'some'"):
        checkpointed_blocks(5, "some", 2)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--activation_checkpointing", "half"], "activation_checkpointing must be one of"),
        (["--activation_checkpointing", "selective", "--ac_every", "0"], "ac_every must be > 0, got 0"),
        (["--activation_checkpointing", "full", "--ac_every", "3"], "ac_every 3 is read only with"),
    ],
)
def test_bad_settings_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(REPO / "configs/tiny_cpu.yaml"), *flags])


def saved_bytes(mode):
    """The bytes the forward of a small GPT keeps for its backward, and its parameters' grads."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(model_dim=64, n_layer=4, n_head=4, sequence_length=32, vocab_size=256))
    model.init_weights(0)
    apply_activation_checkpointing(model, mode, 2)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return sum(kept), [p.grad.clone() for p in model.parameters()]


def test_checkpointing_keeps_fewer_activations_for_the_same_gradients():
    none, grads = saved_bytes("none")
    selective, selective_grads = saved_bytes("selective")
    full, full_grads = saved_bytes("full")
    assert full < selective < none
    for other in (selective_grads, full_grads):
        for a, b in zip(grads, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def tiny_cpu_argv(runs_dir, name, mode, **overrides):
    """A short tiny_cpu run with activation checkpointing `mode`."""
    values = {
        "runs_dir": runs_dir,
        "run_name": name,
        "num_iterations": 6,
        "val_loss_every": 3,
        "val_tokens": 4096,
        "checkpoint_every": 0,
        "sample_tokens": 0,
        "ns_dtype": "fp32",
        "activation_checkpointing": mode,
        **overrides,
    }
    return ["--config", str(REPO / "configs/tiny_cpu.yaml")] + [
        item for k, v in values.items() for item in (f"--{k}", str(v))
    ]


def losses(run_dir):
    """The run's (step, train_loss, val_loss) records."""
    return [[r.get(k) for k in LOSSES] for r in read_metrics(run_dir)]


def assert_same_losses(records, reference):
    assert [r[0] for r in records] == [r[0] for r in reference] == list(range(1, 7))
    for a, b in zip(records, reference, strict=True):
        assert a[1:] == pytest.approx(b[1:], rel=1e-5, abs=0), a[0]


@pytest.mark.parametrize(
    "mode, overrides",
    [
        ("full", {}),
        ("selective", {}),  # tiny_cpu's two blocks: the first recomputed, the second kept
        ("full", {"compile": True}),
    ],
)
@pytest.mark.slow
def test_one_process_losses_equal_none(tmp_path, mode, overrides):
    import train

    train.main(tiny_cpu_argv(tmp_path, "none", "none", **overrides))
    train.main(tiny_cpu_argv(tmp_path, "ac", mode, **overrides))
    assert_same_losses(losses(tmp_path / "ac"), losses(tmp_path / "none"))


@pytest.mark.slow
@pytest.mark.parametrize("layout, mode", [(["--fs_size", "2"], "full"), (["--tp_size", "2"], "selective")])
def test_two_ranks_losses_equal_none(tmp_path, layout, mode):
    for name, run_mode in (("none", "none"), ("ac", mode)):
        result = torchrun(2, [*tiny_cpu_argv(tmp_path, name, run_mode), *layout])
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(losses(tmp_path / "ac"), losses(tmp_path / "none"))
