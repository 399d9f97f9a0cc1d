"""The training FLOPs per token of models/flops.py against torch's own count of the matmuls,
and scripts/flops.py's split of the CPU reproduction's testbed."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.flops import training_flops
from models.gpt_model import GPT, GPTConfig
from scripts.flops import split_table
from tests.conftest import REPO
from training.config import load_config


def test_the_matmul_flops_are_torchs_count_of_a_forward_and_backward():
    model = GPT(GPTConfig(model_dim=64, n_layer=2, n_head=4, sequence_length=32, vocab_size=256))
    model.init_weights(0)
    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens).backward()
    flops = training_flops(model)
    # torch counts the matmuls (the attention kernel is not counted on the CPU).
    assert counter.get_total_flops() == (flops["hidden matrices"] + flops["lm_head"]) * tokens.numel()
    assert flops["attention scores"] == 12 * 2 * 64 * 32


def test_the_gpt2_model_counts_its_matmuls_and_attention():
    model = GPT(GPTConfig(64, 2, 4, 32))
    per_layer = 4 * 64 * 64 + 2 * 4 * 64 * 64  # q, k, v, out; the MLP's two 4x matrices
    assert training_flops(model) == {
        "hidden matrices": 6 * 2 * per_layer,
        "lm_head": 6 * 50304 * 64,
        "attention scores": 12 * 2 * 64 * 32,
    }


def test_the_reproduction_testbed_puts_most_flops_in_the_hidden_matrices():
    table = split_table(load_config(["--config", str(REPO / "configs" / "repro_cpu.yaml")]))
    assert "| hidden matrices | 18,874,368 | 84.2% |" in table
    assert "| matrix | 3,145,728 | 95.9% |" in table
