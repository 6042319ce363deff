"""Many short examples per row: a lockstep step's batch without most of its padding.

Short sentences folded from several runs' batches into one would all be padded to the longest of
them: most of a step's tokens would be padding. Instead each run's sentences are packed into rows of
``width`` tokens (first fit, longest first), every run gets the same number of rows (the most any run
needs), and each token records its sentence's slot in the row (``segments``, -1 for padding). The model then sees:

- a block-diagonal attention mask built from ``segments`` (a sentence attends to its own tokens,
  padding tokens to themselves only), so a sentence's output does not depend on its neighbours;
- ``position_ids`` that restart at every sentence;
- ``first``: each sentence's first-token position, for the classification head;
- ``examples``: each token's example, counted within its run's batch (-1 for padding), with
  ``position_ids`` where a sparsifier that draws keys finds the token (:class:`crisp.sparsity.streams.TokenPlaces`);
- ``token_type_ids`` of pairs, for encoders that read them: a pair is one example, packed whole, and
  never sees another example's tokens (the mask above).

How much padding packing saves on SST-2 is in docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crisp.training.data import TokenizedSplit


def pack_rows(lengths: Sequence[int], width: int) -> tuple[list[int], list[int], int]:
    """(row, offset) of every sentence and the number of rows: first fit, longest sentence first."""
    rows_used: list[int] = []
    row, offset = [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, used in enumerate(rows_used):
            if used + lengths[i] <= width:
                row[i], offset[i] = r, used
                rows_used[r] += lengths[i]
                break
        else:
            row[i], offset[i] = len(rows_used), 0
            rows_used.append(lengths[i])
    return row, offset, len(rows_used)


def pack(batches: Sequence[tuple[TokenizedSplit, Sequence[int]]], width: int) -> dict[str, torch.Tensor]:
    """One packed batch from each run's (split, example indices), run by run; every run gets the same
    number of rows (on SST-2 at width 80 a step needs 5 to 9, mostly 6 or 7: a few CUDA graphs)."""
    layouts = {}
    for split, indices in batches:  # runs that share a split and a sampler seed share a layout
        key = (id(split), tuple(indices))
        if key not in layouts:
            lengths = split.lengths[torch.as_tensor(indices)].tolist()
            if max(lengths) > width:
                raise ValueError(f"a sentence of {max(lengths)} tokens does not fit a packed row of {width}")
            layouts[key] = (lengths, *pack_rows(lengths, width))
    rows_per_run = max(n for _, _, _, n in layouts.values())
    total_rows = rows_per_run * len(batches)
    input_ids = torch.zeros(total_rows * width, dtype=torch.long)
    positions = torch.zeros(total_rows * width, dtype=torch.long)
    segments = torch.full((total_rows * width,), -1, dtype=torch.long)
    examples = torch.full((total_rows * width,), -1, dtype=torch.long)
    types = torch.zeros(total_rows * width, dtype=torch.long) if batches[0][0].token_type_ids is not None else None
    first, labels = [], []
    for run, (split, indices) in enumerate(batches):
        lengths, row, offset, _ = layouts[(id(split), tuple(indices))]
        index = torch.as_tensor(indices)
        length = torch.as_tensor(lengths)
        start = (torch.as_tensor(row) + run * rows_per_run) * width + torch.as_tensor(offset)
        # one entry per token: its sentence, and its position in the sentence
        sentence = torch.repeat_interleave(torch.arange(len(indices)), length)
        position = torch.arange(len(sentence)) - torch.repeat_interleave(length.cumsum(0) - length, length)
        where = start[sentence] + position
        input_ids[where] = split.input_ids[index[sentence], position]
        if types is not None:
            types[where] = split.token_type_ids[index[sentence], position]
        positions[where] = position
        segments[where] = torch.as_tensor(offset)[sentence]  # unique per sentence within its row
        examples[where] = sentence
        first.append(start)
        labels.append(split.labels[index])
    shape = (total_rows, width)
    batch = {"input_ids": input_ids.view(shape), "position_ids": positions.view(shape),
             "segments": segments.view(shape), "examples": examples.view(shape), "first": torch.cat(first),
             "labels": torch.cat(labels)}
    return batch if types is None else {**batch, "token_type_ids": types.view(shape)}


def attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean ``[rows, 1, width, width]``: same sentence, or a padding token's own position."""
    real = segments >= 0
    same = (segments[:, :, None] == segments[:, None, :]) & real[:, None, :]
    eye = torch.eye(segments.size(1), dtype=torch.bool, device=segments.device)
    return (same | eye).unsqueeze(1)
