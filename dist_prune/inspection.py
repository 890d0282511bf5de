"""Looking inside checkpoints without loading them: sparsity, N:M conformance, and mask agreement.

Everything streams one tensor at a time from the safetensors files (large tensors in row chunks), so a
checkpoint larger than memory can be inspected on any machine.
"""

import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from .checkpoint import (
    DTYPE_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    check_safetensors_file,
    has_weights,
    listed_weight_files,
    read_model_config,
)
from .config import parse_pattern
from .errors import CheckpointError
from .models import LINEAR_INPUT_OWNER
from .zero import find_tag_dir, read_layout, require_trust

DEFAULT_CHUNK_BYTES = 64 * 2**20
DECODER_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.weight$")
# safetensors dtype -> torch's name (the element sizes are checkpoint.DTYPE_BYTES)
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
               "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
MODULE_ORDER = tuple(LINEAR_INPUT_OWNER)
LISTED_NAMES = 10


@dataclass(frozen=True)
class TensorRef:
    """Where one stored tensor lives, from the file header alone."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decoder_position(self) -> tuple[int, str] | None:
        """(layer, module) of a 2-D weight inside a decoder layer: the matrices that pruning touches."""
        match = DECODER_WEIGHT.search(self.name)
        if match is None or len(self.shape) != 2:
            return None
        return int(match.group(1)), match.group(2)


def weight_files(path: Path) -> tuple[Path, ...]:
    """A .safetensors file itself, or a checkpoint directory's weight shards, each checked for truncation."""
    if os.path.lexists(path) and not path.is_dir():
        files: tuple[Path, ...] = (path,)  # a .safetensors file (or what claims to be one: checked below)
    elif has_weights(path):
        if (path / "config.json").is_file():
            read_model_config(path / "config.json")  # refuse what prune and eval refuse
        files = listed_weight_files(path)
    elif path.is_dir():
        # A checkpoint still being written (the report is drawn before publishing) has its shards but no index yet.
        files = tuple(sorted(path.glob("model*.safetensors")))
    else:
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not files:
        raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE})")
    for file in files:
        check_safetensors_file(file)
    return files


def tensor_refs(path: Path) -> dict[str, TensorRef]:
    """Every stored tensor by name, read from the file headers only."""
    refs: dict[str, TensorRef] = {}
    for file in weight_files(path):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                refs[name] = TensorRef(file, name, tuple(view.get_shape()), view.get_dtype())
    return refs


def read_crop(ref: TensorRef, rows: int, cols: int) -> Tensor:
    """The top-left rows x cols block of a 2-D tensor, reading no more than that block."""
    with safe_open(ref.file, framework="pt") as handle:
        return handle.get_slice(ref.name)[:rows, :cols]


def row_chunks(ref: TensorRef, rows_per_chunk: int) -> Iterator[Tensor]:
    with safe_open(ref.file, framework="pt") as handle:
        view = handle.get_slice(ref.name)
        for start in range(0, ref.shape[0], rows_per_chunk):
            yield view[start : start + rows_per_chunk]


def rows_per_chunk(ref: TensorRef, chunk_bytes: int) -> int:
    row_bytes = ref.shape[1] * DTYPE_BYTES.get(ref.dtype, 8)
    return max(1, chunk_bytes // max(1, row_bytes))


def summarize_checkpoint(
    path: str | Path, pattern: str | None = None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> dict:
    """Parameters, dtypes and exact-zero sparsity of every 2-D weight; with `pattern` ("2:4"), N:M conformance.

    Parameters count the tensors as stored (a tied lm_head is stored once). The total sparsity covers the
    2-D weights inside decoder layers, the same set a prune report counts.
    """
    path = Path(path)
    nm = parse_pattern(pattern)
    refs = tensor_refs(path)
    layers: dict[int, dict[str, dict]] = {}
    other: dict[str, dict] = {}
    violations: list[dict] = []
    for ref in _decoder_order(refs.values()):
        if len(ref.shape) != 2:
            continue
        counts = _count_matrix(ref, nm, chunk_bytes)
        entry = dict(_sparsity(counts.zeros, ref.numel), shape=list(ref.shape))
        position = ref.decoder_position
        if position is None:
            other[ref.name] = entry
            continue
        layers.setdefault(position[0], {})[position[1]] = entry
        if counts.violation is not None:
            violations.append({"name": ref.name, "layer": position[0], "module": position[1], **counts.violation})
    layer_entries = [_layer_entry(index, modules) for index, modules in sorted(layers.items())]
    return {
        "path": str(path),
        "files": [file.name for file in sorted({ref.file for ref in refs.values()})],
        "total_parameters": sum(ref.numel for ref in refs.values()),
        "dtypes": _parameters_by_dtype(refs.values()),
        "decoder_linear": _total(layer_entries),
        "layers": layer_entries,
        "modules": _per_module(layer_entries),
        "other_matrices": other,
        "pattern": None if nm is None else _pattern_verdict(pattern, layer_entries, violations),
    }


def summarize_zero_checkpoint(path: Path, tag: str | None, trust_pickle: bool) -> dict:
    """A DeepSpeed ZeRO checkpoint from its pickled structure alone: stage, ranks, shapes and sizes (the weights
    are not read: sparsity is the pruned output's business)."""
    require_trust(path, trust_pickle)
    layout = read_layout(find_tag_dir(path, tag))
    stored = {name: shape for name, shape in layout.shapes.items() if name not in layout.aliases}
    layers: dict[int, dict[str, dict]] = {}
    other = {}
    for name, shape in stored.items():
        match = DECODER_WEIGHT.search(name)
        entry = {"shape": list(shape), "numel": math.prod(shape)}
        if match and len(shape) == 2:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = entry
        else:
            other[name] = entry
    return {
        "path": str(layout.tag_dir),
        "kind": f"deepspeed-zero{layout.stage}",
        "world_size": layout.world_size,
        "ds_version": layout.ds_version,
        "files": [file.name for file in layout.files],
        "stored_bytes": layout.stored_bytes,
        "total_parameters": sum(math.prod(shape) for shape in stored.values()),
        "master_dtype": "float32",
        "tied": layout.aliases,
        "layers": [
            {"layer": index, "numel": sum(m["numel"] for m in modules.values()), "modules": modules}
            for index, modules in sorted(layers.items())
        ],
        "other": other,
    }


def format_zero_summary(summary: dict) -> str:
    layers = summary["layers"]
    lines = [
        f"DeepSpeed {summary['kind'].removeprefix('deepspeed-').upper()} checkpoint {summary['path']}: written by "
        f"{summary['world_size']} rank(s) with deepspeed {summary['ds_version']}; {len(summary['files'])} files, "
        f"{summary['stored_bytes'] / 1e9:.3f} GB with the optimizer state",
        f"{summary['total_parameters']:,} parameters ({summary['master_dtype']} master weights); "
        f"{len(layers)} decoder layers, {sum(layer['numel'] for layer in layers):,} parameters in their matrices",
    ]
    if layers:
        shapes = ", ".join(f"{name} {tuple(m['shape'])}" for name, m in layers[0]["modules"].items())
        lines.append(f"layer 0: {shapes}")
    lines += [f"{name} {tuple(entry['shape'])}" for name, entry in summary["other"].items()]
    lines += [f"{alias} is tied to {stored}" for alias, stored in summary["tied"].items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class _MatrixCount:
    zeros: int
    violation: dict | None  # N:M only: what is wrong with this matrix, None when it conforms


def _count_matrix(ref: TensorRef, nm: tuple[int, int] | None, chunk_bytes: int) -> _MatrixCount:
    """Exact zeros and, for N:M, the groups of M inputs keeping more than N: one pass over the rows."""
    cols = ref.shape[1]
    group = nm[1] if nm is not None and cols % nm[1] == 0 else None
    zeros = bad_groups = 0
    for chunk in row_chunks(ref, rows_per_chunk(ref, chunk_bytes)):
        pruned = chunk == 0
        zeros += int(pruned.sum())
        if group is not None:
            zeros_per_group = pruned.reshape(len(pruned), cols // group, group).sum(dim=-1)
            bad_groups += int((zeros_per_group < group - nm[0]).sum())
    return _MatrixCount(zeros, _nm_violation(ref, nm, bad_groups))


def _nm_violation(ref: TensorRef, nm: tuple[int, int] | None, bad_groups: int) -> dict | None:
    if nm is None:
        return None
    n, m = nm
    rows, cols = ref.shape
    if cols % m:
        return {"bad_groups": None, "groups": None, "reason": f"{cols} inputs, not a multiple of {m}"}
    if bad_groups == 0:
        return None
    groups = rows * cols // m
    reason = f"{bad_groups} of {groups} groups of {m} keep more than {n}"
    return {"bad_groups": bad_groups, "groups": groups, "reason": reason}


def _decoder_order(refs) -> list[TensorRef]:
    """Decoder weights by layer, then in the layer's natural module order; everything else by name after."""

    def key(ref: TensorRef) -> tuple:
        position = ref.decoder_position
        if position is None:
            return (1, 0, 0, ref.name)
        layer, module = position
        rank = MODULE_ORDER.index(module) if module in MODULE_ORDER else len(MODULE_ORDER)
        return (0, layer, rank, module)

    return sorted(refs, key=key)


def _sparsity(zeros: int, numel: int) -> dict:
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}


def _sum_sparsity(entries: Iterable[dict]) -> dict:
    zeros = numel = 0
    for entry in entries:
        zeros, numel = zeros + entry["zeros"], numel + entry["numel"]
    return _sparsity(zeros, numel)


def _layer_entry(index: int, modules: dict[str, dict]) -> dict:
    return {"layer": index, **_sum_sparsity(modules.values()), "modules": modules}


def _total(layer_entries: list[dict]) -> dict:
    return _sum_sparsity(entry for layer in layer_entries for entry in layer["modules"].values())


def _per_module(layer_entries: list[dict]) -> dict[str, dict]:
    """Each module kind summed over the layers: does one kind of matrix carry more of the sparsity?"""
    names = dict.fromkeys(name for layer in layer_entries for name in layer["modules"])
    return {
        name: _sum_sparsity(layer["modules"][name] for layer in layer_entries if name in layer["modules"])
        for name in names
    }


def _parameters_by_dtype(refs) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ref in refs:
        name = DTYPE_NAMES.get(ref.dtype, ref.dtype.lower())
        counts[name] = counts.get(name, 0) + ref.numel
    return counts


def _pattern_verdict(pattern: str | None, layer_entries: list[dict], violations: list[dict]) -> dict:
    checked = sum(len(layer["modules"]) for layer in layer_entries)
    return {"pattern": pattern, "satisfied": not violations, "checked": checked, "violations": violations}


def compare_checkpoints(a: str | Path, b: str | Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """Agreement of the pruning masks (exact zeros) of two checkpoints, over their common decoder weights.

    agreement: fraction of entries pruned in both or kept in both; jaccard: |pruned in both| / |pruned in either|.
    """
    refs_a, refs_b = tensor_refs(Path(a)), tensor_refs(Path(b))
    weights: dict[str, dict] = {}
    mismatches: list[dict] = []
    totals = _Overlap()
    for ref_a in _decoder_order(refs_a[name] for name in refs_a.keys() & refs_b.keys()):
        ref_b = refs_b[ref_a.name]
        position = ref_a.decoder_position or ref_b.decoder_position
        if position is None:
            continue
        if ref_a.shape != ref_b.shape:
            mismatches.append({"name": ref_a.name, "shape_a": list(ref_a.shape), "shape_b": list(ref_b.shape)})
            continue
        overlap = _mask_overlap(ref_a, ref_b, chunk_bytes)
        totals = totals + overlap
        weights[ref_a.name] = {"layer": position[0], "module": position[1], **overlap.as_dict()}
    return {
        "a": str(a),
        "b": str(b),
        **totals.as_dict(),
        "weights": weights,
        "only_in_a": sorted(refs_a.keys() - refs_b.keys()),
        "only_in_b": sorted(refs_b.keys() - refs_a.keys()),
        "shape_mismatches": mismatches,
    }


@dataclass(frozen=True)
class _Overlap:
    """Three counts determine the rest: pruned in either = a + b - both; disagreements = either - both."""

    numel: int = 0
    pruned_a: int = 0
    pruned_b: int = 0
    pruned_both: int = 0

    def __add__(self, other: "_Overlap") -> "_Overlap":
        return _Overlap(*(x + y for x, y in zip(astuple(self), astuple(other), strict=True)))

    def as_dict(self) -> dict:
        pruned_either = self.pruned_a + self.pruned_b - self.pruned_both
        agree = self.numel - (pruned_either - self.pruned_both)
        # Jaccard of two empty pruned sets is undefined: None rather than a misleading 0 or 1.
        return {
            "numel": self.numel,
            "agreement": agree / self.numel if self.numel else None,
            "jaccard": self.pruned_both / pruned_either if pruned_either else None,
            "sparsity_a": self.pruned_a / self.numel if self.numel else None,
            "sparsity_b": self.pruned_b / self.numel if self.numel else None,
        }


def _mask_overlap(ref_a: TensorRef, ref_b: TensorRef, chunk_bytes: int) -> _Overlap:
    step = min(rows_per_chunk(ref_a, chunk_bytes), rows_per_chunk(ref_b, chunk_bytes))
    total = _Overlap()
    for chunk_a, chunk_b in zip(row_chunks(ref_a, step), row_chunks(ref_b, step), strict=True):
        pruned_a, pruned_b = chunk_a == 0, chunk_b == 0
        counts = (pruned_a.numel(), int(pruned_a.sum()), int(pruned_b.sum()), int((pruned_a & pruned_b).sum()))
        total = total + _Overlap(*counts)
    return total


def format_summary(summary: dict) -> str:
    """The summary as terminal text: totals, N:M verdict, then a layers x modules sparsity table."""
    total = summary["decoder_linear"]
    dtypes = ", ".join(f"{name} ({count:,})" for name, count in summary["dtypes"].items())
    lines = [
        f"checkpoint {summary['path']}: {len(summary['files'])} file(s), {summary['total_parameters']:,} parameters",
        f"dtypes: {dtypes}",
        f"decoder Linear weights: {total['numel']:,}, zeros {total['zeros']:,}, sparsity {total['sparsity']:.4f}",
    ]
    if summary["pattern"] is not None:
        lines += _format_pattern_verdict(summary["pattern"])
    rows = [(str(layer["layer"]), layer["sparsity"], layer["modules"]) for layer in summary["layers"]]
    rows.append(("all", total["sparsity"], summary["modules"]))
    lines += ["", "sparsity (exact zeros / numel)", _layer_table(rows, "sparsity")]
    for name, entry in summary["other_matrices"].items():
        lines.append(f"{name} {tuple(entry['shape'])}: sparsity {entry['sparsity']:.4f}")
    return "\n".join(lines)


def _format_pattern_verdict(verdict: dict) -> list[str]:
    if verdict["satisfied"]:
        return [f"{verdict['pattern']}: satisfied by all {verdict['checked']} decoder Linear weights"]
    count = f"{len(verdict['violations'])} of {verdict['checked']}"
    lines = [f"{verdict['pattern']}: violated by {count} decoder Linear weights"]
    lines += [f"  {v['name']}: {v['reason']}" for v in verdict["violations"][:LISTED_NAMES]]
    if len(verdict["violations"]) > LISTED_NAMES:
        lines.append(f"  ... and {len(verdict['violations']) - LISTED_NAMES} more (the JSON summary lists them all)")
    return lines


def format_comparison(comparison: dict) -> str:
    """The comparison as terminal text: overall agreement, a layers x modules agreement table, then differences."""
    lines = [
        f"a: {comparison['a']}",
        f"b: {comparison['b']}",
        f"compared {comparison['numel']:,} decoder weights: mask agreement {_fraction(comparison['agreement'])}, "
        f"Jaccard of pruned sets {_fraction(comparison['jaccard'])}, "
        f"sparsity a {_fraction(comparison['sparsity_a'])}, b {_fraction(comparison['sparsity_b'])}",
    ]
    if comparison["weights"]:
        lines += ["", "mask agreement", _layer_table(_agreement_rows(comparison["weights"]), "agreement")]
    for key, label in (("only_in_a", "only in a"), ("only_in_b", "only in b")):
        lines += _name_list(label, comparison[key])
    lines += [
        f"shape differs: {m['name']} a {tuple(m['shape_a'])} b {tuple(m['shape_b'])}"
        for m in comparison["shape_mismatches"]
    ]
    return "\n".join(lines)


def _agreement_rows(weights: dict[str, dict]) -> list[tuple[str, float | None, dict]]:
    layers: dict[int, dict[str, dict]] = {}
    modules: dict[str, list[dict]] = {}
    for entry in weights.values():
        layers.setdefault(entry["layer"], {})[entry["module"]] = entry
        modules.setdefault(entry["module"], []).append(entry)
    rows = [(str(index), _weighted_agreement(entries.values()), entries) for index, entries in sorted(layers.items())]
    per_module = {name: {"agreement": _weighted_agreement(entries)} for name, entries in modules.items()}
    return rows + [("all", _weighted_agreement(weights.values()), per_module)]


def _weighted_agreement(entries: Iterable[dict]) -> float | None:
    entries = list(entries)
    numel = sum(entry["numel"] for entry in entries)
    return sum(entry["agreement"] * entry["numel"] for entry in entries) / numel if numel else None


def _name_list(label: str, names: list[str]) -> list[str]:
    if not names:
        return []
    shown = ", ".join(names[:LISTED_NAMES])
    more = f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
    return [f"{label} ({len(names)}): {shown}{more}"]


def _layer_table(rows: list[tuple[str, float | None, dict]], key: str) -> str:
    """Rows are (label, row total, {module: entry}); one column per module, named by its last dotted part."""
    modules = list(dict.fromkeys(module for _, _, entries in rows for module in entries))
    table = [["layer", *(module.rsplit(".", 1)[-1] for module in modules), "all"]]
    for label, row_total, entries in rows:
        cells = [_fraction(entries[module][key]) if module in entries else "-" for module in modules]
        table.append([label, *cells, _fraction(row_total)])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in table)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
