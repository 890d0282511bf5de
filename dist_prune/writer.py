"""Writing the pruned checkpoint: one safetensors file per decoder layer as soon as it is finished.

Everything goes into a hidden sibling directory that is renamed into place only when complete, so a
crashed or failed run never leaves a directory that looks like a checkpoint; its manifest lets an
interrupted run resume from its last verified layer. Nothing the user owns is ever replaced: the driver's
checks (`check_output`, `check_gradients_output`) and the publish step refuse it.
"""

import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from .background import Background
from .checkpoint import INDEX_FILE
from .errors import DistPruneError, KeptForResume
from .log import get_logger
from .report import write_report_markdown
from .safe_io import copy_file, is_regular, is_staged, read_json, replace_file, resolved, write_text

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


def list_added_files(out: Path, names: list[str]) -> None:
    """A published output's manifest lists the files a later step wrote into it (`names`: a report plot), so
    that `--overwrite` knows them as its own; anything else found there stays a stranger's."""
    manifest = read_manifest(out)
    manifest["files"] = sorted(set(manifest["files"]) | set(names))
    write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def partial_dir(out: Path) -> Path:
    """Where a run builds `out`: a hidden sibling with a name stable across runs, so --resume finds it."""
    return out.with_name(f".{out.name}.partial")


def layer_file(index: int, num_layers: int) -> str:
    return f"model-layer-{index:05d}-of-{num_layers:05d}.safetensors"


def resumable_partial(out: Path) -> Path | None:
    """The partial directory of an interrupted run for `out` that finished at least one layer, if any."""
    try:
        manifest = read_manifest(partial_dir(out))
    except DistPruneError:
        return None
    return partial_dir(out) if manifest["layers"] else None


def read_manifest(directory: Path, num_layers: int | None = None) -> dict:
    """The manifest of a (partial) output, checked entry by entry: a layer record names exactly its own file
    in `directory` (with `num_layers`, the name this run writes), so nothing outside it is ever reused."""
    manifest = read_json(directory / MANIFEST, "manifest", DistPruneError)
    problem = _manifest_problem(manifest, num_layers)
    if problem:
        raise DistPruneError(f"{directory / MANIFEST} is not a manifest dist_prune wrote ({problem}); "
                             f"move {directory} away to start afresh")  # fmt: skip
    return manifest


def _manifest_problem(manifest, num_layers: int | None) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        return f"no kind {MANIFEST_KIND!r}"
    if not isinstance(manifest.get("settings"), dict) or not isinstance(manifest.get("layers"), dict):
        return "no settings or layers"
    files = manifest.get("files", [])
    if not isinstance(manifest.get("reads", {}), dict) or not isinstance(files, list) or not all(map(_is_str, files)):
        return "reads or files of the wrong type"
    for key, record in manifest["layers"].items():
        problem = _layer_record_problem(key, record, num_layers)
        if problem:
            return f"layer {key[:20]!r}: {problem}"
    return None


def _is_str(value) -> bool:
    return isinstance(value, str)


_LAYER_FILE = re.compile(r"model-layer-(\d{5})-of-(\d{5})\.safetensors")
_RECORD_TYPES = {"file": str, "size": int, "digest": str, "tensors": list, "bytes": int, "entry": dict}


def _layer_record_problem(key: str, record, num_layers: int | None) -> str | None:
    if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in _RECORD_TYPES.items()):
        return "a record without file, size, digest, tensors, bytes and entry"
    match = _LAYER_FILE.fullmatch(record["file"])
    if match is None or str(int(match.group(1))) != key:
        return f"names the file {record['file'][:80]!r}, not its own layer file"
    if num_layers is not None and record["file"] != layer_file(int(key), num_layers):
        return f"names {record['file']!r}; this model's layer file is {layer_file(int(key), num_layers)!r}"
    return None


def check_output(out: Path, source: Path, overwrite: bool) -> None:
    """The driver's check that writing `out` cannot touch what the user owns: never the source model, a
    directory holding it or one inside it; an existing `out` only with --overwrite, only when it is a
    previous dist_prune output, and only when it holds nothing but what that run wrote."""
    _check_apart(out, source, "output")
    if out.is_symlink():
        raise DistPruneError(f"output {out} is a symbolic link: name the folder itself")
    if out.exists() and not overwrite:
        raise DistPruneError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not is_dist_prune_output(out):
        raise DistPruneError(
            f"--overwrite only replaces a previous dist_prune output, and {out} is not one (it has no {MANIFEST})"
        )
    if out.exists():
        _check_only_ours(out)


def _check_only_ours(out: Path) -> None:
    """A previous output may be replaced only whole: anything added to it since it was written is the user's."""
    if "files" not in read_manifest(out):
        raise DistPruneError(f"{out} was written by a dist_prune whose manifest does not list the files it wrote, so "
                             f"--overwrite cannot tell them from yours: remove it yourself")  # fmt: skip
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DistPruneError(f"--overwrite would delete what dist_prune did not write in {out}: {shown}; move it away")


def foreign_files(out: Path) -> list[str]:
    """The entries of a published output its manifest does not list as written by its run (a link or a
    folder always counts: a run writes regular files only)."""
    listed = set(read_manifest(out).get("files", []))
    return sorted(entry.name for entry in out.iterdir() if entry.name not in listed or not is_regular(entry))


def check_partial(out: Path, resume: bool, settings: dict, num_layers: int) -> None:
    """An interrupted run's partial output is continued only with --resume, only with the same settings and
    source model, and only when it holds nothing but regular files that run wrote; nothing in it is touched
    when it is refused."""
    partial = partial_dir(out)
    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise DistPruneError(f"{partial} is not a folder dist_prune made (a link or a file); move it away")
    if not partial.exists() or not any(partial.iterdir()):
        return
    if not resume:
        raise DistPruneError(
            f"{partial} holds an interrupted run for {out}: pass --resume to continue it, or remove it"
        )
    has_manifest = (partial / MANIFEST).exists()
    strangers = [entry.name for entry in partial.iterdir() if not _ours_in_partial(entry, has_manifest)]
    if strangers:
        raise DistPruneError(f"{partial} holds what dist_prune did not write there (or not as a regular file): "
                             f"{', '.join(sorted(strangers)[:5])}; move it away, then --resume")  # fmt: skip
    if has_manifest:
        _check_same_run(partial, read_manifest(partial, num_layers)["settings"], settings)


def _check_same_run(partial: Path, found: dict, settings: dict) -> None:
    settings = json.loads(json.dumps(settings))  # as the manifest gives them back
    changed = sorted(k for k in settings.keys() | found.keys() if settings.get(k) != found.get(k))
    if "source" in changed:
        raise DistPruneError(
            f"the model at {settings.get('model')} is not the one the interrupted run in {partial} read (its "
            f"config.json or weight files differ): --resume would mix two models; put that model back, or remove "
            f"{partial} to start afresh"
        )
    if changed:
        raise DistPruneError(f"--resume needs the interrupted run's settings; these differ: {', '.join(changed)}")


# What a run writes into its partial output, by name: anything else there is not its own.
RUN_FILES = ("model-rest.safetensors", INDEX_FILE, "config.json", "prune_report.json", "prune_config.yaml",
             "calibration.safetensors", "report.md", MANIFEST)  # fmt: skip


def _ours_in_partial(entry: Path, has_manifest: bool) -> bool:
    """Before its manifest a run writes at most its first layer's file (killed before the manifest), so
    without one anything else there is someone else's."""
    name = entry.name
    ours = is_staged(name) or _LAYER_FILE.fullmatch(name) is not None
    if has_manifest:
        plot = name.startswith("report-") and name.endswith(".png")
        ours = ours or plot or name in RUN_FILES or name in TOKENIZER_FILES
    return ours and is_regular(entry)


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


# A layer file's digest: SHA-256 over the SHA-256 digests of its consecutive chunks, so that the chunks hash
# in parallel (one SHA-256 of a 1.7 GB LLaMA-2-70B layer took 2 s on a GPU host's core: longer than the layer's
# compute, which the writing thread must keep up with). Each chunk can be checked with `sha256sum` too.
DIGEST_CHUNK = 64 << 20
DIGEST_THREADS = min(8, os.cpu_count() or 1)


def file_digest(path: Path) -> str:
    starts = range(0, max(path.stat().st_size, 1), DIGEST_CHUNK)
    with ThreadPoolExecutor(max_workers=min(DIGEST_THREADS, len(starts))) as pool:
        chunks = list(pool.map(lambda start: _chunk_sha256(path, start), starts))
    return hashlib.sha256(b"".join(chunks)).hexdigest()


def _chunk_sha256(path: Path, start: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return hashlib.sha256(f.read(DIGEST_CHUNK)).digest()


def _verifies(path: Path, record: dict) -> bool:
    """A regular file of its own (a link is never reused, even to the right bytes) with the recorded size and
    digest."""
    return is_regular(path) and path.stat().st_size == record["size"] and file_digest(path) == record["digest"]


def verify_output(path: Path) -> list[str]:
    """Every file the manifest of a dist_prune output lists, checked against its size and digest: the
    names of those that do not verify."""
    manifest = read_manifest(path)
    return [record["file"] for record in manifest["layers"].values() if not _verifies(path / record["file"], record)]


def is_dist_prune_output(path: Path) -> bool:
    try:
        read_manifest(path)
    except DistPruneError:
        return False
    return True


class Interrupted(KeptForResume):
    """SIGINT or SIGTERM: the run stopped at a layer boundary."""

    exit_code = 130


class OutputTaken(KeptForResume):
    """Something else appeared at --out while the run worked; the complete result waits in the partial output."""


class CheckpointWriter:
    """The output directory, built as a hidden sibling (`.NAME.partial`) and renamed into place when complete.

    The partial directory has a name stable across runs and a manifest (MANIFEST) recording the run's settings
    and, per finished layer, its file's size and digest (`file_digest`), so an interrupted run can be resumed: `resume=True`
    reuses every layer that still verifies. Layers are written and hashed in a thread of their own (when the
    run overlaps; else inline), one at a time, while the caller computes the next (`write_layer` returns at once; `wait` waits for the last). Bad input (a DistPruneError: say NaN weights found in layer 30)
    removes the partial directory, as does any failure before a layer is finished; any other failure, a
    signal, or an output that appeared meanwhile keeps it, and the error says how to resume.
    """

    def __init__(
        self, out: Path, num_layers: int, settings: dict, overwrite: bool = False, resume: bool = False,
        resumable: bool = True, overlap: bool = True,
    ):  # fmt: skip
        """`resumable=False` (structured pruning writes every layer at the end): any failure removes the partial
        directory. `overlap=False`: each layer is written as it is handed over, not behind the next."""
        self.out = out
        self.resumable = resumable
        self.num_layers = num_layers
        self.overwrite = overwrite
        self.partial = partial_dir(out)
        # `reads`: the SHA-256 of each part of the source model as the run read it (provenance.py), so that a
        # --resume notices another model at the same path before it writes anything of it.
        self.manifest = {"kind": MANIFEST_KIND, "complete": False, "settings": settings, "layers": {}, "reads": {}}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._behind = Background("write-behind", overlap)
        if resume:
            self._reopen()

    def _reopen(self) -> None:
        """Resuming with nothing to resume starts afresh: the same command may be repeated. The driver has
        checked the partial directory (`check_partial`): same settings and model, only files of this run."""
        if (self.partial / MANIFEST).is_file():
            found = read_manifest(self.partial, self.num_layers)
            self.manifest["layers"], self.manifest["reads"] = found["layers"], found.get("reads", {})

    def __enter__(self) -> "CheckpointWriter":
        self.partial.mkdir(parents=True, exist_ok=True)
        for entry in self.partial.iterdir():  # a file a kill left half-written under its staging name
            if is_staged(entry.name) and is_regular(entry):
                entry.unlink()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._behind.close()
            return
        try:  # the layer being written still counts for a resume
            self._behind.close()
        except Exception as error:  # noqa: BLE001 - the error already in flight is the one to report
            get_logger().warning("writing the last layer failed too: %s", error)
        bad_input = issubclass(exc_type, DistPruneError) and not issubclass(exc_type, KeptForResume)
        if bad_input or not (self.resumable and self.manifest["layers"]):
            shutil.rmtree(self.partial, ignore_errors=True)

    def verified_layers(self) -> list[dict]:
        """The report entries of the finished layers 0..k-1 whose files still verify (size and digest), in
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
        """Queue the layer's file (host tensors the caller no longer changes), then its line in the manifest
        (written atomically): a layer counts as finished only once both are on disk. The thread adds its write
        and hash seconds to `entry["phases_s"]`; the entry is its until `wait` returns."""
        self._behind.submit(self._write_layer, index, tensors, entry)

    def wait(self) -> float:
        """Wait until the queued layer is written (raising its error); returns the seconds waited."""
        return self._behind.wait()

    def _write_layer(self, index: int, tensors: dict[str, Tensor], entry: dict) -> None:
        filename = layer_file(index, self.num_layers)
        start = time.perf_counter()
        size = self._write(filename, tensors)
        written = time.perf_counter()
        digest = file_digest(self.partial / filename)
        phases = entry.setdefault("phases_s", {})
        phases.update(write=round(written - start, 3), hash=round(time.perf_counter() - written, 3))
        self.manifest["layers"][str(index)] = {
            "file": filename,
            "size": (self.partial / filename).stat().st_size,
            "digest": digest,
            "tensors": sorted(tensors),
            "bytes": size,
            "entry": entry,
        }
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_text(self.partial / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")

    def write_rest(self, tensors: dict[str, Tensor]) -> None:
        """Embeddings, final norm and (untied) lm_head."""
        self.wait()
        self._write("model-rest.safetensors", tensors)

    def _write(self, filename: str, tensors: dict[str, Tensor]) -> int:
        """Returns the bytes of tensor data written."""
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        replace_file(self.partial / filename, lambda staged: save_file(tensors, staged, metadata={"format": "pt"}))
        size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        self.weight_map.update(dict.fromkeys(tensors, filename))
        self.total_size += size
        return size

    def write_json(self, filename: str, payload: dict) -> None:
        write_text(self.partial / filename, json.dumps(payload, indent=2, sort_keys=False) + "\n")

    def save_tensors(self, filename: str, tensors: dict[str, Tensor]) -> None:
        """Extra tensors that are not weights (calibration windows), outside the weight index."""
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        replace_file(self.partial / filename, lambda staged: save_file(tensors, staged))

    def copy_from_source(self, source: Path) -> None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                copy_file(source / name, self.partial / name)

    def finish(self, config: dict, dtype: torch.dtype) -> Path:
        """Index and config last, then one rename makes the directory visible."""
        self.wait()
        config = dict(config, dtype=str(dtype).removeprefix("torch."))
        config.pop("torch_dtype", None)
        self.write_json("config.json", config)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        self.write_json(INDEX_FILE, index)
        self.manifest["complete"] = True
        # What --overwrite may later delete: exactly the files this run wrote, the manifest included.
        self.manifest["files"] = sorted({entry.name for entry in self.partial.iterdir()} | {MANIFEST})
        self._write_manifest()
        self._publish()
        return self.out

    def _publish(self) -> None:
        if not os.path.lexists(self.out):
            self.partial.rename(self.out)
            return
        # Something appeared at `out` while this run worked (another job, another user), or a previous output
        # gained files of the user's: it is not ours to remove unless --overwrite was given and it is a
        # dist_prune output holding only what its run wrote.
        if self.out.is_symlink() or not self.overwrite or not is_dist_prune_output(self.out) or foreign_files(self.out):
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
    write_text(writer.partial / "prune_config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    write_report_markdown(writer.partial, report, config.evaluation.plots)
    writer.copy_from_source(source)
    return writer.finish(model_config, dtype)
