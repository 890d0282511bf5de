"""report.md and its plots, drawn from a real (tiny) prune run's report and checkpoint."""

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from conftest import write_tiny_llama
from safetensors.torch import load_file

from dist_prune.cli import main
from dist_prune.inspection import summarize_checkpoint
from dist_prune.report import (
    DPI,
    LAYER_SPARSITY_FIGSIZE,
    MASK_FIGSIZE,
    MODULE_HEATMAP_FIGSIZE,
    PERPLEXITY_FIGSIZE,
    STRUCTURE_FIGSIZE,
    mask_pictured_weights,
    write_report_markdown,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_FIGSIZES = {
    "report-layer-sparsity.png": LAYER_SPARSITY_FIGSIZE,
    "report-module-sparsity.png": MODULE_HEATMAP_FIGSIZE,
    "report-perplexity.png": PERPLEXITY_FIGSIZE,
    "report-mask-model-layers-0-self_attn-q_proj.png": MASK_FIGSIZE,
    "report-mask-model-layers-1-self_attn-o_proj.png": MASK_FIGSIZE,
    "report-mask-model-layers-2-mlp-down_proj.png": MASK_FIGSIZE,
    "report-structure.png": STRUCTURE_FIGSIZE,
}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has right after its signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def pixels(figsize: tuple[float, float]) -> tuple[int, int]:
    return round(figsize[0] * DPI), round(figsize[1] * DPI)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, text_file) -> Path:
    root = tmp_path_factory.mktemp("report")
    source = write_tiny_llama(root / "source", layers=3)
    out = root / "pruned"
    argv = ["--quiet", "prune", "--model", str(source), "--out", str(out), "--method", "wanda"]
    argv += [
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--no-eval-after",
        "--calib-source",
        str(text_file),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    return out


def run_report(pruned_run: Path) -> dict:
    return json.loads((pruned_run / "prune_report.json").read_text())


def test_summary_matches_the_prune_report(pruned_run):
    report, summary = run_report(pruned_run), summarize_checkpoint(pruned_run)
    assert summary["decoder_linear"]["zeros"] == report["pruned_weights"]
    assert summary["decoder_linear"]["numel"] == report["decoder_linear_weights"]
    for ours, theirs in zip(summary["layers"], report["layers"], strict=True):
        assert ours["layer"] == theirs["layer"]
        assert {m: (e["zeros"], e["numel"]) for m, e in ours["modules"].items()} == {
            m: (e["zeros"], e["numel"]) for m, e in theirs["modules"].items()
        }


def test_full_report_has_every_plot_at_its_size(pruned_run, tmp_path):
    checkpoint = shutil.copytree(pruned_run, tmp_path / "checkpoint")
    report = run_report(checkpoint)
    report["perplexity"] = {"dense": 20.5, "pruned": 31.25, "text": "wikipedia", "seqlen": 512, "windows": 2}
    report["structure"] = [
        {"layer": i, "heads_kept": 3, "heads_total": 4, "channels_kept": 96, "channels_total": 128} for i in range(3)
    ]

    path = write_report_markdown(checkpoint, report)

    assert path == checkpoint / "report.md"
    markdown = path.read_text()
    pngs = sorted(p.name for p in checkpoint.glob("*.png"))
    assert pngs == sorted(EXPECTED_FIGSIZES)
    for name in pngs:
        assert png_size(checkpoint / name) == pixels(EXPECTED_FIGSIZES[name]), name
        assert f"]({name})" in markdown
    assert set(re.findall(r"\]\(([^)]+)\)", markdown)) == set(pngs)
    for text in ("wanda", "unstructured 0.5", "20.500", "31.250", "| layer | sparsity | seconds |", "## Timings"):
        assert text in markdown


def test_report_without_perplexity_or_masks(pruned_run, tmp_path):
    # magnitude draws no masks, so no weights are needed: an empty directory will do.
    report = dict(run_report(pruned_run), method="magnitude", perplexity=None)

    markdown = write_report_markdown(tmp_path, report).read_text()

    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["report-layer-sparsity.png", "report-module-sparsity.png"]
    assert "Not measured" in markdown
    assert "## Masks" not in markdown and "## Structure" not in markdown


def test_no_plots_writes_the_tables_without_figures(pruned_run, text_file, tmp_path):
    source = pruned_run.parent / "source"
    out = tmp_path / "out"
    argv = ["--quiet", "prune", "--model", str(source), "--out", str(out), "--method", "wanda", "--nsamples", "4",
            "--seqlen", "32", "--no-eval-after", "--calib-source", str(text_file), "--device", "cpu", "--no-plots"]  # fmt: skip
    assert main(argv) == 0
    markdown = (out / "report.md").read_text()
    assert not list(out.glob("*.png")) and "](" not in markdown
    assert "| layer | sparsity | seconds |" in markdown
    assert run_report(out)["config"]["evaluation"]["plots"] is False
    assert main(["--quiet", "inspect", str(out), "--verify"]) == 0


def test_masks_pictured_are_first_middle_last(pruned_run):
    layers = run_report(pruned_run)["layers"]
    names = [ref.name for ref in mask_pictured_weights(pruned_run, layers)]
    assert names == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]


def test_report_before_publishing_finds_the_shards(pruned_run, tmp_path):
    # The pipeline draws the report in its partial directory, where the weight index is not written yet.
    partial = tmp_path / "partial"
    partial.mkdir()
    for shard in pruned_run.glob("model-*.safetensors"):
        shutil.copy2(shard, partial / shard.name)
    shutil.copy2(pruned_run / "calibration.safetensors", partial / "calibration.safetensors")

    refs = mask_pictured_weights(partial, run_report(pruned_run)["layers"])

    assert [ref.file.name for ref in refs] == [
        "model-layer-00000-of-00003.safetensors",
        "model-layer-00001-of-00003.safetensors",
        "model-layer-00002-of-00003.safetensors",
    ]
    summary = summarize_checkpoint(partial)
    assert summary["total_parameters"] == sum(
        t.numel() for shard in pruned_run.glob("model-*.safetensors") for t in load_file(shard).values()
    )
