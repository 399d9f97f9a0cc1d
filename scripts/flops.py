"""Where a config's training FLOPs go: the hidden matrices (the orthonormal optimizers' share),
the lm_head and the attention scores, per token and as shares of the total.

    python scripts/flops.py --config configs/repro_cpu.yaml [--key value ...] [--write FILE]
"""

import argparse
import sys

import torch

from models.flops import training_flops
from models.gpt_model import GPT
from scripts.results import results_file
from training.config import ConfigError, load_config
from training.model_setup import gpt_config


def split_table(cfg):
    """The markdown table of the FLOPs split and of the parameters of the model of `cfg`."""
    shape = gpt_config(cfg)
    with torch.device("meta"):
        model = GPT(shape)
    flops = training_flops(model)
    total = sum(flops.values())
    params = {role: sum(p.numel() for _, p in named) for role, named in model.param_roles().items()}
    lines = [
        f"model_dim {cfg.model_dim}, n_layer {cfg.n_layer}, sequence_length {cfg.sequence_length}, "
        f"tokenizer {cfg.tokenizer} ({shape.padded_vocab_size} padded ids)",
        "",
        "| part | FLOPs per token | share |",
        "|---|---:|---:|",
        *(f"| {part} | {value:,} | {value / total:.1%} |" for part, value in flops.items()),
        f"| total | {total:,} | 100.0% |",
        "",
        "| parameters | count | share |",
        "|---|---:|---:|",
        *(f"| {role} | {n:,} | {n / sum(params.values()):.1%} |" for role, n in params.items()),
    ]
    return "\n".join(lines)


def main(argv):
    """Print the split of the config on the command line (`--write FILE` also writes it to a
    results file)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--write", default=None)
    args, config_argv = parser.parse_known_args(argv)
    try:
        cfg = load_config(config_argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    with results_file(args.write, "flops.py", argv, None, "Counted, not measured.", markdown=True):
        print(split_table(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
