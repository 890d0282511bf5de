"""Reading ahead and writing behind the compute (background.py), the layer files' digest, and the time split
every run reports (prune_report.json)."""

import hashlib
import json
import threading
import time

import pytest

from dist_prune.background import Background, Prefetcher
from dist_prune.cli import main
from dist_prune.writer import DIGEST_CHUNK, file_digest


def test_background_runs_one_task_at_a_time_and_raises_its_error_in_the_caller():
    behind, running, order = Background("test"), threading.Event(), []

    def slow(name):
        running.set()
        time.sleep(0.2)
        order.append(name)

    behind.submit(slow, "first")
    running.wait()
    waited = behind.submit(slow, "second")  # waits for the first: at most one pending
    assert order == ["first"] and waited >= 0.1
    behind.wait()
    assert order == ["first", "second"]

    def broken():
        raise OSError("disk full")

    behind.submit(broken)
    with pytest.raises(OSError, match="disk full"):
        behind.submit(order.append, "never")
    assert "never" not in order
    behind.close()


def test_the_prefetcher_reads_the_next_value_ahead_and_survives_another_order():
    loads = []

    def load(key):
        loads.append((key, threading.current_thread().name))
        return key * 10

    reader = Prefetcher(load, "test-read")
    assert reader.get(0, then=1) == 0
    assert reader.get(1, then=2) == 10  # read ahead, in the reader's thread
    assert loads[1][0] == 1 and loads[1][1].startswith("test-read")
    assert reader.get(5) == 50  # not what was read ahead: read now, the read ahead dropped
    assert reader.get(6) == 60
    reader.close()


def test_a_read_ahead_error_reaches_the_caller():
    def load(key):
        if key == 1:
            raise ValueError("corrupt shard")
        return key

    reader = Prefetcher(load, "test-read")
    reader.get(0, then=1)
    with pytest.raises(ValueError, match="corrupt shard"):
        reader.get(1)
    reader.close()


def test_without_overlap_tasks_and_reads_run_in_the_callers_thread():
    caller, seen = threading.current_thread().name, []
    behind = Background("test", overlap=False)
    behind.submit(lambda: seen.append(threading.current_thread().name))
    assert seen == [caller]  # done before submit returned

    def broken():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # raised at once, not at the next submit
        behind.submit(broken)
    behind.close()

    reader = Prefetcher(lambda key: seen.append((key, threading.current_thread().name)) or key, "test", overlap=False)
    assert reader.get(0, then=1) == 0 and reader.get(1, then=2) == 1
    assert seen[1:] == [(0, caller), (1, caller)]  # nothing read ahead
    reader.close()


@pytest.mark.parametrize("size", [0, 10, DIGEST_CHUNK, 2 * DIGEST_CHUNK + 7])
def test_the_digest_is_sha256_of_the_chunks_sha256(tmp_path, size):
    data = bytes((i * 7) % 251 for i in range(min(size, 4096))) * (size // 4096 + 1)
    data = data[:size]
    path = tmp_path / "layer.safetensors"
    path.write_bytes(data)
    chunks = [data[i : i + DIGEST_CHUNK] for i in range(0, max(size, 1), DIGEST_CHUNK)]
    expected = hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()
    assert file_digest(path) == expected
    if size:
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit in the last chunk
        assert file_digest(path) != expected


def test_every_run_reports_where_its_time_went_and_overlap_changes_no_weight(tiny_llama, text_file, tmp_path):
    """GBLM streaming with its layer inputs on disk: every reader and writer in the background, or inline (the
    CPU's default), writes the same bytes."""
    out = tmp_path / "out"
    args = ["--quiet", "prune", "--model", str(tiny_llama), "--method", "gblm", "--nsamples", "4", "--seqlen",
            "32", "--calib-source", str(text_file), "--eval-text", str(text_file), "--eval-seqlen", "32",
            "--eval-windows", "2", "--device", "cpu", "--residency", "stream", "--activation-storage", "disk"]  # fmt: skip
    assert main([*args, "--out", str(out), "--overlap"]) == 0
    assert main([*args, "--out", str(tmp_path / "inline")]) == 0
    layer_files = sorted(out.glob("model-layer-*.safetensors"))
    assert layer_files
    for layer_file in layer_files:
        assert layer_file.read_bytes() == (tmp_path / "inline" / layer_file.name).read_bytes()
    report = json.loads((out / "prune_report.json").read_text())
    assert report["config"]["runtime"]["overlap"] is True
    assert json.loads((tmp_path / "inline" / "prune_report.json").read_text())["config"]["runtime"]["overlap"] is False
    loop_phases = {"read_wait", "h2d", "forward", "statistics", "pruning", "d2h", "write_wait"}
    for layer in report["layers"]:
        assert loop_phases | {"read", "write", "hash"} <= layer["phases_s"].keys()
        # the loop thread's phases fit in the layer's wall time (the background's overlap it)
        assert sum(layer["phases_s"][p] for p in loop_phases) <= layer["seconds"] + 0.01
    totals = report["layer_phases_s"]
    assert totals["forward"] == pytest.approx(sum(layer["phases_s"]["forward"] for layer in report["layers"]), abs=0.01)
    loop = report["layer_loop"]
    assert loop["layers"] == len(report["layers"])
    assert loop["compute_s"] == pytest.approx(totals["forward"] + totals["statistics"] + totals["pruning"], abs=0.01)
    assert loop["wall_over_compute"] == pytest.approx(loop["wall_s"] / loop["compute_s"], rel=0.01)
    assert {"forward", "backward", "d2h", "scratch_write"} <= report["gradient_pass_phases_s"].keys()


@pytest.mark.parametrize("overlap", ["--overlap", "--no-overlap"])
def test_a_failed_layer_write_stops_the_run_and_keeps_the_written_layers(
    tiny_llama, text_file, tmp_path, monkeypatch, overlap
):
    """The writer (its thread, or inline) fails on layer 1: the run stops with that error (exit 1, not later,
    not silently), and the partial output keeps layer 0 for --resume."""
    import dist_prune.writer

    write = dist_prune.writer.CheckpointWriter._write_layer

    def failing(self, index, tensors, entry):
        if index == 1:
            raise OSError("No space left on device")
        return write(self, index, tensors, entry)

    monkeypatch.setattr(dist_prune.writer.CheckpointWriter, "_write_layer", failing)
    out = tmp_path / "out"
    args = ["--quiet", "prune", "--model", str(tiny_llama), "--out", str(out), "--method", "wanda", "--nsamples",
            "4", "--seqlen", "32", "--calib-source", str(text_file), "--no-eval-after", "--device", "cpu",
            overlap]  # fmt: skip
    with pytest.raises(OSError, match="No space left"):
        main(args)
    manifest = json.loads((tmp_path / ".out.partial" / "dist_prune.json").read_text())
    assert sorted(manifest["layers"]) == ["0"] and not out.exists()
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / "prune_report.json").read_text())["resumed_layers"] == 1
    assert main(["--quiet", "inspect", str(out), "--verify"]) == 0
