"""Writing the pruned checkpoint: one safetensors file per decoder layer as soon as it is finished.

Everything goes into a hidden sibling directory that is renamed into place only when complete, so a
crashed or failed run never leaves a directory that looks like a checkpoint; its manifest lets an
interrupted run resume from its last verified layer. Nothing the user owns is ever replaced: the driver's
checks (`check_output`, `check_gradients_output`) and the publish step refuse it.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from .checkpoint import INDEX_FILE
from .errors import DistPruneError
from .report import write_report_markdown
from .safe_io import resolved

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


# Written into every output: what `--overwrite` checks before it replaces a directory.
MANIFEST = "dist_prune.json"
MANIFEST_KIND = "dist_prune/pruned-checkpoint"


def partial_dir(out: Path) -> Path:
    """Where a run builds `out`: a hidden sibling with a name stable across runs, so --resume finds it."""
    return out.with_name(f".{out.name}.partial")


def resumable_partial(out: Path) -> Path | None:
    """The partial directory of an interrupted run for `out` that finished at least one layer, if any."""
    try:
        manifest = json.loads((partial_dir(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return partial_dir(out) if manifest.get("layers") else None


def check_output(out: Path, source: Path, overwrite: bool, resume: bool = False) -> None:
    """The driver's check that writing `out` cannot touch what the user owns: never the source model, a
    directory holding it or one inside it; an existing `out` only with --overwrite, and only when it is a
    previous dist_prune output; an interrupted run's partial output only with --resume."""
    _check_apart(out, source, "output")
    if not resume and partial_dir(out).exists():
        raise DistPruneError(
            f"{partial_dir(out)} holds an interrupted run for {out}: pass --resume to continue it, or remove it"
        )
    if out.exists() and not overwrite:
        raise DistPruneError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not is_dist_prune_output(out):
        raise DistPruneError(
            f"--overwrite only replaces a previous dist_prune output, and {out} is not one (it has no {MANIFEST})"
        )


def check_gradients_output(out: Path, source: Path, overwrite: bool, is_gradients_file) -> None:
    """The same for `dist-prune grad --out FILE`: never inside the source model; an existing file only with
    --overwrite, and only when it is a gradients file written by `dist-prune grad`."""
    _check_apart(out, source, "gradients file")
    if out.exists() and not overwrite:
        raise DistPruneError(f"gradients file {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not (out.is_file() and is_gradients_file(out)):
        raise DistPruneError(f"--overwrite only replaces a gradients file written by `dist-prune grad`; {out} is not")


def _check_apart(out: Path, source: Path, what: str) -> None:
    out, source = resolved(out), resolved(source)
    if out == source or out in source.parents or source in out.parents:
        raise DistPruneError(f"the {what} {out} is, holds or lies inside the source model {source}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _verifies(path: Path, record: dict) -> bool:
    return path.is_file() and path.stat().st_size == record["size"] and file_sha256(path) == record["sha256"]


def verify_output(path: Path) -> list[str]:
    """Every file the manifest of a dist_prune output lists, checked against its size and SHA-256: the
    names of those that do not verify."""
    manifest = json.loads((path / MANIFEST).read_text())
    return [record["file"] for record in manifest["layers"].values() if not _verifies(path / record["file"], record)]


def is_dist_prune_output(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("kind") == MANIFEST_KIND
    except (OSError, ValueError, AttributeError):
        return False


class KeptForResume(DistPruneError):
    """A run that ended with its finished layers kept for --resume (other bad input removes them: its result
    would be wrong)."""


class Interrupted(KeptForResume):
    """SIGINT or SIGTERM: the run stopped at a layer boundary."""

    exit_code = 130


class OutputTaken(KeptForResume):
    """Something else appeared at --out while the run worked; the complete result waits in the partial output."""


class CheckpointWriter:
    """The output directory, built as a hidden sibling (`.NAME.partial`) and renamed into place when complete.

    The partial directory has a name stable across runs and a manifest (MANIFEST) recording the run's settings
    and, per finished layer, its file's size and SHA-256, so an interrupted run can be resumed: `resume=True`
    reuses every layer that still verifies. Bad input (a DistPruneError: say NaN weights found in layer 30)
    removes the partial directory, as does any failure before a layer is finished; any other failure, a
    signal, or an output that appeared meanwhile keeps it, and the error says how to resume.
    """

    def __init__(
        self, out: Path, num_layers: int, settings: dict, overwrite: bool = False, resume: bool = False,
        resumable: bool = True,
    ):  # fmt: skip
        """`resumable=False` (structured pruning writes every layer at the end): any failure removes the partial
        directory."""
        self.out = out
        self.resumable = resumable
        self.num_layers = num_layers
        self.overwrite = overwrite
        self.partial = partial_dir(out)
        self.manifest = {"kind": MANIFEST_KIND, "complete": False, "settings": settings, "layers": {}}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        if resume:
            self._reopen(settings)
        elif self.partial.exists():
            raise DistPruneError(
                f"{self.partial} holds an interrupted run for {out}: pass --resume to continue it, or remove it"
            )

    def _reopen(self, settings: dict) -> None:
        """Resuming with nothing to resume starts afresh: the same command may be repeated. Before its manifest a
        run writes at most its first layer's file (killed before the manifest), so anything else there without
        a manifest is someone else's, and is not touched."""
        if not (self.partial / MANIFEST).is_file():
            ours = ("model-layer-", f"{MANIFEST}.tmp")
            if self.partial.exists() and any(not f.name.startswith(ours) for f in self.partial.iterdir()):
                raise DistPruneError(f"{self.partial} holds files dist_prune did not write; move them away first")
            return
        found = json.loads((self.partial / MANIFEST).read_text())
        changed = sorted(
            k for k in settings.keys() | found["settings"].keys() if settings.get(k) != found["settings"].get(k)
        )
        if changed:
            raise DistPruneError(f"--resume needs the interrupted run's settings; these differ: {', '.join(changed)}")
        self.manifest["layers"] = found["layers"]

    def __enter__(self) -> "CheckpointWriter":
        self.partial.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        bad_input = issubclass(exc_type, DistPruneError) and not issubclass(exc_type, KeptForResume)
        if bad_input or not (self.resumable and self.manifest["layers"]):
            shutil.rmtree(self.partial, ignore_errors=True)

    def verified_layers(self) -> list[dict]:
        """The report entries of the finished layers 0..k-1 whose files still verify (size and SHA-256), in
        order; the first that does not ends the list, and it and every later one is done again."""
        entries = []
        for index in range(self.num_layers):
            record = self.manifest["layers"].get(str(index))
            if record is None or not _verifies(self.partial / record["file"], record):
                break
            entries.append(record["entry"])
            self.weight_map.update(dict.fromkeys(record["tensors"], record["file"]))
            self.total_size += record["bytes"]
        for later in range(len(entries), self.num_layers):
            self.manifest["layers"].pop(str(later), None)
        return entries

    def read_layer(self, index: int) -> dict[str, Tensor]:
        return load_file(self.partial / self.manifest["layers"][str(index)]["file"])

    def write_layer(self, index: int, tensors: dict[str, Tensor], entry: dict) -> None:
        """The layer's file, then its line in the manifest (written atomically): a layer counts as finished
        only once both are on disk."""
        filename = f"model-layer-{index:05d}-of-{self.num_layers:05d}.safetensors"
        size = self._write(filename, tensors)
        self.manifest["layers"][str(index)] = {
            "file": filename,
            "size": (self.partial / filename).stat().st_size,
            "sha256": file_sha256(self.partial / filename),
            "tensors": sorted(tensors),
            "bytes": size,
            "entry": entry,
        }
        self._write_manifest()

    def _write_manifest(self) -> None:
        staged = self.partial / f"{MANIFEST}.tmp"
        staged.write_text(json.dumps(self.manifest, indent=1) + "\n")
        os.replace(staged, self.partial / MANIFEST)

    def write_rest(self, tensors: dict[str, Tensor]) -> None:
        """Embeddings, final norm and (untied) lm_head."""
        self._write("model-rest.safetensors", tensors)

    def _write(self, filename: str, tensors: dict[str, Tensor]) -> int:
        """Returns the bytes of tensor data written."""
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        save_file(tensors, self.partial / filename, metadata={"format": "pt"})
        size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        self.weight_map.update(dict.fromkeys(tensors, filename))
        self.total_size += size
        return size

    def write_json(self, filename: str, payload: dict) -> None:
        (self.partial / filename).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")

    def save_tensors(self, filename: str, tensors: dict[str, Tensor]) -> None:
        """Extra tensors that are not weights (calibration windows), outside the weight index."""
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, self.partial / filename)

    def copy_from_source(self, source: Path) -> None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, self.partial / name)

    def finish(self, config: dict, dtype: torch.dtype) -> Path:
        """Index and config last, then one rename makes the directory visible."""
        config = dict(config, dtype=str(dtype).removeprefix("torch."))
        config.pop("torch_dtype", None)
        self.write_json("config.json", config)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        self.write_json(INDEX_FILE, index)
        self.manifest["complete"] = True
        self._write_manifest()
        self._publish()
        return self.out

    def _publish(self) -> None:
        if not self.out.exists():
            self.partial.rename(self.out)
            return
        # Something appeared at `out` while this run worked (another job, another user): it is not ours to
        # remove unless --overwrite was given and it is a dist_prune output.
        if not self.overwrite or not is_dist_prune_output(self.out):
            raise OutputTaken(
                f"{self.out} appeared while this run was working and is left as it is; the result waits in "
                f"{self.partial}: move {self.out} away, then --resume publishes it"
            )
        # Replacing: move the old one aside first so that a complete checkpoint is always at `out`
        # except for the instant between two renames.
        old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        self.out.rename(old)
        self.partial.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)


def finish_run(
    writer: CheckpointWriter, config, report: dict, windows: Tensor | None, source: Path, model_config: dict,
    dtype: torch.dtype,
) -> Path:  # fmt: skip
    """What makes a run reproducible and auditable (the report with its plots, the resolved config, the windows
    used), the tokenizer, config and index; then the directory is published."""
    if windows is not None:
        writer.save_tensors("calibration.safetensors", {"input_ids": windows})
    writer.write_json("prune_report.json", report)
    (writer.partial / "prune_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    write_report_markdown(writer.partial, report)
    writer.copy_from_source(source)
    return writer.finish(model_config, dtype)
