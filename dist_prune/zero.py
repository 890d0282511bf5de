"""DeepSpeed ZeRO training checkpoints as a source of weights, read one parameter at a time.

A `save_checkpoint` folder holds `latest` (the newest tag) and tag folders (`global_stepN/`) of
`*_model_states.pt` (names and shapes; for ZeRO-1/2 also the 16-bit module on rank 0) and one
`*_optim_states.pt` per data-parallel rank (that rank's partition of the fp32 master weights, with the Adam
moments). The master weights are what we prune: they are the trained model at full precision.

These files are Python pickles, and unpickling runs code named in the file: nothing here loads one unless the
user passed --trust-pickle (`require_trust`). They are memory-mapped (`torch.load(mmap=True)`), so opening a
70B checkpoint reads only its pickled structure; `ZeroWeights.read` opens them for each parameter, copies it
out and closes them again, so the pages read never accumulate in the process.

- ZeRO-3: DeepSpeed's own lazy reader (`zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`)
  gives one pseudo-tensor per parameter that gathers its slices from every rank's partition when asked.
- ZeRO-1/2: that reader concatenates every rank's whole partition first (the full fp32 model in memory), so
  instead each rank's `param_slice_mappings` (DeepSpeed's own record of where each parameter's fragment lies
  in the rank's partition) locate one parameter's fragments, which are concatenated in rank order.
"""

import contextlib
import io
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import CheckpointError, shown
from .safe_io import read_bounded

LATEST = "latest"
MODEL_STATES = "*_model_states.pt"
OPTIM_STATES = "*_optim_states.pt"
STAGE3_MODEL_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
STAGE12_MODEL_STATES = "mp_rank_00_model_states.pt"
INSTALL_HINT = "reading a DeepSpeed checkpoint needs deepspeed: pip install 'dist_prune[deepspeed]'"


def is_zero_checkpoint(path: Path) -> bool:
    """A `save_checkpoint` folder (holding `latest` or tag folders) or one tag folder."""
    if not path.is_dir():
        return False
    return (path / LATEST).is_file() or any(path.glob(MODEL_STATES)) or any(path.glob(f"*/{MODEL_STATES}"))


def require_trust(path: Path, trust_pickle: bool) -> None:
    if not trust_pickle:
        raise CheckpointError(
            f"{path} is a DeepSpeed checkpoint: its *_states.pt files are Python pickles, and loading a pickle runs "
            f"whatever code its writer put in it. Pass --trust-pickle to read it if you trust where it came from; "
            f"nothing has been loaded"
        )


def find_tag_dir(path: Path, tag: str | None) -> Path:
    """The tag folder to read: `tag` under `path`, the one `latest` names, or `path` itself."""
    if tag is not None:
        if not (path / tag).is_dir():
            raise CheckpointError(f"DeepSpeed checkpoint {path} has no tag folder {tag!r} (--ds-tag)")
        return path / tag
    if (path / LATEST).is_file():
        tag = read_bounded(path / LATEST, 4096, "DeepSpeed tag file", CheckpointError).decode(errors="replace").strip()
        if not tag or not (path / tag).is_dir():
            raise CheckpointError(f"{path / LATEST} names tag {tag!r}, but {path / tag} is not there")
        return path / tag
    if any(path.glob(MODEL_STATES)):
        return path
    tags = sorted(p.parent.name for p in path.glob(f"*/{MODEL_STATES}"))
    raise CheckpointError(f"{path} has no `latest` file: name the tag to read with --ds-tag ({', '.join(tags)})")


def beside(tag_dir: Path) -> tuple[Path, ...]:
    """Where a trainer leaves config.json and the tokenizer: the tag folder, or the folder holding it."""
    return tag_dir, tag_dir.parent


@dataclass(frozen=True)
class ZeroLayout:
    """What a ZeRO checkpoint holds, from its pickled structure alone (no weights read)."""

    tag_dir: Path
    stage: int
    world_size: int
    shapes: dict[str, tuple[int, ...]]  # every parameter's full shape, including tied aliases
    aliases: dict[str, str]  # a tied parameter's second name -> the name it is stored under
    ds_version: str
    files: tuple[Path, ...]

    @property
    def stored_bytes(self) -> int:
        return sum(file.stat().st_size for file in self.files)


def read_layout(tag_dir: Path) -> ZeroLayout:
    """The checkpoint's stage, world size and parameter shapes; refuses a missing partition or a mismatch."""
    model_files, optim_files = _state_files(tag_dir, MODEL_STATES), _state_files(tag_dir, OPTIM_STATES)
    if not optim_files:
        raise CheckpointError(
            f"{tag_dir} has no {OPTIM_STATES} files: dist_prune reads the fp32 master weights, which DeepSpeed "
            f"saves with the optimizer state"
        )
    with _opened(model_files[0]) as states, _structure(model_files[0]):
        shapes = _parameter_shapes(states, model_files[0])
        aliases = {alias: stored for alias, stored in (states.get("shared_params") or {}).items() if stored in shapes}
        shapes.update({alias: shapes[stored] for alias, stored in aliases.items()})
        ds_version = str(states.get("ds_version"))
    stage, world_size = _partitioning(optim_files)
    expected = world_size if stage == 3 else 1
    if len(model_files) != expected:
        raise CheckpointError(
            f"{tag_dir}: ZeRO-{stage} saved by {world_size} ranks should hold {expected} {MODEL_STATES} file(s), "
            f"found {len(model_files)}: a rank's files are missing, or tags were mixed"
        )
    if stage == 3:
        ranks = sorted(int(m.group(1)) for f in model_files if (m := STAGE3_MODEL_STATES.search(f.name)))
        if ranks != list(range(world_size)):
            raise CheckpointError(f"{tag_dir}: model-states files of ranks {ranks}, expected 0 to {world_size - 1}")
    elif model_files[0].name != STAGE12_MODEL_STATES:
        raise CheckpointError(f"{tag_dir}: ZeRO-{stage} checkpoint without {STAGE12_MODEL_STATES}")
    return ZeroLayout(tag_dir, stage, world_size, shapes, aliases, ds_version, (*model_files, *optim_files))


def _state_files(tag_dir: Path, pattern: str) -> list[Path]:
    def natural(path: Path) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]

    return sorted(tag_dir.glob(pattern), key=natural)


def _parameter_shapes(states: dict, file: Path) -> dict[str, tuple[int, ...]]:
    if "param_shapes" not in states:
        raise CheckpointError(f"{file} is not a DeepSpeed model-states file (no param_shapes)")
    shapes = {name: _shape(shape) for group in states["param_shapes"] for name, shape in group.items()}
    shapes.update({name: _shape(shape) for name, shape in (states.get("frozen_param_shapes") or {}).items()})
    return shapes


def _shape(shape) -> tuple[int, ...]:
    dims = tuple(int(n) for n in shape)
    if any(n < 0 for n in dims):
        raise ValueError(f"negative size in shape {dims}")
    return dims


def _partitioning(optim_files: list[Path]) -> tuple[int, int]:
    """(ZeRO stage, ranks that wrote the partitions), the same in every file and matching their number."""
    seen = set()
    for file in optim_files:
        with _opened(file) as states, _structure(file):
            optimizer = states.get("optimizer_state_dict") or {}
            if "zero_stage" not in optimizer:
                raise CheckpointError(f"{file} is not a ZeRO optimizer-states file (no zero_stage)")
            count = optimizer["partition_count"]
            seen.add((int(optimizer["zero_stage"]), max(count) if isinstance(count, list) else int(count)))
    if len(seen) != 1:
        raise CheckpointError(f"the {OPTIM_STATES} files disagree on stage and world size: {sorted(seen)}")
    stage, world_size = seen.pop()
    if world_size != len(optim_files):
        raise CheckpointError(
            f"{optim_files[0].parent}: the checkpoint was written by {world_size} ranks but holds "
            f"{len(optim_files)} {OPTIM_STATES} file(s): a partition is missing or comes from another run"
        )
    if stage not in (1, 2, 3):
        raise CheckpointError(f"{optim_files[0]}: unknown ZeRO stage {stage}")
    return stage, world_size


class ZeroWeights:
    """Parameters of a ZeRO checkpoint by name, whole or by rows, rounded to `dtype` as they are read."""

    def __init__(self, layout: ZeroLayout, dtype: torch.dtype):
        self.layout, self.dtype = layout, dtype
        # One read at a time: the stream layer loop reads ahead in a thread, and a read silences DeepSpeed by
        # swapping the process's stdout and stderr, which two overlapping reads would restore in the wrong order.
        self._reading = threading.Lock()

    def shape(self, name: str) -> list[int]:
        if name not in self.layout.shapes:
            raise CheckpointError(f"the checkpoint has no tensor {name}")
        return list(self.layout.shapes[name])

    def read(self, names: list[str], rows: dict[str, range] | None = None) -> dict[str, Tensor]:
        with self._reading:
            return self._read(names, rows)

    def _read(self, names: list[str], rows: dict[str, range] | None) -> dict[str, Tensor]:
        for name in names:
            self.shape(name)
        opener = _stage3_parameters if self.layout.stage == 3 else _stage12_parameters
        tensors = {}
        for name in names:
            # The partitions are mapped for one parameter at a time, so the pages read are let go before the
            # next: at most one fp32 parameter (its pages and its gathered copy) on top of what is returned.
            with opener(self.layout) as parameters:
                # DeepSpeed saved the master weights as tensors that require grad: detached, or every use
                # downstream would record autograd history.
                full = parameters(name).detach()
                block = rows.get(name) if rows else None
                tensors[name] = (full[block.start : block.stop] if block else full).to(self.dtype, copy=True)
                del full
        return tensors


@contextlib.contextmanager
def _stage3_parameters(layout: ZeroLayout) -> Iterator:
    with _quiet(), _as_checkpoint_error(layout.tag_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        lazy = get_fp32_state_dict_from_zero_checkpoint(
            str(layout.tag_dir.parent), tag=layout.tag_dir.name, lazy_mode=True
        )

    def parameter(name: str) -> Tensor:
        with _as_checkpoint_error(layout.tag_dir):
            return lazy[name].contiguous().view(layout.shapes[name])

    try:
        yield parameter
    finally:
        lazy.clear()  # drops the memory-mapped partitions


@contextlib.contextmanager
def _stage12_parameters(layout: ZeroLayout) -> Iterator:
    model_file, optim_files = layout.files[0], layout.files[1:]
    with contextlib.ExitStack() as stack:
        model_states = stack.enter_context(_opened(model_file))
        partitions = [stack.enter_context(_opened(f))["optimizer_state_dict"] for f in optim_files]
        frozen = model_states.get("frozen_param_fragments") or {}

        def parameter(name: str) -> Tensor:
            name = layout.aliases.get(name, name)
            if name in frozen:  # ZeRO-1/2 keep frozen parameters whole in the model states
                return frozen[name].float().clone()
            with _structure(optim_files[0]):
                pieces = [piece for states in partitions for piece in _fragments(states, name, optim_files[0])]
            shape = layout.shapes[name]
            if sum(p.numel() for p in pieces) != torch.Size(shape).numel():
                raise CheckpointError(f"{layout.tag_dir}: the partitions do not hold all of {name}")
            return torch.cat(pieces).view(shape)

        yield parameter


def _fragments(states: dict, name: str, file: Path) -> list[Tensor]:
    """This rank's slices of parameter `name` in its fp32 partition, located by DeepSpeed's slice mappings."""
    if "param_slice_mappings" not in states:
        raise CheckpointError(f"{file}: written by a DeepSpeed without param_slice_mappings (before 0.6)")
    pieces = []
    for group, mapping in zip(states["single_partition_of_fp32_groups"], states["param_slice_mappings"], strict=True):
        if name in mapping:
            fragment = mapping[name]
            if fragment.start + fragment.numel > group.numel():
                raise CheckpointError(f"{file}: {name}'s fragment lies beyond the partition (truncated?)")
            pieces.append(group[fragment.start : fragment.start + fragment.numel])
    return pieces


@contextlib.contextmanager
def _opened(file: Path) -> Iterator[dict]:
    """One pickled states file, memory-mapped; dropped (unmapped) on leaving."""
    try:
        with _quiet():
            states = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    except ModuleNotFoundError as err:
        raise CheckpointError(f"{INSTALL_HINT} ({err})") from None
    except Exception as err:  # torch.load reports a truncated zip, a bad pickle, ... each its own way
        raise CheckpointError(f"{file} cannot be read: truncated or corrupt ({type(err).__name__}: {err})") from None
    if not isinstance(states, dict):
        raise CheckpointError(f"{file} is not a DeepSpeed states file")
    try:
        yield states
    finally:
        del states


@contextlib.contextmanager
def _structure(file: Path):
    """The user trusted the pickle to run; its structure can still be anything: one line, not a traceback."""
    try:
        yield
    except (TypeError, AttributeError, KeyError, ValueError, IndexError, RuntimeError) as err:
        raise CheckpointError(
            f"{file} does not have the structure of a DeepSpeed checkpoint ({type(err).__name__}: {shown(str(err))})"
        ) from None


@contextlib.contextmanager
def _quiet():
    """DeepSpeed prints progress and tqdm bars while it reads; our own log says what is being read."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _as_checkpoint_error(tag_dir: Path):
    try:
        yield
    except ModuleNotFoundError as err:
        raise CheckpointError(f"{INSTALL_HINT} ({err})") from None
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, IndexError) as err:
        raise CheckpointError(f"DeepSpeed cannot read {tag_dir}: {err}") from None
