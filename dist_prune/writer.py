"""Writing the pruned checkpoint: one safetensors file per decoder layer as soon as it is finished.

Everything goes into a hidden sibling directory that is renamed into place only when complete, so a
crashed or failed run never leaves a directory that looks like a checkpoint.
"""

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint import INDEX_FILE
from .errors import DistPruneError
from .report import write_report_markdown

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


class CheckpointWriter:
    """Use as a context manager: on an exception the partial directory is removed."""

    def __init__(self, out: Path, num_layers: int, overwrite: bool = False):
        self.out = out
        self.num_layers = num_layers
        self.overwrite = overwrite
        if out.exists() and not overwrite:
            raise DistPruneError(f"output {out} already exists (pass --overwrite to replace it)")
        self.partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def __enter__(self) -> "CheckpointWriter":
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.partial, ignore_errors=True)

    def write_layer(self, index: int, tensors: dict[str, Tensor]) -> None:
        self._write(f"model-layer-{index:05d}-of-{self.num_layers:05d}.safetensors", tensors)

    def write_rest(self, tensors: dict[str, Tensor]) -> None:
        """Embeddings, final norm and (untied) lm_head."""
        self._write("model-rest.safetensors", tensors)

    def _write(self, filename: str, tensors: dict[str, Tensor]) -> None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        save_file(tensors, self.partial / filename, metadata={"format": "pt"})
        for name, tensor in tensors.items():
            self.weight_map[name] = filename
            self.total_size += tensor.numel() * tensor.element_size()

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
        self._publish()
        return self.out

    def _publish(self) -> None:
        if not self.out.exists():
            self.partial.rename(self.out)
            return
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
