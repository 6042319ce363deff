"""The per-run AdamW of a lockstep group: each run steps as torch's AdamW with transformers' schedule steps it alone."""

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from crisp.lockstep.fused import keep_runs
from crisp.lockstep.run_adamw import RunAdamW, RunOptim, slices_of

RUNS = [RunOptim(1e-2, 0.01, 0.0), RunOptim(1e-2, 0.01, 0.0), RunOptim(3e-3, 0.1, 0.25), RunOptim(3e-3, 0.0, 0.5)]


def test_runs_with_equal_hyperparameters_side_by_side_share_a_slice():
    assert [(s.start, s.stop) for s in slices_of(RUNS)] == [(0, 2), (2, 3), (3, 4)]
    assert [(s.start, s.stop) for s in slices_of([RUNS[0], RUNS[2], RUNS[0]])] == [(0, 1), (1, 2), (2, 3)]


class _Model(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())

    def forward(self, x):
        return torch.bmm(x, self.weight) + self.bias[:, None]


@pytest.mark.parametrize("fused", [False, True])
def test_runs_with_their_own_lr_weight_decay_and_warmup_step_as_each_alone(fused):
    """4 runs, 3 slices, 12 steps; halfway run 1 leaves the group (as a failed run does)."""
    torch.manual_seed(0)
    total, weight, bias = 12, torch.randn(4, 5, 3), torch.randn(4, 3)
    group = _Model(weight, bias)
    optimizer = RunAdamW([group.weight], [group.bias], RUNS, total, fused=fused)
    alone = []
    for r, run in enumerate(RUNS):
        model = _Model(weight[r : r + 1], bias[r : r + 1])
        solo = torch.optim.AdamW([{"params": [model.weight], "weight_decay": run.weight_decay},
                                  {"params": [model.bias], "weight_decay": 0.0}], lr=run.lr, fused=fused or None)
        alone.append((model, solo, get_linear_schedule_with_warmup(solo, round(run.warmup_ratio * total), total)))
    active = [0, 1, 2, 3]
    for step in range(total):
        if step == 6:
            active = [0, 2, 3]
            keep_runs(group, [0, 2, 3], optimizer)
            optimizer.keep_runs([0, 2, 3])
            assert [(s.start, s.stop) for s in optimizer.slices] == [(0, 1), (1, 2), (2, 3)]
        x = torch.randn(4, 7, 5)
        optimizer.zero_grad()
        group(x[active]).pow(2).sum().backward()
        optimizer.step()
        for r in active:
            model, solo, schedule = alone[r]
            solo.zero_grad()
            model(x[r : r + 1]).pow(2).sum().backward()
            solo.step()
            schedule.step()
    for position, r in enumerate(active):
        assert torch.equal(group.weight.detach()[position], alone[r][0].weight.detach()[0]), r
        assert torch.equal(group.bias.detach()[position], alone[r][0].bias.detach()[0]), r
