"""Cutting a part (an RL batch, an OPD edge's rollouts) into micro-batches within a token budget.

A forward and backward pass holds activations in proportion to the tokens it runs: its
rows times their padded length. `micro_batches` cuts a part's rows so that each cut holds
at most `budget` such tokens. Rows are taken longest first, so each cut holds rows of
similar length and is trimmed to its own longest completion: little padding is computed.
A part that fits the budget is one cut, left as it is (its rows in order, nothing trimmed),
so a run whose budget holds its batches computes exactly what it computed without one.

Mini-batches (several optimizer steps per batch) are a different cut: whole prompt groups,
as evenly as possible (`mini_batch_rows`); so are the shares of a data-parallel branch's
ranks (`rank_rows`), taken inside each mini-batch.
"""

from __future__ import annotations

import torch

from copd.backends.local.sampling import group_size
from copd.backends.roles import Rollouts


class MicroBatch(tuple):
    """(rows, width): row indices of the part, and how many completion slots to keep."""

    @property
    def rows(self) -> torch.Tensor:
        return self[0]

    @property
    def width(self) -> int:
        return self[1]


def completion_lengths(completion_mask_B_T: torch.Tensor) -> list[int]:
    """Slots up to each row's last completion token (its EOS), at least 1."""
    slots = torch.arange(1, completion_mask_B_T.shape[1] + 1)
    return (completion_mask_B_T.bool().cpu() * slots).amax(-1).clamp(min=1).tolist()


def micro_batches(rollouts: Rollouts, budget: int) -> list[MicroBatch]:
    """Cuts of the rollouts' rows, each with rows x (prompt_len + width) <= budget tokens.

    A row longer than the budget on its own becomes a cut of one row (a run checks the
    budget against its longest prompt and max_new_tokens before it starts).
    """
    rows, width = rollouts.completion_mask_B_T.shape
    prompt = rollouts.prompt_len
    if rows * (prompt + width) <= budget:
        return [MicroBatch((torch.arange(rows), width))]
    lengths = completion_lengths(rollouts.completion_mask_B_T)
    order = sorted(range(rows), key=lambda r: -lengths[r])  # stable: ties keep row order
    cuts, current = [], []
    for row in order:
        longest = lengths[current[0]] if current else lengths[row]
        if current and (len(current) + 1) * (prompt + longest) > budget:
            cuts.append(current)
            current = []
        current.append(row)
    cuts.append(current)
    # Rows ascending inside a cut: a prompt group that stays together still shares its prefill.
    return [MicroBatch((torch.tensor(sorted(cut)), lengths[cut[0]])) for cut in cuts]


def prompt_group(rollouts: Rollouts) -> int:
    """Rows per prompt group of the rollouts (G of GRPO; 1 when the rows are not runs of equal prompts)."""
    if rollouts.vision is not None:
        return rollouts.vision.rows_per_prompt
    prompt = slice(0, rollouts.prompt_len)
    if rollouts.input_ids_B_L.shape[0] < 2:
        return 1
    return group_size(rollouts.input_ids_B_L[:, prompt], rollouts.attention_mask_B_L[:, prompt])


def mini_batch_rows(rollouts: Rollouts, count: int) -> list[torch.Tensor]:
    """The rows of `count` mini-batches of whole prompt groups, sizes as equal as they can be (some may be empty)."""
    group = prompt_group(rollouts)
    groups = torch.arange(rollouts.input_ids_B_L.shape[0]).view(-1, group)
    return [chunk.reshape(-1) for chunk in torch.tensor_split(groups, count)]


def rank_rows(rows: torch.Tensor, group: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s share of `rows` (runs of `group` rows, one prompt group each): whole groups, shares as equal
    as they can be (ranks past the groups get none). A group is never split: its advantages are its own."""
    return torch.tensor_split(rows.view(-1, group), world)[rank].reshape(-1)


def scatter_rows(pieces: list[torch.Tensor], cuts: list[MicroBatch], rows: int, width: int, fill: float = 0.0) -> torch.Tensor:
    """One [rows, width, ...] tensor from the micro-batches' [cut rows, cut width, ...] pieces; `fill` elsewhere."""
    first = pieces[0]
    out = first.new_full((rows, width, *first.shape[2:]), fill)
    for piece, cut in zip(pieces, cuts):
        out[cut.rows.to(out.device), : cut.width] = piece
    return out
