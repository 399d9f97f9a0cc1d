"""The GPT: meta-device construction, deterministic init, roles, causality, sampling."""

import math

import pytest
import torch

from models.gpt_model import GPT, ROLES, GPTConfig

CONFIG = GPTConfig(model_dim=32, n_layer=2, n_head=4, sequence_length=16)


def build(seed, config=CONFIG, meta=True):
    if meta:
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device="cpu")
    else:
        model = GPT(config)
    model.init_weights(seed)
    return model


def test_padded_vocab():
    assert GPTConfig().padded_vocab_size == 50304
    assert GPTConfig(vocab_size=128).padded_vocab_size == 128


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        model = GPT(CONFIG)
    assert all(p.is_meta for p in model.parameters())


def test_init_is_deterministic_and_device_independent():
    a, b, c = build(0), build(0, meta=False), build(1)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2 and pa.any():
            assert not torch.equal(pa, pc), name
    assert torch.equal(a.rotary_cos, b.rotary_cos)


def test_first_loss_is_uniform():
    model = build(0)
    idx = torch.randint(0, 50257, (2, 16))
    assert model(idx, idx).item() == pytest.approx(math.log(50304), abs=1e-5)


def test_roles_cover_every_parameter_once():
    model = build(0)
    roles = model.param_roles()
    assert set(roles) == set(ROLES)
    ids = [id(p) for params in roles.values() for _, p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert [n for n, _ in roles["embedding"]] == ["embed.weight"]
    assert [n for n, _ in roles["lm_head"]] == ["lm_head.weight"]
    assert len(roles["matrix"]) == 6 * CONFIG.n_layer  # q, k, v, out, fc, proj per block
    assert all(p.ndim == 2 for _, p in roles["matrix"])
    assert all(p.ndim == 1 for _, p in roles["vector"])


def test_no_biases_and_untied():
    model = build(0)
    assert all(not n.endswith("bias") for n, _ in model.named_parameters())
    assert model.embed.weight.data_ptr() != model.lm_head.weight.data_ptr()


def test_causal():
    model = build(0)
    # Give the zero-initialised projections weights, so every layer carries signal.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(0, 0.1)
    idx = torch.randint(0, 50257, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50257
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_generate():
    model = build(0)
    with torch.no_grad():
        model.lm_head.weight.normal_()
    prompt = torch.zeros((2, 3), dtype=torch.long)
    out1 = model.generate(prompt, 20, top_k=50, generator=torch.Generator().manual_seed(0))
    out2 = model.generate(prompt, 20, top_k=50, generator=torch.Generator().manual_seed(0))
    assert out1.shape == (2, 23) and torch.equal(out1, out2)
    assert out1.max() < 50257  # padding ids are never sampled
    greedy = model.generate(prompt, 3, temperature=0)
    assert torch.equal(greedy[0], greedy[1])


def test_bad_head_split():
    with pytest.raises(ValueError, match="n_head 5"):
        GPT(GPTConfig(model_dim=32, n_layer=1, n_head=5))
