"""Coupled groups of one decoder layer (LLaMA's coupling, models.family): which rows and columns fall together,
their scores, their removal.

Attention (LLM-Pruner's dependency groups, grouped-query aware). transformers' `repeat_kv` makes query head h
read KV head h // r, with r = num_heads // num_kv_heads. Two ways keep that mapping valid after pruning:
- "kv_group": a unit is one KV head with its r query heads: the k/v rows of that KV head, the q rows of the
  r query heads and the matching o_proj input columns. Whole groups go, r is unchanged.
- "query_heads": a unit is one query head (its q rows and o_proj input columns); k/v stay. The same number of
  query heads goes from every KV group, so r shrinks but num_heads % num_kv_heads == 0 still holds.
MLP: channel i = row i of gate_proj and up_proj + input column i of down_proj.

Scores are per-element tensors reduced to one number per unit. Row modules (q/k/v/gate/up) reduce each
row, column modules (o/down) each input column; both are sums, so a row shard of a matrix yields a partial
vector and the shards' vectors add up to the whole matrix's.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models import ATTENTION_LINEARS, MLP_LINEARS, QUERY_HEAD_LINEARS
from ..models import COLUMN_LINEARS as COLUMN_MODULES  # units run along their input columns, else along rows

ATTENTION, MLP = "attention", "mlp"
MODULES = {ATTENTION: ATTENTION_LINEARS, MLP: MLP_LINEARS}


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Steps:
    """How a module shrinks: `count` equal steps exist, at most `removable` may go, each removes `params`."""

    count: int
    removable: int
    params: int


@dataclass(frozen=True)
class LayerKeep:
    """What survives in one layer, as indices into the unpruned layer (ascending)."""

    query_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    channels: tuple[int, ...]


def kind_of(module: str) -> str:
    return ATTENTION if module in MODULES[ATTENTION] else MLP


def num_units(kind: str, shape: LayerShape, mode: str) -> int:
    if kind == MLP:
        return shape.intermediate
    return shape.num_kv_heads if mode == "kv_group" else shape.num_heads


def removal_steps(kind: str, shape: LayerShape, mode: str) -> Steps:
    """The granularity the allocation works in; at least one unit per module (and per KV group) survives."""
    hd, hidden = shape.head_dim, shape.hidden
    if kind == MLP:
        return Steps(shape.intermediate, shape.intermediate - 1, 3 * hidden)
    r = shape.heads_per_group
    if mode == "kv_group":
        return Steps(shape.num_kv_heads, shape.num_kv_heads - 1, (2 * r + 2) * hd * hidden)
    # one step = one query head from every KV group: its q rows and o_proj columns
    return Steps(r, r - 1, shape.num_kv_heads * 2 * hd * hidden)


def unit_index(module: str, shape: LayerShape, mode: str) -> Tensor:
    """The unit of each row (row modules) or input column (column modules) of `module`; -1: in no unit."""
    if kind_of(module) == MLP:
        return torch.arange(shape.intermediate)
    query_head = torch.arange(shape.num_heads).repeat_interleave(shape.head_dim)  # (num_heads * head_dim,)
    kv_head = torch.arange(shape.num_kv_heads).repeat_interleave(shape.head_dim)
    is_query_side = module in QUERY_HEAD_LINEARS
    if mode == "kv_group":
        return query_head // shape.heads_per_group if is_query_side else kv_head
    return query_head if is_query_side else torch.full_like(kv_head, -1)


def unit_sums(module: str, per_element: Tensor, shape: LayerShape, mode: str, row_start: int = 0) -> Tensor:
    """Sum of a per-element score over each unit's elements of `module`, fp32: (num_units,).

    `per_element` may be a row shard of the matrix beginning at `row_start`: the vectors of all shards add up
    to the whole matrix's vector.
    """
    index = unit_index(module, shape, mode).to(per_element.device)
    if module in COLUMN_MODULES:
        lines = per_element.float().sum(dim=0)  # (in,): partial column sums over this shard's rows
    else:
        lines = per_element.float().sum(dim=1)  # (rows,)
        index = index[row_start : row_start + per_element.shape[0]]
    inside = index >= 0
    sums = torch.zeros(num_units(kind_of(module), shape, mode), device=per_element.device)
    return sums.index_add_(0, index[inside], lines[inside])


def group_sums(
    per_element: dict[str, Tensor], kind: str, shape: LayerShape, mode: str, row_starts: dict[str, int] | None = None
) -> Tensor:
    """Sum of a per-element score over each unit of one layer's attention or MLP, all its modules together;
    `row_starts` places row shards (absent: whole matrices)."""
    starts = row_starts or {}
    return sum(unit_sums(m, per_element[m], shape, mode, starts.get(m, 0)) for m in MODULES[kind])


def removed_units(scores: Tensor, steps: int, kind: str, shape: LayerShape, mode: str) -> list[int]:
    """The `steps` lowest-scored units (stable: the lower index goes first on ties); in query_heads mode the
    `steps` lowest query heads of every KV group."""
    if kind == MLP or mode == "kv_group":
        return sorted(torch.sort(scores, stable=True).indices[:steps].tolist())
    per_group = scores.view(shape.num_kv_heads, shape.heads_per_group)  # (kv groups, query heads of each)
    lowest = torch.sort(per_group, dim=1, stable=True).indices[:, :steps]
    first_head = torch.arange(shape.num_kv_heads)[:, None] * shape.heads_per_group
    return sorted((first_head + lowest).flatten().tolist())


def layer_keep(removed_attention: list[int], removed_channels: list[int], shape: LayerShape, mode: str) -> LayerKeep:
    gone = set(removed_attention)
    if mode == "kv_group":
        kv_heads = [g for g in range(shape.num_kv_heads) if g not in gone]
        r = shape.heads_per_group
        query_heads = [g * r + j for g in kv_heads for j in range(r)]
    else:
        kv_heads = list(range(shape.num_kv_heads))
        query_heads = [h for h in range(shape.num_heads) if h not in gone]
    gone_channels = set(removed_channels)
    channels = [c for c in range(shape.intermediate) if c not in gone_channels]
    keep = LayerKeep(tuple(query_heads), tuple(kv_heads), tuple(channels))
    check_gqa(keep, shape)
    return keep


def check_gqa(keep: LayerKeep, shape: LayerShape) -> None:
    """Every kept KV head must serve the same number of kept query heads, all from its own group."""
    r = shape.heads_per_group
    per_group = [sum(1 for h in keep.query_heads if h // r == g) for g in keep.kv_heads]
    if not keep.query_heads or len(set(per_group)) != 1 or sum(per_group) != len(keep.query_heads):
        raise ValueError(f"kept heads break grouped-query attention: {keep.query_heads} over KV {keep.kv_heads}")


def weight_numel(module: str, shape: LayerShape) -> int:
    if kind_of(module) == MLP:
        return shape.hidden * shape.intermediate
    heads = shape.num_heads if module in QUERY_HEAD_LINEARS else shape.num_kv_heads
    return shape.hidden * heads * shape.head_dim


def kept_lines(module: str, keep: LayerKeep, head_dim: int) -> Tensor:
    """Indices of the rows (row modules) or input columns (column modules) of `module` that survive."""
    if kind_of(module) == MLP:
        return torch.tensor(keep.channels, dtype=torch.long)
    heads = keep.query_heads if module in QUERY_HEAD_LINEARS else keep.kv_heads
    heads_t = torch.tensor(heads, dtype=torch.long)
    return (heads_t[:, None] * head_dim + torch.arange(head_dim)).flatten()  # (kept heads * head_dim,)


def slice_weight(module: str, weight: Tensor, keep: LayerKeep, head_dim: int) -> Tensor:
    """The weight with the removed rows or input columns physically gone."""
    lines = kept_lines(module, keep, head_dim).to(weight.device)
    return weight[:, lines] if module in COLUMN_MODULES else weight[lines]


def compensation_bias(module: str, weight: Tensor, input_mean: Tensor, keep: LayerKeep, head_dim: int) -> Tensor:
    """FLAP's bias compensation for a column module (o_proj, down_proj): W[:, removed] @ mean(X)[removed], the
    removed input channels' mean contribution to the output, so the output's calibration mean is unchanged."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept_lines(module, keep, head_dim).to(weight.device)] = False
    return weight[:, removed].float() @ input_mean.to(weight.device).float()[removed]
