"""``python -m crisp.bench attention`` and ``kernel``: what crisp's attention costs against eager and SDPA.

``attention``: one full training step (forward, backward, AdamW) for dense eager, SDPA and crisp at s=0 and
s=0.8, at SST-2-like shapes, on random-init DistilBERT-base and MiniLM-L6-sized encoders, with kernels
launched one by one (``eager``) and replayed from a CUDA graph (``graph``, what crisp's training runs use on
one GPU). ``kernel``: the attention-probability step alone (scale, mask, top-k, softmax, forward and
backward), eager vs crisp's sort path vs crisp's fused kernel.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig

import crisp
from crisp.bench import write_json
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
    """transformers' eager mask, with its 0 built on the device: before transformers 5.2 it copies a CPU scalar,
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
    write_json(args.out, {"meta": meta, "rows": rows})
    _print_table(rows)
    return rows


def _print_table(rows: list[dict]) -> None:
    print("\n| step | encoder | batch x length | " + " | ".join(label for label, _, _ in IMPLEMENTATIONS) + " |")
    print("|---|---|---|" + "---:|" * len(IMPLEMENTATIONS))
    for key in dict.fromkeys((r["mode"], r["encoder"], r["batch"], r["length"]) for r in rows):
        cells = [r for r in rows if (r["mode"], r["encoder"], r["batch"], r["length"]) == key]
        values = " | ".join(f"{r['ms_per_step']:.2f} ms ({r['vs_eager']:.2f}x)" for r in cells)
        print(f"| {key[0]} | {key[1]} | {key[2]} x {key[3]} | {values} |")


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
    write_json(args.out, {"meta": meta, "rows": rows})
    return rows


# ----------------------------------------------------------------------------------------------
# Sweep throughput

# One-at-a-time runs as a user gets them without tuning: fp32, kernels launched one by one, foreach
# AdamW, dynamic padding, a progress bar that waits for the GPU on every step.
