"""Nothing the user owns is deleted or overwritten: every refusal is exit 2, one line, and the file system
byte for byte as it was (source model included, no stray hidden sibling)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from test_bad_input import prune_args

from dist_prune.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too) with its SHA-256: what must not change."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture
def model(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "models" / "llama"))


def refused(capsys, argv: list[str], root: Path, phrase: str) -> str:
    """Exit 2, one line holding `phrase` (returned), and every file under `root` as it was."""
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and phrase in err[0], err
    assert snapshot(root) == before
    return err[0]


@pytest.mark.parametrize("where", ["the model", "its parent", "inside it"])
def test_output_never_is_holds_or_lies_inside_the_model(where, model, text_file, tmp_path, capsys):
    out = {"the model": model, "its parent": model.parent, "inside it": model / "pruned"}[where]
    refused(capsys, prune_args(model, out, text_file, "--overwrite"), tmp_path, "source model")


def test_overwrite_refuses_a_directory_dist_prune_did_not_write(model, text_file, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    refused(capsys, prune_args(model, out, text_file, "--overwrite"), tmp_path, "not one")


def test_overwrite_refuses_an_existing_file(model, text_file, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    refused(capsys, prune_args(model, out, text_file, "--overwrite"), tmp_path, "not one")


def test_overwrite_replaces_a_previous_output(model, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(prune_args(model, out, text_file)) == 0
    assert json.loads((out / "dist_prune.json").read_text())["kind"] == "dist_prune/pruned-checkpoint"
    assert main(prune_args(model, out, text_file, "--overwrite", "--sparsity", "0.3")) == 0
    assert json.loads((out / "prune_report.json").read_text())["config"]["prune"]["sparsity"] == 0.3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("target", ["model.safetensors", "config.json"])
def test_grad_never_writes_into_the_model(target, model, text_file, tmp_path, capsys):
    argv = ["--quiet", "grad", "--model", str(model), "--out", str(model / target), "--overwrite",
            "--nsamples", "2", "--seqlen", "16", "--calib-source", str(text_file)]  # fmt: skip
    refused(capsys, argv, tmp_path, "source model")


def test_grad_overwrite_refuses_a_file_it_did_not_write(model, text_file, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    out.write_bytes(b"not a gradients file")
    argv = ["--quiet", "grad", "--model", str(model), "--out", str(out), "--overwrite",
            "--nsamples", "2", "--seqlen", "16", "--calib-source", str(text_file)]  # fmt: skip
    refused(capsys, argv, tmp_path, "not")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/elsewhere.safetensors"])
def test_index_naming_files_outside_the_checkpoint_is_refused(name, model, text_file, tmp_path, capsys):
    (model / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": name}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    refused(capsys, prune_args(model, out, text_file), tmp_path, "outside the checkpoint directory")
    refused(capsys, ["inspect", str(model)], tmp_path, "outside the checkpoint directory")
    refused(capsys, ["eval", "--model", str(model)], tmp_path, "outside the checkpoint directory")


def test_a_directory_that_appears_during_the_run_is_left_alone(model, text_file, tmp_path, capsys, monkeypatch):
    """Another job creates --out while this one works: this run fails at publish and the newcomer keeps every
    byte; the finished result waits in the hidden partial directory, and --resume publishes it once --out is
    free again."""
    import dist_prune.job

    out = tmp_path / "out"
    prune_layers = dist_prune.job.prune_layers

    def someone_else_writes_out(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("another job's result")
        return prune_layers(*args, **kwargs)

    monkeypatch.setattr(dist_prune.job, "prune_layers", someone_else_writes_out)
    capsys.readouterr()
    assert main(prune_args(model, out, text_file)) == 2
    assert "appeared while this run was working" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".out.partial"]
    monkeypatch.setattr(dist_prune.job, "prune_layers", prune_layers)
    out.rename(tmp_path / "theirs")
    assert main(prune_args(model, out, text_file, "--resume")) == 0
    assert json.loads((out / "prune_report.json").read_text())["resumed_layers"] == 2  # the tiny model's two
    assert (tmp_path / "theirs" / "theirs.txt").read_text() == "another job's result"
