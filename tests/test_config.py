"""Config loading: YAML plus --key value, unknown keys, types, and value checks."""

import pytest
import torch

from training.config import KEYS, ConfigError, TrainConfig, help_text, load_config, shown_value


@pytest.fixture
def yaml_file(tmp_path):
    def write(text):
        path = tmp_path / "exp.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_yaml_then_cli_override(yaml_file):
    cfg = load_config(["--config", yaml_file("lr: 0.5\nn_layer: 3\n"), "--lr", "0.25", "--compile=true"])
    assert (cfg.lr, cfg.n_layer, cfg.compile) == (0.25, 3, True)
    assert cfg.run_name == "exp"  # defaults to the config file's name


# A value other than its default for every key, and what it needs beside it (an optimizer that
# reads it, or a companion setting).
OTHER_VALUES = {
    "data_dir": "data/shakespeare_bytes",
    "tokenizer": "bytes",
    "run_name": "other",
    "runs_dir": "elsewhere",
    "seed": "3",
    "model_dim": "384",
    "n_layer": "2",
    "n_head": "3",
    "sequence_length": "64",
    "batch_size": "64",
    "device_batch_size": "16",
    "num_iterations": "7",
    "optimizer": "muon",
    "scalar_opt": "lion",
    "lr": "0.03",
    "scalar_lr": "0.004",
    "lm_head_lr_scale": "0.5",
    "weight_decay": "0.1",
    "mu": "0.9",
    "ortho_fraction": "0.25",
    "selection": "random",
    "selection_scope": "global",
    "decay": "full",
    "adjust_lr": "rms_norm",
    "nesterov": ("true", "--optimizer", "muon"),
    "cautious_wd": "true",
    "scheduled_wd": "true",
    "match_muon_rms": "true",
    "use_polar_express": "false",
    "use_gram_newton_schulz": "true",
    "ns_dtype": "bf16",
    "muon_beta2": ("0.9", "--optimizer", "nordion2"),
    "ortho_per_head": "true",
    "diagnostics_every": "5",
    "replicate_mesh_grad_sync": ("true", "--selection", "random"),
    "warmup_ratio": "0.1",
    "warmdown_ratio": "0.3",
    "grad_clip": "1.0",
    "val_loss_every": "50",
    "val_tokens": "4096",
    "checkpoint_every": "100",
    "keep_checkpoints": "3",
    "max_skipped_steps": "2",
    "timeout": "60",
    "preempt_signals": "SIGUSR1",
    "resume": "auto",
    "wandb_project": "project",
    "sample_tokens": "0",
    "dp_size": "2",
    "fs_size": "2",
    "tp_size": "2",
    "activation_checkpointing": "full",
    "ac_every": ("3", "--activation_checkpointing", "selective"),
    "compile": "true",
    "use_triton": "true",
    "device": "cpu",
    "precision": "bf16",
}


def test_every_key_can_be_set_from_the_cli():
    assert OTHER_VALUES.keys() == KEYS.keys(), "give every key a value other than its default here"
    for key, given in OTHER_VALUES.items():
        value, *beside = (given,) if isinstance(given, str) else given
        cfg = load_config([f"--{key}", value, *beside])
        assert str(getattr(cfg, key)).lower() == value.lower() != str(KEYS[key].default).lower(), key


def test_unknown_keys_name_the_closest(yaml_file):
    with pytest.raises(ConfigError, match=r"unknown key 'lrate'; did you mean 'lr'"):
        load_config(["--config", yaml_file("lrate: 0.1\n")])
    with pytest.raises(ConfigError, match=r"unknown key '--num_iteration'; did you mean 'num_iterations'"):
        load_config(["--num_iteration", "5"])
    with pytest.raises(ConfigError, match=r"unknown key '--lerning_rate'; did you mean 'lr'"):
        load_config(["--lerning_rate", "5"])  # through the alias learning_rate


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "fast"], "lr must be float, got 'fast'"),
        (["--n_layer", "2.5"], "n_layer must be int, got 2.5"),
        (["--n_layer", "true"], "n_layer must be int, got True"),
        (["--compile", "1"], "compile must be bool, got 1"),
        (["--seed", "null"], "seed must be int, got None"),
    ],
)
def test_types_are_checked(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(argv)


def test_yaml_types_are_checked(yaml_file):
    with pytest.raises(ConfigError, match="model_dim must be int"):
        load_config(["--config", yaml_file("model_dim: '768'\n")])


def test_a_key_of_a_boolean_or_a_word_takes_both():
    assert load_config(["--use_gram_newton_schulz", "false"]).use_gram_newton_schulz is False
    assert load_config(["--use_gram_newton_schulz", "auto"]).use_gram_newton_schulz == "auto"
    with pytest.raises(
        ConfigError, match="use_gram_newton_schulz must be one of true, false, auto, got 'maybe'"
    ):
        load_config(["--use_gram_newton_schulz", "maybe"])
    with pytest.raises(ConfigError, match="use_gram_newton_schulz must be one of true, false, auto, got '1'"):
        load_config(["--use_gram_newton_schulz", "1"])


def test_string_keys_keep_the_text():
    cfg = load_config(["--run_name", "007", "--wandb_project", "null"])
    assert cfg.run_name == "007" and cfg.wandb_project is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--warmup_ratio", "0.9", "--warmdown_ratio", "0.2"], "warmup_ratio \\+ warmdown_ratio"),
        (["--warmdown_ratio", "1.5"], "warmdown_ratio must lie in \\[0, 1\\]"),
        (["--batch_size", "10", "--device_batch_size", "4"], "multiple of device_batch_size 4"),
        (["--model_dim", "30", "--n_head", "4"], "model_dim 30 must split"),
        (["--num_iterations", "0"], "num_iterations must be > 0"),
        (["--precision", "fp16"], "precision must be one of"),
        (["--run_name", "a/b"], "plain folder name"),
        (["--lr", "-1"], "lr must be >= 0"),
        (
            ["--optimizer", "dion", "--adjust_lr", "rms_norm"],
            "adjust_lr rms_norm is not read by optimizer dion \\(only by dion2, nordion2, muon, normuon\\); "
            "leave it at its default spectral_norm",
        ),
        (["--optimizer", "muon", "--muon_beta2", "0.9"], "muon_beta2 0.9 is not read by optimizer muon"),
        (["--optimizer", "nordion2", "--mu", "1.0"], "mu must lie in \\[0, 1\\), got 1.0"),
        (["--optimizer", "dion", "--ortho_fraction", "0"], "ortho_fraction must lie in \\(0, 1\\], got 0.0"),
        (["--selection", "top"], "selection must be one of l1, random, got 'top'"),
        (
            ["--replicate_mesh_grad_sync", "true"],
            "optimizer dion2: replicate_mesh_grad_sync needs selection random, got selection l1",
        ),
        (
            ["--replicate_mesh_grad_sync", "true", "--optimizer", "dion", "--grad_clip", "1"],
            "grad_clip 1.0 cannot be used with replicate_mesh_grad_sync",
        ),
    ],
)
def test_values_are_checked(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stray"], "expected --key value, got 'stray'"),
        (["--lr"], "--lr needs a value"),
        (["--config", "/no/such.yaml"], "does not exist"),
    ],
)
def test_malformed_command_lines(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_bad_yaml(yaml_file):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(["--config", yaml_file("lr: [\n")])
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(["--config", yaml_file("- 1\n- 2\n")])


def test_shipped_configs_load():
    from tests.conftest import REPO

    shipped = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs").glob("paper/*.yaml"))
    assert len(shipped) == 11
    for path in shipped:
        cfg = load_config(["--config", str(path)])
        assert isinstance(cfg, TrainConfig) and cfg.run_name == path.stem


def test_the_docs_table_is_the_configs_own_definitions():
    import re

    from tests.conftest import REPO

    rows = re.findall(
        r"^\| `(\w+)` \| `([^|]+)` \| (.+) \|$",
        (REPO / "docs" / "configuration.md").read_text(),
        flags=re.MULTILINE,
    )
    assert [row[0] for row in rows] == list(KEYS)
    for name, default, meaning in rows:
        field = KEYS[name]
        assert default == shown_value(field.default), name
        assert meaning == field.metadata["meaning"], name


def test_help_lists_every_key_with_its_type_default_and_meaning():
    text = help_text()
    for name, field in KEYS.items():
        assert f"--{name} (" in text
        assert field.metadata["meaning"].split()[0] in text
    assert "--lr (float, default 0.02)" in text
    assert "--optimizer (str, default dion2; one of dion2, nordion2, muon, normuon, dion, adamw)" in text
    assert "--max_skipped_steps (int, default 0)" in text


@pytest.mark.parametrize("text", ["3e-4", "3E-4", "3.0e-4", ".3e-3", "+3e-4"])
def test_exponent_floats_are_floats_on_the_command_line_and_in_yaml(yaml_file, text):
    assert load_config(["--lr", text]).lr == 0.0003
    assert load_config(["--config", yaml_file(f"lr: {text}\n")]).lr == 0.0003
    assert load_config(["--scalar_lr", text]).scalar_lr == 0.0003  # float or null
    assert load_config(["--warmup_ratio", "5E-1", "--weight_decay", "1e-3"]).weight_decay == 0.001


def test_exponent_numbers_stay_errors_for_int_keys_and_text_for_str_keys(yaml_file):
    with pytest.raises(ConfigError, match="n_layer must be int, got '5E\\+2'"):
        load_config(["--n_layer", "5E+2"])
    with pytest.raises(ConfigError, match="seed must be int"):
        load_config(["--config", yaml_file("seed: 1e3\n")])
    with pytest.raises(ConfigError, match="lr must be >= 0, got -0.01"):
        load_config(["--lr", "-1e-2"])
    assert load_config(["--run_name", "1e3"]).run_name == "1e3"


@pytest.mark.parametrize(("device", "message"), [("tpu:0", "device must be auto, cpu"), ("cuda:0", "CUDA")])
def test_bad_device(device, message):
    from parallel.process_group import DeviceError, pick_device

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match=message):
        pick_device(device)
