"""The memory plan per residency, from config.json alone: what fits where, and what the driver decides."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from dist_prune import memory
from dist_prune.cli import main
from dist_prune.config import build_config, load_config
from dist_prune.errors import ConfigError
from dist_prune.memory import check_fits, check_residency, gib, plan_memory, resolve_runtime, worker_sequences

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
LLAMA2 = {  # hidden, intermediate, heads, kv heads, layers
    "7b": (4096, 11008, 32, 32, 32),
    "13b": (5120, 13824, 40, 40, 40),
    "70b": (8192, 28672, 64, 8, 80),
}
PAPER_CALIBRATION = {"nsamples": 128, "seqlen": 2048, "batch_size": 4}


def llama2(size: str) -> dict:
    hidden, mlp, heads, kv, layers = LLAMA2[size]
    return dict(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=kv,
                num_hidden_layers=layers, vocab_size=32000, model_type="llama", torch_dtype="bfloat16")  # fmt: skip


def on_gpus(method: str, workers: int, residency: str = "auto", prune: dict | None = None, **runtime):
    return build_config({
        "prune": {"method": method, **(prune or {})},
        "calibration": PAPER_CALIBRATION,
        "evaluation": {"eval_seqlen": 2048},
        "runtime": {"device": "cuda", "workers": workers, "residency": residency, **runtime},
    })  # fmt: skip


@pytest.fixture
def host_memory(monkeypatch):
    """Sets the host's available memory the plan sees (a CUDA device is never there in these tests)."""

    def set_to(available: int | None) -> None:
        monkeypatch.setattr(memory, "available_memory", lambda device: available if device == "cpu" else None)

    set_to(2048 * GiB)  # a p5.48xlarge
    return set_to


@pytest.fixture
def llama2_70b(tmp_path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(llama2("70b")))
    return path


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gblm"])
def test_70b_streams_through_one_80gib_gpu(method):
    stream = plan_memory(on_gpus(method, 1, "stream"), llama2("70b"), 80 * GiB)
    resident = plan_memory(on_gpus(method, 1, "resident"), llama2("70b"), 80 * GiB)
    assert stream.fits and stream.weights == 0 and stream.peak < 40 * GiB
    assert not resident.fits  # 80 layers of 16-bit weights alone are 127.5 GiB
    assert resident.weights == pytest.approx(127.5 * GiB, rel=0.01)


def test_70b_gblm_states_its_host_memory_and_scratch_disk():
    in_memory = plan_memory(on_gpus("gblm", 1, "stream", activation_storage="memory"), llama2("70b"), 80 * GiB)
    on_disk = plan_memory(on_gpus("gblm", 1, "stream", activation_storage="disk"), llama2("70b"), 80 * GiB)
    stored = 80 * 128 * 2048 * 8192 * 2  # every layer's input for 128 sequences of 2048 tokens, bf16
    gradient_rows = 80 * memory.ModelShape.from_config(llama2("70b")).layer_linear_params * 4
    assert in_memory.stored_inputs == stored == pytest.approx(320 * GiB)
    assert in_memory.host_peak - on_disk.host_peak == stored
    # page-locked buffers: two layers read ahead, two layers' fp32 gradient rows; worker 0 two layers written
    layer = memory.ModelShape.from_config(llama2("70b")).layer_params * 2
    assert 6 * layer < on_disk.host_peak - memory.CUDA_HOST_BASELINE < 7 * layer
    assert 2 * layer < on_disk.writer_host < 2.3 * layer
    assert on_disk.host_total == on_disk.host_peak + on_disk.writer_host  # one worker on the host
    assert in_memory.scratch == gradient_rows == pytest.approx(255 * GiB, rel=0.01)
    assert on_disk.scratch == gradient_rows + stored
    assert on_disk.peak == in_memory.peak  # where the inputs wait does not touch the GPU
    fp16 = on_gpus("gblm", 1, "stream", {"gradient_dtype": "fp16"}, activation_storage="disk")
    assert plan_memory(fp16, llama2("70b"), 80 * GiB).scratch == gradient_rows // 2 + stored


def test_70b_gblm_on_one_8_gpu_node_fits_resident():
    plan = plan_memory(on_gpus("gblm", 8), llama2("70b"), 80 * GiB)
    assert plan.residency == "resident" and plan.fits
    assert plan.stored_inputs == 80 * 16 * 2048 * 8192 * 2  # 32 batches of 4 over 8 workers: 16 sequences each


def test_plan_cli_shows_both_residencies_and_exits_3_when_neither_fits(llama2_70b, host_memory, capsys):
    args = ["plan", "--model", str(llama2_70b), "--method", "gblm", "--nsamples", "128", "--seqlen", "2048"]
    assert main([*args, "--device", "cuda", "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "residency resident" in out and "residency stream" in out
    assert "DOES NOT FIT" in out and "the run would use: stream" in out
    assert "host memory" in out and "scratch disk" in out
    assert main([*args, "--device", "cuda", "--device-memory", "8GiB"]) == 3
    assert "nothing fits" in capsys.readouterr().out


def test_resolve_runtime_picks_resident_only_when_it_fits(llama2_70b, host_memory):
    small = resolve_runtime(on_gpus("wanda", 1, device_memory="80GiB"), llama2_70b)
    large = resolve_runtime(on_gpus("wanda", 1, device_memory="200GiB"), llama2_70b)
    assert small.runtime.residency == "stream" and large.runtime.residency == "resident"
    assert small.prune == large.prune and small.calibration == large.calibration  # nothing else changes


def test_stored_inputs_go_to_disk_when_the_host_is_short(llama2_70b, host_memory):
    config = on_gpus("gblm", 1, device_memory="80GiB")
    assert resolve_runtime(config, llama2_70b).runtime.activation_storage == "memory"  # 320 of 2048 GiB
    host_memory(512 * GiB)  # 320 GiB would leave too little for the rest of the host
    assert resolve_runtime(config, llama2_70b).runtime.activation_storage == "disk"
    asked = replace(config, runtime=replace(config.runtime, activation_storage="memory"))
    check_fits(memory.plan_for(asked, llama2_70b))  # asked for, and it fits (with little room to spare)
    host_memory(256 * GiB)
    with pytest.raises(ConfigError, match="host memory"):
        check_fits(memory.plan_for(asked, llama2_70b))


def test_a_cpu_run_counts_stored_inputs_against_its_one_memory():
    cpu = build_config({"prune": {"method": "gblm"}, "runtime": {"device": "cpu", "activation_storage": "memory"}})
    disk = replace(cpu, runtime=replace(cpu.runtime, activation_storage="disk"))
    in_memory, on_disk = plan_memory(cpu, llama2("7b")), plan_memory(disk, llama2("7b"))
    assert in_memory.phases["gradient_pass"] - on_disk.phases["gradient_pass"] == in_memory.stored_inputs
    assert in_memory.host_peak == in_memory.peak  # the host is the device


def test_a_cpu_run_overlaps_only_when_asked_and_the_plan_counts_the_two_layers_it_holds(llama2_70b, host_memory):
    cpu = build_config({"prune": {"method": "sparsegpt"}, "runtime": {"device": "cpu", "residency": "stream"}})
    asked = replace(cpu, runtime=replace(cpu.runtime, overlap=True))
    assert resolve_runtime(cpu, llama2_70b).runtime.overlap is False
    assert resolve_runtime(asked, llama2_70b).runtime.overlap is True
    assert resolve_runtime(on_gpus("wanda", 1, device_memory="80GiB"), llama2_70b).runtime.overlap is True
    serial, overlapped = plan_memory(cpu, llama2("13b")), plan_memory(asked, llama2("13b"))
    layer_as_read = (4 * 5120 * 5120 + 3 * 5120 * 13824 + 2 * 5120) * 2  # bf16: the Linears and the two norms
    # one layer read ahead and one written behind
    assert overlapped.phases["layer_loop"] - serial.phases["layer_loop"] == 2 * layer_as_read


def test_saap_refuses_to_stream(llama2_70b, host_memory):
    saap = build_config({"prune": {"method": "saap"}, "runtime": {"residency": "stream"}})
    with pytest.raises(ConfigError, match="saap runs resident only"):
        check_residency(saap)
    with pytest.raises(ConfigError, match="saap runs resident only"):
        resolve_runtime(saap, llama2_70b)
    auto = replace(saap, runtime=replace(saap.runtime, residency="auto"))
    assert resolve_runtime(auto, llama2_70b).runtime.residency == "resident"


def test_batches_go_whole_to_workers():
    assert worker_sequences(128, 4, 8) == 16
    assert worker_sequences(128, 4, 3) == 44  # 32 batches: 11 for the largest share
    assert worker_sequences(10, 8, 1) == 10  # never more than there are


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("llama2-*.yaml")), ids=lambda p: p.stem)
def test_recipes_fit_their_cluster_shape(recipe, tmp_path, host_memory, capsys):
    """Each recipe fits the 80 GB GPUs its `workers` says, and its header states the plan's device peak."""
    config = load_config(recipe)
    model = llama2(recipe.stem.split("-")[1])
    plan = plan_memory(config, model, 80 * GiB)
    assert plan.fits and plan.residency == config.runtime.residency
    stated = re.search(r"predicts a device peak of ([\d.]+ GiB) per worker", recipe.read_text())
    assert stated and stated.group(1) == gib(plan.peak)
    (tmp_path / "config.json").write_text(json.dumps(model))
    assert main(["plan", "--config", str(recipe), "--model", str(tmp_path / "config.json")]) == 0
