"""What a layout costs per rank and step at a scale we cannot run: the optimizer's traffic, its
Newton-Schulz FLOPs, memory, and an estimated step time.

    python scripts/plan_layout.py --params 1B --world 64 --layout 8,8,1 --optimizer muon,dion2 \\
        --fraction 0.5,0.25
    python scripts/plan_layout.py --config configs/dion2_160m.yaml --world 8 --layout 1,4,2 --device h200

`--layout dp,fs,tp` splits `--world` ranks (its product must be the world). `--params` takes a
model of the table below; `--config` any config (its batch and optimizer settings too).
`--fraction` is Dion2's and NorDion2's `ortho_fraction` (Dion's rank fraction); each optimizer
that reads it gets a row per fraction.

The bytes, FLOPs and memory are those of one rank (`--rank`), from planning/layout_plan.py:
the optimizers' own sizing functions walked over the layout's blocks, checked by the tests
against the bytes the optimizers count under torchrun. A global Dion2 selection is taken to
fall as a local one would. The step time is an estimate from named assumptions, printed with
it: the model's FLOPs at `--mfu` of the device's bf16 peak, Newton-Schulz at
`--ns_efficiency` of it, and each collective at the bandwidth of its slowest link (NVLink
within a node of `--gpus_per_node`, InfiniBand across nodes), nothing overlapped. The model's
own traffic (DDP's gradient all-reduce, FSDP's gathers and reduce-scatters, TP's activation
all-reduces) is counted by formula, apart from the optimizer's.
"""

import argparse
import sys

import torch

from models.flops import training_flops
from models.gpt_model import GPT
from optimizers.comm_plan import KINDS
from optimizers.registry import reads
from parallel.layout import LayoutError
from planning.layout_plan import MEMORY, PlanError, local_numel, plan_rank
from scripts.results import results_file
from training.config import CHOICES, ConfigError, load_config_for
from training.model_setup import gpt_config
from training.run_setup import layout_of

# Models by size: the paper's 1B (configs/paper/1b.yaml), and an 8B of our GPT's shape.
PRESETS = {
    "160M": ["--config", "configs/dion2_160m.yaml"],
    "1B": ["--config", "configs/paper/1b.yaml"],
    "8B": [
        *("--config", "configs/paper/1b.yaml", "--model_dim", "4096", "--n_layer", "38", "--n_head", "32"),
        *("--sequence_length", "4096", "--batch_size", "512"),
    ],
}
# Assumed device figures: dense bf16 peak (TFLOP/s), memory (GiB), and per-GPU bandwidth in
# one direction (GB/s): NVLink 4 (900 GB/s both ways) and one 400 Gb/s InfiniBand NDR NIC.
DEVICES = {
    "h100": {"peak_tflops": 989.0, "memory_gib": 80, "nvlink_gbps": 450.0, "ib_gbps": 50.0},
    "h200": {"peak_tflops": 989.0, "memory_gib": 141, "nvlink_gbps": 450.0, "ib_gbps": 50.0},
}
GIB = 2**30


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--params", choices=PRESETS, help="a model of PRESETS")
    shape.add_argument("--config", help="a train.py config")
    parser.add_argument("--world", type=int, required=True, help="ranks (GPUs)")
    parser.add_argument("--layout", required=True, help="dp,fs,tp: replicas, FSDP shards, TP ranks")
    parser.add_argument("--optimizer", default="muon,dion2", help="comma-separated optimizers to compare")
    parser.add_argument("--fraction", default=None, help="comma-separated ortho_fraction values")
    parser.add_argument("--selection_scope", choices=("local", "global"), default=None)
    parser.add_argument("--rank", type=int, default=0, help="the rank whose step is planned")
    parser.add_argument(
        "--device_batch_size",
        type=int,
        default=None,
        help="sequences per micro-batch (default: the config's); the batch must split over dp x fs x it",
    )
    parser.add_argument("--ns_dtype", choices=("bf16", "fp32"), default="bf16", help="Newton-Schulz's dtype")
    parser.add_argument("--device", choices=DEVICES, default="h100", help="the assumed device figures")
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--mfu", type=float, default=0.4, help="the model's share of the bf16 peak")
    parser.add_argument("--ns_efficiency", type=float, default=0.5, help="Newton-Schulz's share of the peak")
    parser.add_argument(
        "--write",
        default=None,
        help="also write the report to this markdown file, with command and commit",
    )
    for name in DEVICES["h100"]:
        parser.add_argument(f"--{name}", type=float, default=None, help=f"overrides the device's {name}")
    args = parser.parse_args(argv)
    try:
        sizes = [int(x) for x in args.layout.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        parser.error(f"--layout must be three positive integers dp,fs,tp, got '{args.layout}'")
    if args.world < 1 or args.gpus_per_node < 1:
        parser.error(f"--world and --gpus_per_node must be >= 1, got {args.world} and {args.gpus_per_node}")
    if not 0 <= args.rank < args.world:
        parser.error(f"--rank must lie in [0, {args.world}), got {args.rank}")
    args.optimizers = [n.strip() for n in args.optimizer.split(",") if n.strip()]
    unknown = [n for n in args.optimizers if n not in CHOICES["optimizer"]]
    if unknown or not args.optimizers:
        parser.error(
            f"--optimizer '{args.optimizer}': unknown {', '.join(unknown) or 'empty list'}; allowed: "
            f"{', '.join(CHOICES['optimizer'])}, comma-separated"
        )
    for name in ("mfu", "ns_efficiency"):
        if not 0 < getattr(args, name) <= 1:
            parser.error(f"--{name} must lie in (0, 1], got {getattr(args, name)}")
    args.sizes = sizes
    args.figures = {k: getattr(args, k) or v for k, v in DEVICES[args.device].items()}
    return args


def configs(args):
    """[(label, cfg)] of each optimizer, and each fraction of those that read it."""
    base = PRESETS[args.params] if args.params else ["--config", args.config]
    dp, fs, tp = args.sizes
    base = [*base, "--dp_size", str(dp), "--fs_size", str(fs), "--tp_size", str(tp)]
    if args.device_batch_size is not None:
        base += ["--device_batch_size", str(args.device_batch_size)]
    fractions = args.fraction.split(",") if args.fraction else [None]
    out = []
    for name in args.optimizers:
        for fraction in fractions if reads(name, "ortho_fraction") else [None]:
            extra = ["--ortho_fraction", fraction] if fraction else []
            if args.selection_scope and reads(name, "selection_scope"):
                extra += ["--selection_scope", args.selection_scope]
            cfg = load_config_for([*base, *extra], name)
            label = name + (f" {cfg.ortho_fraction}" if reads(name, "ortho_fraction") else "")
            out.append((label, cfg))
    return out


def link_gbps(ranks, args):
    """The bandwidth of a group's slowest link: NVLink within one node, else InfiniBand."""
    nodes = {r // args.gpus_per_node for r in ranks}
    return args.figures["nvlink_gbps"] if len(nodes) == 1 else args.figures["ib_gbps"]


def collective_seconds(kind, world, received, sent, gbps):
    """The time of one collective at `gbps`: a ring all-reduce moves 2 (w - 1) / w of the
    buffer; an all-gather or all-to-all what the rank receives or sends, whichever is more."""
    moved = 2 * received / world if kind == "all_reduce" else max(received, sent)
    return moved / (gbps * 1e9)


def model_traffic_seconds(cfg, model, layout, rank, args):
    """The model's own traffic per step, by formula: DDP's all-reduce of fp32 gradients, FSDP's
    all-gathers of bf16 weights (forward and backward) and reduce-scatter of fp32 gradients,
    TP's all-reduces of bf16 activations (two per block in the forward, two in the backward)."""
    groups = layout.groups(rank)
    local = sum(local_numel(n, tuple(p.shape), layout, rank) for n, p in model.named_parameters())
    seconds = 0.0
    if layout.sharded:
        world = layout.fs
        gathered = local * (world - 1)  # every other shard of the rank's TP slice
        if world > 1:
            seconds += (2 * 2 * gathered + 4 * gathered) / (link_gbps(groups["fs"], args) * 1e9)
        if layout.dp > 1:  # HSDP: the shards' gradients all-reduced over the replicas
            seconds += 2 * (layout.dp - 1) / layout.dp * local * 4 / (link_gbps(groups["dp"], args) * 1e9)
    elif layout.dp > 1:
        seconds += 2 * (layout.dp - 1) / layout.dp * local * 4 / (link_gbps(groups["dp"], args) * 1e9)
    if layout.tp > 1:
        tokens = cfg.batch_size * cfg.sequence_length / (layout.dp * layout.fs)
        activations = 4 * cfg.n_layer * tokens * cfg.model_dim * 2
        seconds += 2 * (layout.tp - 1) / layout.tp * activations / (link_gbps(groups["tp"], args) * 1e9)
    return seconds


def estimate(cfg, layout, rank, plan, args):
    """{part: seconds} of one step on `rank`."""
    with torch.device("meta"):
        model = GPT(gpt_config(cfg))
    flops = sum(training_flops(model).values()) * cfg.batch_size * cfg.sequence_length / layout.world_size
    peak = args.figures["peak_tflops"] * 1e12
    groups = layout.groups(rank)
    optimizer = sum(
        collective_seconds(kind, world, received, sent, link_gbps(groups[group], args))
        for kind, group, world, received, sent in plan.traffic.calls
    )
    return {
        "compute": flops / (peak * args.mfu),
        "model comm": model_traffic_seconds(cfg, model, layout, rank, args),
        "newton-schulz": plan.ns_flops / (peak * args.ns_efficiency),
        "optimizer comm": optimizer,
    }


def report(rows, layout, args):
    """The table of every planned optimizer on one rank."""
    figures = args.figures
    print(
        f"rank {args.rank} of {layout.world_size} ({layout}); assumed {args.device}: "
        f"{figures['peak_tflops']:.0f} TFLOP/s bf16, model at {args.mfu:.0%} of it, Newton-Schulz at "
        f"{args.ns_efficiency:.0%}; NVLink {figures['nvlink_gbps']:.0f} GB/s within {args.gpus_per_node}-GPU "
        f"nodes, InfiniBand {figures['ib_gbps']:.0f} GB/s across; {figures['memory_gib']:.0f} GiB; "
        f"Newton-Schulz in {args.ns_dtype}"
    )
    print()
    header = ["optimizer", *(f"{k} MiB" for k in KINDS), "sent MiB", "NS GFLOP"]
    header += ["weights GiB", "grads GiB", "state GiB", "logits GiB", "of memory"]
    header += ["step s", "optim s", "optim share"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for label, plan, seconds in rows:
        total = sum(seconds.values())
        optim = seconds["newton-schulz"] + seconds["optimizer comm"]
        cells = [label, *(f"{plan.traffic.received[k] / 2**20:,.1f}" for k in KINDS)]
        cells += [f"{sum(plan.traffic.sent.values()) / 2**20:,.1f}", f"{plan.ns_flops / 1e9:,.1f}"]
        cells += [f"{plan.memory[k] / GIB:.2f}" for k in MEMORY]
        cells.append(f"{sum(plan.memory.values()) / GIB / figures['memory_gib']:.1%}")
        cells += [f"{total:.3f}", f"{optim:.3f}", f"{optim / total:.1%}"]
        print("| " + " | ".join(cells) + " |")
    print()
    for label, _, seconds in rows:
        print(f"{label}: " + ", ".join(f"{part} {value:.3f} s" for part, value in seconds.items()))


def main(argv=None):
    """Command-line entry point."""
    args = parse_args(argv)
    planned = configs(args)
    layout = layout_of(planned[0][1], args.world)
    rows = []
    for label, cfg in planned:
        plan = plan_rank(cfg, layout, args.rank, torch.bfloat16 if args.ns_dtype == "bf16" else torch.float32)
        rows.append((label, plan, estimate(cfg, layout, args.rank, plan, args)))
    note = "A plan from the assumptions below, not a measurement."
    command = sys.argv[1:] if argv is None else argv
    with results_file(args.write, "plan_layout.py", command, None, note, markdown=True):
        report(rows, layout, args)
    return rows


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, LayoutError, PlanError) as e:
        sys.exit(f"error: {e}")
