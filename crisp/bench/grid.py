"""``python -m crisp.bench sweep``, ``grid`` and ``peer``: a grid's wall-clock time against the runs done another way.

``sweep``: a grid against one-at-a-time untuned runs (:func:`sweep`). ``grid -- OVERRIDES``: exactly
``python -m crisp.run OVERRIDES`` timed from command to report, and in the same command a peer: one Hugging
Face ``Trainer`` run of the same model written the way a user would without crisp (``peer``, :func:`grid`).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from crisp.bench import write_json
from crisp.core.results import model_label
from crisp.sweep import nvidia_mps as mps

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
    write_json(str(record_path), record)
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
    write_json(str(Path(args.dir) / "peer.json"), record)
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
    write_json(str(out / "bench_grid.json"), record)  # kept should the peer fail
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
    write_json(str(out / "bench_grid.json"), record)
    print(json.dumps(record.get("summary", record), indent=2))
    return record


