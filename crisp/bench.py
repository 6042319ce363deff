"""Benchmarks. ``python -m crisp.bench attention``: time of one full training step (forward, backward,
AdamW) for dense eager, SDPA and crisp at s=0 and s=0.8, at SST-2-like shapes, on random-init
DistilBERT-base and MiniLM-L6-sized encoders, with kernels launched one by one (``eager``) and
replayed from a CUDA graph (``graph``, what crisp's training runs use on one GPU).
``python -m crisp.bench kernel``: the attention-probability step alone (scale, mask, top-k, softmax,
forward and backward), eager vs crisp's sort path vs crisp's fused kernel.
``python -m crisp.bench sweep``: a grid's wall-clock time against one-at-a-time untuned runs (see
:func:`sweep`). ``python -m crisp.bench grid -- OVERRIDES``: exactly ``python -m crisp.run OVERRIDES``
timed from command to report, and in the same command a peer: one Hugging Face ``Trainer`` run of
the same model written the way a user would without crisp (``python -m crisp.bench peer``), see
:func:`grid`. ``python -m crisp.bench step``: a lockstep group's step, timed and broken down by kind of
kernel (:mod:`crisp.bench_step`). Each prints its numbers and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig

import crisp
from crisp import bench_step
from crisp.core.results import model_label
from crisp.sweep import nvidia_mps as mps
from crisp.training.cuda_graphs import GraphedTrainStep

ENCODERS = {
    "distilbert-base": lambda: DistilBertConfig(),  # 6 layers, 768 wide, 12 heads
    "minilm-l6": lambda: BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                    intermediate_size=1536),
}
SHAPES = [(32, 40), (32, 66), (32, 128), (8, 512)]
IMPLEMENTATIONS = [("eager", "eager", None), ("sdpa", "sdpa", None), ("crisp s=0", "crisp", 0.0),
                   ("crisp s=0.8", "crisp", 0.8)]


def _batch(batch: int, length: int, vocab: int, device: torch.device, generator: torch.Generator):
    """Random ids with SST-2-like padding: lengths uniform in [length/2, length], one full-length row."""
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(1000, vocab, (batch, length), generator=generator) * mask
    labels = torch.randint(0, 2, (batch,), generator=generator)
    return ids.to(device), mask.to(device), labels.to(device)


class TrainingStep:
    """One model, optimizer and batch; :meth:`run` times full training steps in milliseconds."""

    def __init__(self, encoder: str, attn: str, sparsity: float | None, batch: int, length: int,
                 device: torch.device, graph: bool = False, bf16: bool = False):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(ENCODERS[encoder](), attn_implementation=attn)
        self.model = model.to(device).train()
        if attn == "crisp":
            crisp.set_sparsity(self.model, sparsity)
            crisp.configure(self.model, track_stats=False)  # as in training steps
        self.on_gpu = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-5, fused=self.on_gpu or None)
        generator = torch.Generator().manual_seed(1)
        ids, mask, labels = _batch(batch, length, self.model.config.vocab_size, device, generator)
        self.batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        self.device_type, self.bf16 = device.type, bf16
        self.graphed = GraphedTrainStep(self._loss, list(self.model.parameters())) if graph else None

    def _loss(self, batch):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return (torch.nn.functional.cross_entropy(logits, batch["labels"]),)

    def _step(self) -> None:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.graphed is not None:
                self.graphed(self.batch)  # forward and backward replayed; the optimizer steps outside
            else:
                self._loss(self.batch)[0].backward()
        self.optimizer.step()
        if self.graphed is None:
            self.optimizer.zero_grad(set_to_none=True)

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            if self.on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            self._step()
            if self.on_gpu:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
        return times


def _capturable_eager_mask(*args, dtype: torch.dtype = torch.float32, **kwargs):
    """transformers' eager mask, with its 0 built on the device: before 5.2x it copies a CPU scalar,
    which a CUDA graph cannot capture (newer transformers build it exactly like this)."""
    from transformers.masking_utils import sdpa_mask

    kwargs.pop("allow_is_causal_skip", None)
    mask = sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)
    if mask is None:
        return None
    return torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)


def _device_and_shapes(args) -> tuple[torch.device, list[tuple[int, int]]]:
    """The GPU unless --cpu or there is none; --shapes (default SHAPES), on the CPU only the shorter ones."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    return device, [s for s in shapes if device.type == "cuda" or s[1] <= args.cpu_max_length]


def time_shape(encoder: str, batch: int, length: int, device: torch.device, steps: int, warmup: int,
               rounds: int, graph: bool, bf16: bool) -> dict[str, float]:
    """Median ms per step of every implementation, measured in interleaved rounds.

    The implementations take turns (in rotating order) so that drift in the machine's speed (clocks,
    other processes) falls on all of them alike instead of on whichever ran last.
    """
    steppers = {label: TrainingStep(encoder, attn, s, batch, length, device, graph, bf16)
                for label, attn, s in IMPLEMENTATIONS}
    times: dict[str, list[float]] = {label: [] for label in steppers}
    for stepper in steppers.values():
        stepper.run(warmup)
    labels = list(steppers)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            times[label] += steppers[label].run(max(1, steps // rounds))
    return {label: statistics.median(t) for label, t in times.items()}


def attention(args) -> list[dict]:
    device, shapes = _device_and_shapes(args)
    on_gpu = device.type == "cuda"
    steps, warmup = (args.steps or (60 if on_gpu else 3)), (10 if on_gpu else 1)
    rounds = args.rounds or (6 if on_gpu else 1)
    modes = [m for m in args.modes if on_gpu or m == "eager"]  # CUDA graphs need a GPU
    bf16 = on_gpu and args.precision == "bf16"
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32, as in training runs
    if "graph" in modes:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register("eager", _capturable_eager_mask)
    rows = []
    for mode in modes:
        for encoder in args.encoders:
            for batch, length in shapes:
                medians = time_shape(encoder, batch, length, device, steps, warmup, rounds, mode == "graph", bf16)
                eager_ms = medians["eager"]
                for label, ms in medians.items():
                    rows.append({"mode": mode, "encoder": encoder, "batch": batch, "length": length,
                                 "implementation": label, "ms_per_step": round(ms, 3),
                                 "vs_eager": round(ms / eager_ms, 3)})
                    print(f"{mode:5s} {encoder:16s} {batch:3d}x{length:<4d} {label:12s} {ms:9.2f} ms "
                          f"{ms / eager_ms:5.2f}x eager", flush=True)
    meta = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
            "precision": "bf16 autocast" if bf16 else ("fp32 (TF32 matmuls)" if on_gpu else "fp32"),
            "steps": steps, "warmup": warmup, "rounds": rounds, "command": " ".join(sys.argv)}
    _write(args.out, {"meta": meta, "rows": rows})
    _print_table(rows)
    return rows


def _print_table(rows: list[dict]) -> None:
    print("\n| step | encoder | batch x length | " + " | ".join(label for label, _, _ in IMPLEMENTATIONS) + " |")
    print("|---|---|---|" + "---:|" * len(IMPLEMENTATIONS))
    for key in dict.fromkeys((r["mode"], r["encoder"], r["batch"], r["length"]) for r in rows):
        cells = [r for r in rows if (r["mode"], r["encoder"], r["batch"], r["length"]) == key]
        values = " | ".join(f"{r['ms_per_step']:.2f} ms ({r['vs_eager']:.2f}x)" for r in cells)
        print(f"| {key[0]} | {key[1]} | {key[2]} x {key[3]} | {values} |")


def _write(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# Attention probabilities alone

HEADS = 12


def _timed_us(fn, reps: int, on_gpu: bool) -> float:
    """Median microseconds per call of ``fn``: on a GPU, replayed from a CUDA graph of ``reps`` calls
    (no launch overhead: the kernels' own time); on the CPU, called in a loop."""
    if on_gpu:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run = graph.replay
    else:
        fn()

        def run():
            for _ in range(reps):
                fn()

    times = []
    for _ in range(5):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if on_gpu:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6 / reps)
    return statistics.median(times)


def _probability_steps(batch: int, length: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Forward and backward of raw scores -> attention probabilities at s=0.8, per implementation:
    eager's scale + additive mask + softmax, crisp's portable sort path, crisp's fused kernel."""
    from crisp.sparsity import kernels
    from crisp.sparsity.topk import MaskInfo, drop_mask, k_table

    sparsity, scaling = 0.8, 32**-0.5
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(batch, HEADS, length, length, generator=generator).to(device, dtype).requires_grad_()
    grad = torch.randn(raw.shape, generator=generator).to(device, dtype)
    _, mask, _ = _batch(batch, length, 30522, device, generator)
    valid = mask.bool()[:, None, None, :]
    additive = torch.zeros(valid.shape, device=device, dtype=dtype).masked_fill(~valid, torch.finfo(dtype).min)
    info, table = MaskInfo(valid, length, device), k_table(length, sparsity, device)

    def eager():
        torch.autograd.grad(torch.softmax(raw * scaling + additive, -1), raw, grad)

    def sort():
        scores = (raw * scaling).masked_fill(info.invalid, torch.finfo(dtype).min)
        scores = scores.masked_fill(drop_mask(scores.detach(), info, sparsity), float("-inf"))
        torch.autograd.grad(torch.softmax(scores, -1), raw, grad)

    def fused():
        torch.autograd.grad(kernels.topk_softmax(raw, valid, table, scaling), raw, grad)

    steps = {"eager softmax": eager, "crisp sort": sort}
    if kernels.available(raw):
        steps["crisp fused"] = fused
    return steps


def kernel(args) -> list[dict]:
    device, shapes = _device_and_shapes(args)
    on_gpu = device.type == "cuda"
    reps = args.reps or (20 if on_gpu else 2)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    for (batch, length), dtype in ((shape, d) for shape in shapes for d in args.dtypes):
        steps = _probability_steps(batch, length, dtypes[dtype], device)
        timed = {label: _timed_us(fn, reps, on_gpu) for label, fn in steps.items()}
        for label, us in timed.items():
            ratio = us / timed["eager softmax"]
            rows.append({"batch": batch, "heads": HEADS, "length": length, "dtype": dtype, "implementation": label,
                         "us_fwd_bwd": round(us, 1), "vs_eager": round(ratio, 3)})
            print(f"{batch:3d}x{HEADS}x{length:<4d} {dtype:5s} {label:14s} {us:9.1f} us {ratio:5.2f}x eager")
    meta = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
            "sparsity": 0.8, "timing": "CUDA-graph replay" if on_gpu else "loop", "reps": reps,
            "command": " ".join(sys.argv)}
    _write(args.out, {"meta": meta, "rows": rows})
    return rows


# ----------------------------------------------------------------------------------------------
# Sweep throughput

# One-at-a-time runs as a user gets them without tuning: fp32, kernels launched one by one, foreach
# AdamW, dynamic padding, a progress bar that waits for the GPU on every step.
UNTUNED = ["trainer.precision=32-true", "trainer.matmul_precision=highest", "trainer.cuda_graphs=false",
           "optim.fused=false", "trainer.progress_refresh_rate=1"]


def _runs(directory: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in directory.rglob("results.json")]
    # in seed order, like the baseline's wall times (seed10 would sort before seed2 by path)
    return sorted((r for r in found if r.get("status") == "completed"), key=lambda r: (r["config"]["seed"], r["name"]))


def _launch(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crisp.run", *argv], check=False)
    return time.perf_counter() - start


def sweep(args) -> dict:
    """Phase ``baseline``: one untuned run per ``--baseline-seeds`` seed, one after another (their mean time stands
    for each run of the grid); phase ``grid``: the grid as given (e.g. with hydra/launcher=parallel).
    Each phase records its wall time in ``OUT/bench_sweep.json``; the summary compares them."""
    out = Path(args.dir)
    record_path = out / "bench_sweep.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    common = list(args.overrides)
    if args.phase in ("baseline", "both"):
        base_dir = out / "baseline"
        # seeds timed in an earlier command (the same dir) are kept: a baseline can span commands
        walls = record.get("baseline", {}).get("wall_seconds_by_seed", {})
        for seed in args.baseline_seeds:
            walls[str(seed)] = _launch([*common, *UNTUNED, f"seed={seed}", f"hydra.run.dir={base_dir}/seed{seed}"])
        record["baseline"] = {"overrides": common + UNTUNED, "wall_seconds": [walls[k] for k in sorted(walls, key=int)],
                              "wall_seconds_by_seed": walls, "runs": _summ(_runs(base_dir))}
    if args.phase in ("grid", "both"):
        grid_dir = out / "grid"
        with mps.daemon() if args.mps else nullcontext():
            wall = _launch(["-m", *common, *args.grid, f"hydra.sweep.dir={grid_dir}"])
        record["grid"] = {"overrides": common + list(args.grid), "wall_seconds": wall, "mps": args.mps,
                          "runs": _summ(_runs(grid_dir))}
    out.mkdir(parents=True, exist_ok=True)
    if "baseline" in record and "grid" in record:
        record["summary"] = _compare(record["baseline"], record["grid"])
    record["command"] = " ".join(sys.argv)
    _write(str(record_path), record)
    print(json.dumps(record.get("summary", {}), indent=2))
    return record


def _summ(runs: list[dict]) -> dict:
    return {
        "completed": len(runs),
        "epochs": [len(r["history"]) for r in runs],
        "fit_seconds": [r["timing"]["fit_seconds"] for r in runs],
        "samples_per_second": [r["timing"]["train_samples_per_second"] for r in runs],
        "peak_gpu_memory_mb": [r["timing"]["peak_gpu_memory_mb"] for r in runs],
        "samples": sum(r["timing"]["train_examples"] * len(r["history"]) for r in runs),
    }


def _compare(baseline: dict, grid: dict) -> dict:
    """Untuned seconds per grid run: the baseline runs' wall time, with their training time scaled
    to the grid's epochs when the baseline ran fewer (start-up is paid once per run either way)."""
    epochs = max(grid["runs"]["epochs"])
    scaled = [wall + fit * (epochs / e - 1) for wall, fit, e in
              zip(baseline["wall_seconds"], baseline["runs"]["fit_seconds"], baseline["runs"]["epochs"], strict=True)]
    per_run = statistics.mean(scaled)
    n = grid["runs"]["completed"]
    sequential = per_run * n
    return {
        "grid_runs": n,
        "grid_wall_seconds": round(grid["wall_seconds"], 1),
        "untuned_seconds_per_run": round(per_run, 1),
        "untuned_sequential_seconds_extrapolated": round(sequential, 1),
        "speedup": round(sequential / grid["wall_seconds"], 2),
        "runs_per_hour_grid": round(3600 * n / grid["wall_seconds"], 1),
        "runs_per_hour_untuned": round(3600 / per_run, 1),
        "samples_per_second_total_grid": round(grid["runs"]["samples"] / grid["wall_seconds"], 1),
        "samples_per_second_per_run_grid": round(statistics.mean(grid["runs"]["samples_per_second"]), 1),
        "samples_per_second_per_run_untuned": round(statistics.mean(baseline["runs"]["samples_per_second"]), 1),
        "peak_gpu_memory_mb_per_run_grid": max(filter(None, grid["runs"]["peak_gpu_memory_mb"]), default=None),
    }


def peer(args) -> dict:
    """One plain Hugging Face ``Trainer`` fine-tuning run, as a user writes it without crisp: bf16,
    batch 32, dynamic padding (``DataCollatorWithPadding``), linear schedule, one evaluation.
    ``Trainer`` needs ``accelerate`` (``pip install -e .[bench]``)."""
    start = time.perf_counter()
    import csv

    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = {}
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        with open(Path(args.data) / name, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))  # GLUE TSVs are unquoted
        encoded = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=128)
        data[split] = [{"input_ids": ids, "attention_mask": mask, "labels": int(r["label"])}
                       for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows, strict=True)]
    # fp32 master weights, as the hub checkpoint loads (a folder saved in fp16 would otherwise load as fp16)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2, dtype=torch.float32)
    training = TrainingArguments(output_dir=args.dir, per_device_train_batch_size=32, per_device_eval_batch_size=256,
                                 num_train_epochs=args.epochs, learning_rate=2e-5, weight_decay=0.01,
                                 warmup_steps=0.06,  # a float: a ratio
                                 bf16=torch.cuda.is_available(), save_strategy="no", report_to="none",
                                 logging_steps=500, seed=1)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=training, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    train = trainer.train().metrics
    evaluation = trainer.evaluate()
    record = {"wall_seconds": time.perf_counter() - start, "train_seconds": train["train_runtime"],
              "train_samples_per_second": train["train_samples_per_second"], "epochs": args.epochs,
              "val_acc": evaluation["eval_accuracy"], "model": model_label({"name_or_path": args.model}),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    _write(str(Path(args.dir) / "peer.json"), record)
    return record


def grid(args) -> dict:
    """The user's command, timed from its start to its exit (report written), then the peer: one
    ``Trainer`` run of ``--peer-epochs`` in its own process. A grid run done the peer's way costs the
    peer's start-up once plus its training time per epoch times the grid's epochs; the grid's
    speed-up is that times the grid's runs over the grid's wall time."""
    out = Path(args.dir)
    start = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "crisp.run", *args.overrides], check=False).returncode
    wall = time.perf_counter() - start
    sweep_dir = Path(next(o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra.sweep.dir=")))
    runs = _runs(sweep_dir)
    record = {"command": "python -m crisp.run " + " ".join(args.overrides), "exit_code": code,
              "wall_seconds": round(wall, 1), "report": (sweep_dir / "report.md").is_file(), "runs": _summ(runs)}
    _write(str(out / "bench_grid.json"), record)  # kept should the peer fail
    if args.peer_model:
        peer_start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "crisp.bench", "peer", "--model", args.peer_model, "--data",
                        args.peer_data, "--epochs", str(args.peer_epochs), "--dir", str(out / "peer")], check=True)
        found = json.loads((out / "peer" / "peer.json").read_text())
        found["command_seconds"] = round(time.perf_counter() - peer_start, 1)  # with the interpreter's start
        epochs = max(record["runs"]["epochs"], default=0)
        startup = found["command_seconds"] - found["train_seconds"]
        per_run = startup + found["train_seconds"] / found["epochs"] * epochs
        n = record["runs"]["completed"]
        record["peer"] = found
        record["summary"] = {"grid_runs": n, "grid_epochs": epochs, "grid_wall_seconds": record["wall_seconds"],
                             "peer_seconds_per_grid_run": round(per_run, 1),
                             "peer_sequential_seconds": round(per_run * n, 1),
                             "speedup_vs_peer": round(per_run * n / wall, 2) if n else None}
    _write(str(out / "bench_grid.json"), record)
    print(json.dumps(record.get("summary", record), indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crisp.bench", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    att = sub.add_parser("attention", help="training-step time per attention implementation")
    att.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
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
    bench_step.add_parser(sub)
    args = parser.parse_args(argv)
    {"attention": attention, "kernel": kernel, "sweep": sweep, "grid": grid, "peer": peer,
     "step": bench_step.step}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
