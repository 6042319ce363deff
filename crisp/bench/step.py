"""``python -m crisp.bench step``: one lockstep group's training step on the GPU, timed and taken apart.

The group is the one a sweep trains: its runs' configs are composed from the overrides as
``crisp.run`` composes them (``--seeds`` x ``--grid`` x ``--lrs``), and :func:`crisp.lockstep.group.train_group`
builds, fuses and trains it. Its first epoch is cut to ``--steps`` steps; once the CUDA graphs are
captured (after ``--skip`` steps) ``--timed`` steps are timed from the host with the device synchronised at
both ends, then ``--profiled`` steps run under ``torch.profiler``: the GPU time of every kernel, summed by
kind (matmuls, AdamW, attention, dropout, LayerNorm, elementwise, ...). Prints a table, writes JSON.
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

# kernel name -> kind, first match wins
KINDS = [
    ("matmul", r"gemm|cutlass|nvjet|xmma|cublas|sm\d+_|splitK"),
    ("AdamW", r"adam"),
    ("attention top-k and softmax", r"topk|_softmax_bwd|_k_table|radix"),
    ("softmax", r"softmax"),
    ("dropout", r"dropout"),
    ("LayerNorm", r"layer_norm|layernorm"),
    ("embedding and gathers", r"embedding|index|gather|scatter"),
    ("reductions", r"reduce"),
    ("copies and casts", r"copy|memcpy|memset|cat|_to_copy|convert"),
    ("elementwise", r"elementwise|vectorized|unrolled|foreach"),
]

PAPER_GRID = [("uniform", 0.0)] + [(s, p) for s in ("uniform", "adaptive") for p in (0.6, 0.7, 0.8)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, kernel, re.IGNORECASE)), "other")


class StepTimer(pl.Callback):
    """Times ``timed`` training steps after ``skip``, then profiles ``profiled`` more, then stops the fit."""

    def __init__(self, skip: int, timed: int, profiled: int):
        self.skip, self.timed, self.profiled = skip, timed, profiled
        self.window_ms: list[float] = []  # each 50 steps' mean from the first, captures and compiles included
        self.step_ms: float | None = None
        self.profile = None
        self._t = self._window = 0.0
        # CUDA events at each timed step's start, before its optimizer step and at its end: the GPU's own
        # split of the step, which holds where the profiler loses kernels inside replayed graphs
        self._events: list[tuple] = []

    def _mark(self, batch_idx: int, slot: int) -> None:
        if torch.cuda.is_available() and self.skip <= batch_idx < self.skip + self.timed:
            if slot == 0:
                self._events.append(tuple(torch.cuda.Event(enable_timing=True) for _ in range(3)))
            if self._events:
                self._events[-1][slot].record()

    def phases_ms(self) -> dict[str, float]:
        """Mean GPU milliseconds a timed step spends in forward and backward (with the batch's copy in),
        in the optimizer (and the schedule), and from the step's end to the next one's start."""
        if len(self._events) < 2:
            return {}
        _sync()
        steps = list(zip(self._events, self._events[1:], strict=False))
        mean = lambda pairs: round(sum(a.elapsed_time(b) for a, b in pairs) / len(pairs), 3)  # noqa: E731
        return {"forward_backward": mean([(s[0], s[1]) for s, _ in steps]),
                "optimizer": mean([(s[1], s[2]) for s, _ in steps]),
                "between_steps": mean([(s[2], n[0]) for s, n in steps])}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self._mark(trainer.fit_loop.epoch_loop.batch_idx, 1)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._mark(batch_idx, 2)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._mark(batch_idx, 0)
        if batch_idx % 50 == 0:
            _sync()
            now = time.perf_counter()
            if batch_idx:
                self.window_ms.append(round((now - self._window) / 50 * 1000, 2))
            self._window = now
        if batch_idx == self.skip:
            _sync()
            self._t = time.perf_counter()
        elif batch_idx == self.skip + self.timed:
            _sync()
            self.step_ms = (time.perf_counter() - self._t) / self.timed * 1000
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                              torch.profiler.ProfilerActivity.CUDA])
            self.profile.__enter__()
        elif batch_idx == self.skip + self.timed + self.profiled:
            _sync()
            self.profile.__exit__(None, None, None)
            trainer.should_stop = True


def _ranked(times: dict[str, float], count: int | None = None) -> dict[str, float]:
    return {k: round(v, 3) for k, v in sorted(times.items(), key=lambda item: -item[1])[:count]}


def breakdown(profile, steps: int) -> dict:
    """GPU time per step by kind of kernel, the heaviest kernels, and (launched eagerly: the kernels of
    a replayed CUDA graph have no host op) the chain of host ops that launched them, and that launched
    the memsets."""
    kernels: dict[str, float] = {}
    ops: dict[str, float] = {}
    memsets: dict[str, float] = {}
    launches: dict[str, float] = {}  # kernels a step, by host op: where the step's ~500 launches come from
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if getattr(event, "is_user_annotation", False) or "#" in event.name:  # a range, not a kernel
                continue
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / 1000 / steps  # ms a step
        elif event.kernels:
            chain, parent = [event.name], event.cpu_parent
            while parent is not None and len(chain) < 3:
                chain.insert(0, parent.name)
                parent = parent.cpu_parent
            key = " > ".join(chain)
            ops[key] = ops.get(key, 0.0) + sum(k.duration for k in event.kernels) / 1000 / steps
            launches[key] = launches.get(key, 0.0) + len(event.kernels) / steps
            # memsets take next to no time themselves, but the GPU idles before them inside graphs
            count = sum(k.name.startswith("Memset") for k in event.kernels)
            if count:
                memsets[key] = memsets.get(key, 0.0) + count / steps
    kinds: dict[str, float] = {}
    for name, ms in kernels.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    return {"gpu_ms_per_step": round(sum(kernels.values()), 3), "by_kind_ms": _ranked(kinds),
            "top_kernels_ms": {name[:100]: ms for name, ms in _ranked(kernels, 15).items()},
            "top_host_ops_ms": _ranked(ops, 25), "memsets_per_step_by_host_op": _ranked(memsets, 10),
            "kernels_per_step_by_host_op": _ranked(launches, 30)}


def idle_between_kernels(profile, steps: int, within_us: float = 500.0) -> dict:
    """Kernels a step, and the GPU's idle time between consecutive kernels (gaps shorter than
    ``within_us``: inside a step, not waiting for the host), summed by the kernel that comes next."""
    kernels = sorted((e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and not getattr(e, "is_user_annotation", False) and "#" not in e.name),
                     key=lambda e: e.time_range.start)
    idle: dict[str, float] = {}
    for before, after in zip(kernels, kernels[1:], strict=False):
        gap = after.time_range.start - before.time_range.end
        if 0 < gap < within_us:
            idle[after.name[:80]] = idle.get(after.name[:80], 0.0) + gap / 1000 / steps
    return {"kernels_per_step": round(len(kernels) / steps), "idle_ms_per_step": round(sum(idle.values()), 3),
            "idle_before_ms": _ranked(idle, 12)}


def run_configs(overrides: list[str], seeds: int, lrs: list[str]) -> list:
    from hydra import compose, initialize_config_dir

    from crisp.core.config import CONF_DIR, register_configs, register_resolvers

    register_configs()
    register_resolvers()
    configs = []
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for lr, seed, (strategy, sparsity) in itertools.product(lrs or [None], range(1, seeds + 1), PAPER_GRID):
            grid = [f"seed={seed}", f"strategy={strategy}", f"sparsity={sparsity}"] + ([f"optim.lr={lr}"] if lr else [])
            configs.append(compose("config", overrides=[*overrides, *grid]))
    return configs


def step(args) -> dict:
    from dataclasses import replace

    from omegaconf import OmegaConf

    from crisp.core import lifecycle
    from crisp.lockstep.group import train_group
    from crisp.sweep.options import from_yaml

    steps = args.skip + args.timed + args.profiled + 1
    overrides = ["logger=none", "report.after_sweep=false", "trainer.max_epochs=1", "data.val_limit=256",
                 f"data.train_limit={steps * 32}", *args.overrides]
    configs = run_configs(overrides, args.seeds, args.lrs)
    timer = StepTimer(args.skip, args.timed, args.profiled)
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for k, cfg in enumerate(configs):
            out = Path(tmp) / f"run{k}"
            out.mkdir()
            record = {"name": f"{cfg.name}-lr{cfg.optim.lr:g}", "run_key": f"bench-step-{k}"}
            runs.append((lifecycle.Run.of(record, out), cfg))
        start = time.perf_counter()
        train_group(runs, replace(from_yaml("lockstep").group, callbacks=(timer,)))  # the launcher's settings
        seconds = time.perf_counter() - start
        completed = sum(1 for run, _ in runs if run.result and run.result.get("status") == "completed")
    if timer.profile is None or completed < len(runs):
        raise SystemExit(f"crisp.bench step: {len(runs) - completed} of {len(runs)} runs did not complete "
                         f"or the group trained fewer than {steps} steps: see the log above")
    out = {"runs": len(configs), "completed": completed, "overrides": overrides,
           "lrs": args.lrs, "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "step_ms": round(timer.step_ms, 3), "gpu_phases_ms": timer.phases_ms(),
           "first_steps_window_ms": timer.window_ms[:6],
           "group_seconds": round(seconds, 1), "precision": OmegaConf.select(configs[0], "trainer.precision"),
           **breakdown(timer.profile, args.profiled), **idle_between_kernels(timer.profile, args.profiled)}
    print(f"{out['runs']} runs: {out['step_ms']:.2f} ms a step (host, synchronised), "
          f"{out['gpu_ms_per_step']:.2f} ms of kernels a step")
    for phase, ms in out["gpu_phases_ms"].items():
        print(f"  GPU {phase:<26} {ms:8.3f} ms")
    print(f"  {out['kernels_per_step']} kernels a step, {out['idle_ms_per_step']:.2f} ms idle between them")
    # each table of the breakdown: its key, how a row prints
    for key, row in (("idle_before_ms", "    {v:8.3f} ms idle before {k}"),
                     ("by_kind_ms", "  {k:<30} {v:8.3f} ms"), ("top_kernels_ms", "    {v:8.3f} ms  {k}"),
                     ("top_host_ops_ms", "    {v:8.3f} ms  launched by {k}"),
                     ("memsets_per_step_by_host_op", "    {v:8.1f} memsets a step by {k}"),
                     ("kernels_per_step_by_host_op", "    {v:8.1f} kernels a step by {k}")):
        for k, v in out[key].items():
            print(row.format(k=k, v=v))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


def add_parser(sub) -> None:
    st = sub.add_parser("step", help="a lockstep group's training step: time and torch.profiler breakdown (GPU)")
    st.add_argument("--seeds", type=int, default=3, help="the paper grid's 7 runs per seed (3: 21 runs)")
    st.add_argument("--lrs", nargs="*", default=[], help="learning rates, each a copy of the grid (one group)")
    st.add_argument("--skip", type=int, default=200, help="steps before timing (graphs captured by then)")
    st.add_argument("--timed", type=int, default=300)
    st.add_argument("--profiled", type=int, default=20)
    st.add_argument("--out", default="multirun/bench/step.json")
    st.add_argument("overrides", nargs="*", help="e.g. model=minilm-l6 data=sst2_local")
