"""Resume, overwrite and concurrent runs against a hostile or careless file system: --resume never writes
through a link, never reuses a file outside its partial output, never mixes two models; --overwrite never
deletes what the user added; one run per output, one scratch folder per output. Every refusal is exit 2,
one line, and every file under the test's folder byte for byte as it was."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_tiny_llama
from test_resume import ROOT, _wait_for_layers, args, assert_identical
from test_user_files import refused, snapshot

from dist_prune.cli import main

PARTIAL = ".out.partial"
MANIFEST = "dist_prune.json"


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("hostile-resume") / "llama", layers=4)


def crash_at(monkeypatch, index: int) -> None:
    """The run dies (not bad input) when it reaches layer `index`: layers below it are finished and kept."""
    import dist_prune.job

    prune_layer = dist_prune.job._prune_layer

    def crash(run, layer, at, *rest):
        if at == index:
            raise RuntimeError("the machine went away")
        return prune_layer(run, layer, at, *rest)

    monkeypatch.setattr(dist_prune.job, "_prune_layer", crash)


@pytest.fixture(scope="module")
def interrupted(four_layers, text_file, tmp_path_factory) -> Path:
    """The partial output of a wanda run on the 4-layer model killed at layer 2 (layers 0 and 1 finished)."""
    root = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as patch:
        crash_at(patch, 2)
        with pytest.raises(RuntimeError, match="went away"):
            main(args(four_layers, root / "out", text_file, "wanda"))
    assert sorted(json.loads((root / PARTIAL / MANIFEST).read_text())["layers"]) == ["0", "1"]
    return root / PARTIAL


@pytest.fixture
def partial(interrupted, tmp_path) -> Path:
    return Path(shutil.copytree(interrupted, tmp_path / PARTIAL, symlinks=True))


def resume(model: Path, tmp_path: Path, text: Path, *extra: str) -> list[str]:
    return args(model, tmp_path / "out", text, "wanda", "--resume", *extra)


@pytest.mark.parametrize(
    "name",
    ["dist_prune.json.tmp", "prune_report.json", "config.json", "report.md", "tokenizer.json",
     "model.safetensors.index.json", "model-layer-00003-of-00004.safetensors", "model-rest.safetensors"],
)  # fmt: skip
def test_resume_never_writes_through_a_link_in_the_partial_output(
    name, partial, four_layers, text_file, tmp_path, capsys
):  # fmt: skip
    """A link standing under a name the run writes (the manifest's staging file, the run files, a layer still
    to do): refused before any work, and the file it points to keeps every byte."""
    victim = tmp_path / "thesis.tex"
    victim.write_text("years of work")
    (partial / name).symlink_to(victim)
    refused(capsys, resume(four_layers, tmp_path, text_file), tmp_path, "not as a regular file")
    assert victim.read_text() == "years of work"


def test_a_finished_layer_that_became_a_link_is_never_reused(partial, four_layers, text_file, tmp_path, capsys):
    """Layer 0's file moved out and linked back: the bytes verify, the link is still refused (it would be
    published as a link to a file outside the output)."""
    layer = partial / "model-layer-00000-of-00004.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(layer, outside)
    layer.symlink_to(outside)
    refused(capsys, resume(four_layers, tmp_path, text_file), tmp_path, "model-layer-00000-of-00004.safetensors")


@pytest.mark.parametrize("name", ["report.md", "notes"])
def test_a_folder_inside_the_partial_output_is_refused(name, partial, four_layers, text_file, tmp_path, capsys):
    (partial / name).mkdir()
    (partial / name / "mine.txt").write_text("keep")
    refused(capsys, resume(four_layers, tmp_path, text_file), tmp_path, name)


def test_a_partial_output_that_is_a_link_is_refused(partial, four_layers, text_file, tmp_path, capsys):
    """`.out.partial` pointing at a folder of the user's: nothing in that folder is written or removed."""
    theirs = tmp_path / "theirs"
    partial.rename(theirs)
    partial.symlink_to(theirs)
    refused(capsys, resume(four_layers, tmp_path, text_file), tmp_path, "link")
    refused(capsys, args(four_layers, tmp_path / "out", text_file, "wanda"), tmp_path, "link")


MANIFESTS = {  # what a broken or hostile manifest holds -> what the one line says
    "a list": ("[1, 2]", "not a manifest dist_prune wrote"),
    "truncated": ('{"kind": "dist_prune/pruned-checkpoint", "sett', "not valid JSON"),
    "no layers": ('{"kind": "dist_prune/pruned-checkpoint", "settings": {}}', "no settings or layers"),
    "nested a million deep": ("[" * 10**6 + "]" * 10**6, "nested too deeply"),
}


def edit_manifest(partial: Path, edit) -> None:
    manifest = json.loads((partial / MANIFEST).read_text())
    edit(manifest["layers"])
    (partial / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_a_malformed_manifest_is_one_line(case, partial, four_layers, text_file, tmp_path, capsys):
    text, phrase = MANIFESTS[case]
    (partial / MANIFEST).write_text(text)
    refused(capsys, resume(four_layers, tmp_path, text_file), tmp_path, phrase)


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/tmp/outside.safetensors", "model-layer-00001-of-00004.safetensors"]
)
def test_a_manifest_naming_another_file_is_refused(name, partial, four_layers, text_file, tmp_path, capsys):
    """A layer record naming a file outside the partial output (or another layer's file): never reused,
    so the published index can never point outside the output."""
    if name.startswith(".."):  # there, with the right bytes
        shutil.copy(partial / "model-layer-00000-of-00004.safetensors", partial / name)
    edit_manifest(partial, lambda layers: layers["0"].update(file=name))
    refused(capsys, resume(four_layers, tmp_path, text_file), tmp_path, "not its own layer file")


@pytest.mark.parametrize("field,value", [("size", "148920"), ("tensors", None), ("digest", 7)])
def test_a_layer_record_of_the_wrong_shape_is_refused(field, value, partial, four_layers, text_file, tmp_path, capsys):
    edit_manifest(partial, lambda layers: layers["1"].update({field: value}))
    refused(capsys, resume(four_layers, tmp_path, text_file), tmp_path, "layer '1'")


def test_a_model_replaced_by_another_of_the_same_shape_is_refused(
    partial, four_layers, text_file, tmp_path, capsys
):  # fmt: skip
    """Same config.json, same headers, other weights: the first layer the resumed run reads differs from what
    the interrupted run read, and nothing of the new model is written; the finished layers stay."""
    model = Path(shutil.copytree(four_layers, tmp_path / "llama"))
    manifest = json.loads((partial / MANIFEST).read_text())
    manifest["settings"]["model"] = str(model)  # the same run, as if it had been started on this copy
    (partial / MANIFEST).write_text(json.dumps(manifest))
    replace_weights(model)
    refused(capsys, resume(model, tmp_path, text_file), tmp_path, "is not the one the interrupted run read")


def replace_weights(model: Path) -> None:
    """Another model of the same shape, written over `model`'s weights file."""
    other = write_tiny_llama(model.with_name("other"), layers=4, seed=1)
    shutil.copy(other / "model.safetensors", model / "model.safetensors")
    shutil.rmtree(other)


def test_a_model_of_another_shape_is_refused_before_any_work(partial, four_layers, text_file, tmp_path, capsys):
    model = Path(shutil.copytree(four_layers, tmp_path / "llama"))
    manifest = json.loads((partial / MANIFEST).read_text())
    manifest["settings"]["model"] = str(model)
    (partial / MANIFEST).write_text(json.dumps(manifest))
    shutil.rmtree(model)
    write_tiny_llama(model, layers=4, intermediate_size=64)
    refused(capsys, resume(model, tmp_path, text_file), tmp_path, "config.json or weight files differ")


def test_overwrite_names_what_the_user_added_and_deletes_nothing(four_layers, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(four_layers, out, text_file, "wanda")) == 0
    (out / "my-eval.json").write_text("{}")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("ship it")
    (out / "link").symlink_to(tmp_path / "elsewhere")
    refused(capsys, args(four_layers, out, text_file, "wanda", "--overwrite"), tmp_path, "link, my-eval.json, notes")


def test_overwrite_refuses_an_output_whose_manifest_is_broken(four_layers, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(four_layers, out, text_file, "wanda")) == 0
    (out / MANIFEST).write_text('{"kind": "dist_prune/pruned-checkpoint"')
    refused(capsys, args(four_layers, out, text_file, "wanda", "--overwrite"), tmp_path, "not one")
    refused(capsys, ["inspect", str(out), "--verify"], tmp_path, "not valid JSON")


def test_a_run_holding_the_output_keeps_a_second_one_out(four_layers, text_file, tmp_path, capsys):
    """The lock is the kernel's, on the partial output: a second run, or a second --resume, is refused before
    any work (here the first run is this process holding the lock, as a run's driver does)."""
    from dist_prune.safe_io import locked_dir

    with locked_dir(tmp_path / PARTIAL, "busy"):
        for extra in ((), ("--resume",), ("--overwrite",)):
            refused(capsys, args(four_layers, tmp_path / "out", text_file, "wanda", *extra), tmp_path, "another")
    assert not (tmp_path / PARTIAL).exists()  # the lock's folder goes when it is left empty


def test_a_second_process_on_the_same_output_is_refused(text_file, tmp_path, capsys):
    """Two real processes: while one prunes, the same command (with or without --resume) is refused at once,
    and the first one finishes unharmed."""
    model = write_tiny_llama(tmp_path / "slow", layers=16, hidden_size=256, intermediate_size=512, head_dim=64)
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "dist_prune", *args(model, out, text_file, "sparsegpt")],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_layers(tmp_path / PARTIAL, 1, first)
    for extra in ((), ("--resume",)):
        capsys.readouterr()
        assert main(args(model, out, text_file, "sparsegpt", *extra)) == 2
        assert "another dist_prune run is writing" in capsys.readouterr().err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert main(["--quiet", "inspect", str(out), "--verify"]) == 0


def scratch_folder(out: Path, scratch: Path) -> Path:
    from dist_prune.config import build_config
    from dist_prune.job import _scratch

    config = build_config({"out": str(out), "runtime": {"scratch": str(scratch)}})
    return _scratch(config, SimpleNamespace(rank=0, world_size=1)).dir


def gblm(model: Path, out: Path, text: Path, scratch: Path, *extra: str) -> list[str]:
    return args(model, out, text, "gblm", "--residency", "stream", "--scratch", str(scratch), *extra)


def crash_in_first_layer(monkeypatch) -> None:
    """After the gradient pass kept its rows, before any layer is finished (nothing for the manifest)."""
    crash_at(monkeypatch, 0)


def test_outputs_of_one_name_in_two_folders_never_share_scratch(four_layers, text_file, tmp_path, monkeypatch):
    """a/out crashes and keeps its gradient rows for --resume; b/out, run meanwhile under the same --scratch,
    neither clears them nor reads them; a/out then resumes from them without a new gradient pass."""
    import dist_prune.job

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    crash_at(monkeypatch, 1)
    with pytest.raises(RuntimeError):
        main(gblm(four_layers, a, text_file, scratch))
    monkeypatch.undo()
    kept = snapshot(scratch_folder(a, scratch))
    assert any(name.startswith("gradients-") for name in kept)
    assert main(gblm(four_layers, b, text_file, scratch)) == 0
    assert snapshot(scratch_folder(a, scratch)) == kept
    passes = []
    monkeypatch.setattr(dist_prune.job, "_gradient_pass", lambda *a, **k: passes.append(1))
    assert main(gblm(four_layers, a, text_file, scratch, "--resume")) == 0
    assert passes == [] and not any(scratch.iterdir())
    assert_identical(a, b)


@pytest.mark.parametrize("name", ["gradients-settings.json", "gradients-3.safetensors"])
def test_a_link_in_the_scratch_folder_is_never_written_through(
    name, four_layers, text_file, tmp_path, monkeypatch
):  # fmt: skip
    """A link put in a crashed run's scratch folder under a name the run writes: removed (the link, not its
    target), the rows are made again, and the file it pointed to keeps every byte."""
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    crash_in_first_layer(monkeypatch)
    with pytest.raises(RuntimeError):
        main(gblm(four_layers, out, text_file, scratch))
    monkeypatch.undo()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"the user's bytes")
    folder = scratch_folder(out, scratch)
    (folder / name).unlink()
    (folder / name).symlink_to(victim)
    assert main(gblm(four_layers, out, text_file, scratch, "--resume")) == 0
    assert victim.read_bytes() == b"the user's bytes" and not any(scratch.iterdir())


def test_a_scratch_folder_that_is_a_link_is_refused(four_layers, text_file, tmp_path, capsys):
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.bin").write_bytes(b"keep")
    scratch.mkdir()
    scratch_folder(out, scratch).symlink_to(theirs)
    refused(capsys, gblm(four_layers, out, text_file, scratch), tmp_path, "link or not a folder")


def test_gradient_rows_of_a_replaced_model_are_never_used(four_layers, text_file, tmp_path, monkeypatch, capsys):
    """Killed after the gradient pass and before any layer was finished, so no manifest, only the rows in
    scratch: the model replaced by another of the same shape is noticed when its first layer is read."""
    model = Path(shutil.copytree(four_layers, tmp_path / "llama"))
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    crash_in_first_layer(monkeypatch)
    with pytest.raises(RuntimeError):
        main(gblm(model, out, text_file, scratch))
    monkeypatch.undo()
    replace_weights(model)
    refused(
        capsys, gblm(model, out, text_file, scratch, "--resume"), tmp_path, "is not the one the interrupted run read"
    )


def test_a_resumed_run_says_which_layers_it_reused(partial, four_layers, text_file, tmp_path, capsys):
    layer1 = partial / "model-layer-00001-of-00004.safetensors"
    layer1.write_bytes(layer1.read_bytes()[:-8] + bytes(8))  # same size, other bytes
    argv = [a for a in resume(four_layers, tmp_path, text_file) if a != "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming: layers 0-0 of the interrupted run verify and are reused" in err
    assert "layer 1's file does not verify: the interrupted run's layers 1-1 are done again" in err
    assert "resumed: layers 0-0 were reused from the interrupted run" in err
    assert not os.path.lexists(partial)
