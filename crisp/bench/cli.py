"""``python -m crisp.bench WHAT``: the benchmarks' command line (:mod:`crisp.bench` lists them)."""

from __future__ import annotations

import argparse

from crisp import bench
from crisp.bench import attention, grid, step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crisp.bench", description=bench.__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    att = sub.add_parser("attention", help="training-step time per attention implementation")
    att.add_argument("--encoders", nargs="+", default=list(attention.ENCODERS), choices=list(attention.ENCODERS))
    att.add_argument("--steps", type=int, default=None, help="timed steps per implementation (all rounds)")
    att.add_argument("--rounds", type=int, default=None, help="interleaved rounds the steps are split into")
    att.add_argument("--shapes", nargs="+", default=None, help="BATCHxLENGTH, e.g. 32x66 (default: all of SHAPES)")
    att.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"],
                     help="kernels launched one by one, or replayed from a CUDA graph (GPU only)")
    att.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                     help="fp32 with TF32 matmuls, or bf16 autocast (what crisp trains with on a GPU by default)")
    att.add_argument("--cpu", action="store_true", help="time on the CPU even if there is a GPU")
    att.add_argument("--cpu-max-length", type=int, default=128, help="longest shape timed on the CPU")
    att.add_argument("--out", default="multirun/bench/attention.json")
    ker = sub.add_parser("kernel", help="attention-probability kernels alone, forward and backward")
    ker.add_argument("--shapes", nargs="+", default=None, help="BATCHxLENGTH, e.g. 32x66 (default: all of SHAPES)")
    ker.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ker.add_argument("--reps", type=int, default=None, help="calls per timing, 5 timings, median (20 GPU, 2 CPU)")
    ker.add_argument("--cpu", action="store_true", help="time on the CPU even if there is a GPU")
    ker.add_argument("--cpu-max-length", type=int, default=128, help="longest shape timed on the CPU")
    ker.add_argument("--out", default="multirun/bench/kernel.json")
    sw = sub.add_parser("sweep", help="grid wall-clock vs one-at-a-time untuned runs")
    sw.add_argument("--dir", default="multirun/bench/sweep")
    sw.add_argument("--phase", choices=["baseline", "grid", "both"], default="both")
    sw.add_argument("--baseline-seeds", type=lambda v: [int(s) for s in v.split(",")], default=[1, 2],
                    help="comma-separated: one untuned run per seed, one after another (default 1,2)")
    sw.add_argument("--mps", action="store_true", help="run the grid under NVIDIA MPS (one GPU, many runs)")
    sw.add_argument("--grid", nargs="*", default=["experiment=paper", "hydra/launcher=parallel"],
                    help="overrides of the grid phase only")
    sw.add_argument("overrides", nargs="*", help="overrides for both phases, e.g. model=minilm-l6 logger=csv")
    gr = sub.add_parser("grid", help="a crisp.run command timed from start to report, beside a Trainer peer")
    gr.add_argument("--dir", required=True, help="where bench_grid.json and the peer's output go")
    gr.add_argument("--peer-model", default=None, help="a model folder for the peer run (none: no peer)")
    gr.add_argument("--peer-data", default=None, help="a GLUE SST-2 folder (train.tsv, dev.tsv) for the peer")
    gr.add_argument("--peer-epochs", type=int, default=1)
    gr.add_argument("overrides", nargs="+", help="the crisp.run command's arguments, with hydra.sweep.dir=...")
    pe = sub.add_parser("peer", help="one plain Hugging Face Trainer run (bf16, batch 32, dynamic padding)")
    pe.add_argument("--model", required=True)
    pe.add_argument("--data", required=True)
    pe.add_argument("--epochs", type=int, default=1)
    pe.add_argument("--dir", required=True)
    step.add_parser(sub)
    args = parser.parse_args(argv)
    {"attention": attention.attention, "kernel": attention.kernel, "sweep": grid.sweep, "grid": grid.grid,
     "peer": grid.peer, "step": step.step}[args.what](args)
    return 0

