"""Param groups from the model's roles, the guard against silent mis-grouping, and the builder."""

import math

import pytest
import torch

from models.gpt_model import GPT, GPTConfig
from optimizers import AdamWLion, Dion, Dion2, Muon, NorMuon
from training.config import ConfigError, load_config
from training.param_groups import (
    ParamGroupError,
    build_optimizer,
    build_param_groups,
    check_param_groups,
    newton_schulz_note,
)


@pytest.fixture(scope="module")
def model():
    model = GPT(GPTConfig(model_dim=64, n_layer=2, n_head=4, sequence_length=16))
    model.init_weights(0)
    return model


def config(*argv):
    return load_config(["--model_dim", "64", "--n_layer", "2", "--n_head", "4", *argv])


def by_role(groups):
    return {g["role"]: g for g in groups}


@pytest.mark.parametrize(
    ("optimizer", "cls"),
    [("dion2", Dion2), ("muon", Muon), ("normuon", NorMuon), ("dion", Dion), ("adamw", AdamWLion)],
)
@pytest.mark.parametrize("scalar_opt", ["adamw", "lion"])
def test_groups_follow_the_roles(model, optimizer, cls, scalar_opt):
    cfg = config("--optimizer", optimizer, "--scalar_opt", scalar_opt, "--lr", "0.02", "--scalar_lr", "0.004")
    groups = by_role(build_param_groups(model, cfg))
    assert groups["matrix"]["algorithm"] == optimizer and groups["matrix"]["base_lr"] == 0.02
    assert {groups[r]["algorithm"] for r in ("vector", "embedding", "lm_head")} == {scalar_opt}
    assert groups["embedding"]["weight_decay"] == 0.0
    assert groups["vector"]["weight_decay"] == groups["lm_head"]["weight_decay"] == 0.01
    head_scale = 1 / math.sqrt(64) if scalar_opt == "lion" else 1.0
    assert groups["lm_head"]["base_lr"] == pytest.approx(0.004 * head_scale)
    assert groups["embedding"]["base_lr"] == 0.004
    opt = build_optimizer(list(groups.values()), cfg)
    assert type(opt) is cls
    assert [g["algorithm"] for g in opt.param_groups] == [optimizer, scalar_opt, scalar_opt, scalar_opt]


def test_explicit_lm_head_scale_and_default_scalar_lr(model):
    groups = by_role(build_param_groups(model, config("--lm_head_lr_scale", "0.5", "--lr", "0.02")))
    assert groups["lm_head"]["base_lr"] == 0.01 and groups["vector"]["base_lr"] == 0.02


def test_config_reaches_the_optimizer(model):
    cfg = config(
        "--optimizer",
        "dion2",
        "--ortho_fraction",
        "0.125",
        "--mu",
        "0.9",
        "--selection",
        "random",
        "--decay",
        "full",
        "--adjust_lr",
        "rms_norm",
        "--use_polar_express",
        "false",
        "--seed",
        "4",
    )
    opt = build_optimizer(build_param_groups(model, cfg), cfg)
    group = opt.param_groups[0]
    assert (group["fraction"], group["ef_decay"], group["selection"], group["decay"]) == (
        0.125,
        0.9,
        "random",
        "full",
    )
    assert (group["adjust_lr"], group["use_polar_express"], group["seed"]) == ("rms_norm", False, 4)
    cfg = config(
        "--optimizer", "normuon", "--muon_beta2", "0.9", "--nesterov", "true", "--cautious_wd", "true"
    )
    group = build_optimizer(build_param_groups(model, cfg), cfg).param_groups[0]
    assert (group["muon_beta2"], group["nesterov"], group["cautious_wd"]) == (0.9, True, True)
    cfg = config("--optimizer", "dion", "--ortho_fraction", "0.25")
    assert build_optimizer(build_param_groups(model, cfg), cfg).param_groups[0]["rank_fraction"] == 0.25


def named(model, name):
    return dict(model.named_parameters())[name]


def groups_with(model, move, to_algorithm):
    """The dion2 groups with one parameter moved to a group of `to_algorithm`."""
    groups = [
        {**g, "params": [p for p in g["params"] if p is not move]}
        for g in build_param_groups(model, config("--optimizer", "dion2"))
    ]
    target = next(g for g in groups if g["algorithm"] == to_algorithm)
    target["params"].append(move)
    return groups


@pytest.mark.parametrize("name", ["embed.weight", "lm_head.weight"])
def test_guard_rejects_embedding_or_lm_head_in_the_matrix_group(model, name):
    with pytest.raises(ParamGroupError, match=f"parameter {name} is in the dion2 group"):
        check_param_groups(model, groups_with(model, named(model, name), "dion2"), "dion2")


def test_guard_rejects_a_hidden_matrix_left_out(model):
    groups = groups_with(model, named(model, "blocks.1.mlp.fc.weight"), "adamw")
    with pytest.raises(
        ParamGroupError, match="hidden matrix blocks.1.mlp.fc.weight is left out of the dion2 group"
    ):
        check_param_groups(model, groups, "dion2")


def test_guard_rejects_missing_and_duplicated_parameters(model):
    groups = build_param_groups(model, config())
    missing = [{**g, "params": g["params"][1:]} if g["role"] == "vector" else g for g in groups]
    with pytest.raises(ParamGroupError, match="in no optimizer group: blocks.0.attn_norm.weight"):
        check_param_groups(model, missing, "dion2")
    doubled = [*groups, {**groups[1], "params": groups[1]["params"][:1]}]
    with pytest.raises(ParamGroupError, match="is in two param groups"):
        check_param_groups(model, doubled, "dion2")


def test_selection_metrics(model):
    cfg = config("--optimizer", "dion2", "--ortho_fraction", "0.25")
    opt = build_optimizer(build_param_groups(model, cfg), cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    metrics = opt.selection_metrics()
    assert metrics["selection_coverage_min"] == pytest.approx(0.25)
    assert metrics["selection_coverage_mean"] == pytest.approx(0.25)
    assert metrics["selection_longest_wait"] == 1
    muon = config("--optimizer", "muon")
    assert build_optimizer(build_param_groups(model, muon), muon).selection_metrics() == {}


@pytest.mark.parametrize("optimizer", ["muon", "nordion2"])
def test_per_head_puts_q_k_v_in_a_group_cut_into_heads(model, optimizer):
    cfg = config("--optimizer", optimizer, "--ortho_per_head", "true")
    groups = build_param_groups(model, cfg)
    heads = [g for g in groups if "num_heads" in g]
    assert len(heads) == 1 and heads[0]["num_heads"] == 4 and heads[0]["role"] == "matrix"
    assert {id(p) for p in heads[0]["params"]} == {id(p) for p in model.head_matrices()}
    assert len(heads[0]["params"]) == 3 * 2  # q, k and v of each layer
    opt = build_optimizer(groups, cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # each head is its own matrix: nothing in the shapes refuses it
    with pytest.raises(ConfigError, match="ortho_per_head true is not read by optimizer dion"):
        config("--optimizer", "dion", "--ortho_per_head", "true")


def test_ns_dtype_reaches_the_optimizer_and_is_said_at_the_start(model):
    cpu = torch.device("cpu")
    cfg = config("--optimizer", "nordion2", "--ns_dtype", "bf16")
    assert build_optimizer(build_param_groups(model, cfg), cfg).param_groups[0]["ns_dtype"] == torch.bfloat16
    assert newton_schulz_note(cfg, cpu) == "Newton-Schulz in bf16 on cpu (ns_dtype)"
    # auto: the tests make every CPU one without native bf16 (see conftest)
    cfg = config("--optimizer", "muon")
    assert build_optimizer(build_param_groups(model, cfg), cfg).param_groups[0]["ns_dtype"] is None
    assert (
        newton_schulz_note(cfg, cpu) == "Newton-Schulz in fp32 on cpu (ns_dtype auto: it has no native bf16)"
    )
    assert newton_schulz_note(config("--optimizer", "dion"), cpu) is None
    with pytest.raises(ConfigError, match="ns_dtype fp32 is not read by optimizer dion"):
        config("--optimizer", "dion", "--ns_dtype", "fp32")
