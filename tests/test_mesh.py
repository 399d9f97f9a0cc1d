"""The DP x FSDP x TP layout checks, which run before any work."""

import pytest

from tests.test_train import run_cli
from training.config import ConfigError, load_config
from training.mesh import mesh_sizes


def sizes(world, *argv):
    return mesh_sizes(load_config(["--n_head", "6", "--model_dim", "768", *argv]), world)


def test_no_sizes_means_data_parallel_on_all_ranks():
    assert sizes(1) == (1, 1, 1)
    assert sizes(8) == (8, 1, 1)


def test_unset_sizes_are_one():
    assert sizes(4, "--dp_size", "4") == (4, 1, 1)


@pytest.mark.parametrize(
    ("world", "argv", "message"),
    [
        (4, ["--dp_size", "2"], r"dp_size x fs_size x tp_size = 2 x 1 x 1 = 2 must equal the world size 4"),
        (8, ["--dp_size", "2", "--fs_size", "2"], r"= 2 x 2 x 1 = 4 must equal the world size 8"),
        (4, ["--tp_size", "4"], r"tp_size 4 must divide the n_head \(6\)"),
        (
            5,
            ["--tp_size", "5", "--n_head", "5", "--model_dim", "640"],
            r"tp_size 5 must divide the padded vocabulary",
        ),
        (2, ["--dp_size", "0", "--fs_size", "2"], r"dp_size must be >= 1, got 0"),
        (4, ["--fs_size", "2", "--dp_size", "2"], r"FSDP and tensor parallelism are not built yet"),
        (2, ["--tp_size", "2"], r"FSDP and tensor parallelism are not built yet"),
    ],
)
def test_bad_layouts(world, argv, message):
    with pytest.raises(ConfigError, match=message):
        sizes(world, *argv)


@pytest.mark.slow
def test_a_bad_layout_is_one_line_before_any_work(tmp_path):
    from tests.conftest import train_argv

    result = run_cli([*train_argv(tmp_path / "runs", "m"), "--dp_size", "2"])
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: dp_size x fs_size x tp_size = 2 x 1 x 1 = 2 must equal the world size 1"
    )
    assert not (tmp_path / "runs").exists()
