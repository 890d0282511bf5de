"""The Python API end to end in-process, the memory plan, and progress events."""

import io
import json
import subprocess
import sys

import pytest

import dist_prune
from dist_prune.cli import main
from dist_prune.config import build_config
from dist_prune.memory import ModelShape, plan_memory
from dist_prune.progress import Progress

LLAMA2_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_hidden_layers": 80,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def test_import_starts_neither_ray_nor_transformers():
    code = "import sys, dist_prune; print('ray' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_api_as_a_pipeline_stage(tiny_llama, text_file, tmp_path):
    def stage(checkpoint: str) -> tuple[str, dist_prune.Report]:
        report = dist_prune.prune(
            model=checkpoint,
            method="wanda",
            pattern="2:4",
            nsamples=4,
            seqlen=32,
            calib_source=str(text_file),
            eval_text=str(text_file),
            eval_seqlen=32,
            eval_windows=2,
            out=str(tmp_path / "stage-out"),
        )
        return str(report.out), report

    out, report = stage(str(tiny_llama))
    assert report.method == "wanda"
    assert report.total_sparsity == pytest.approx(0.5)
    assert report.perplexity["pruned"] > 0
    assert dist_prune.Report.load(out).data == report.data
    evaluated = dist_prune.evaluate(out, text=str(text_file), seqlen=32, windows=2)
    assert evaluated["perplexity"] == pytest.approx(report.perplexity["pruned"], rel=1e-5)


def test_api_errors_are_distprune_errors(tiny_llama, tmp_path):
    with pytest.raises(dist_prune.DistPruneError, match="sparsity"):
        dist_prune.prune(model=str(tiny_llama), sparsity=1.5, out=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_plan_for_70b_from_config_alone(tmp_path, capsys, monkeypatch):
    import dist_prune.memory

    # an 8-GPU node's host (not this machine's, whose free memory other processes change)
    monkeypatch.setattr(dist_prune.memory, "available_memory", lambda device: 2048 * 2**30 if device == "cpu" else None)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(LLAMA2_70B))
    shape = ModelShape.from_config(LLAMA2_70B)
    assert 68.9e9 < shape.total_params < 69.1e9  # LLaMA-2-70B: 68.98B parameters
    assert shape.layers * shape.layer_linear_params == pytest.approx(68.4e9, rel=0.01)
    args = ["plan", "--model", str(config_file), "--method", "gblm", "--nsamples", "128", "--seqlen", "2048"]
    args += ["--device", "cuda", "--device-memory", "80GiB"]
    assert main([*args, "--workers", "8", "--residency", "resident"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main([*args, "--workers", "1", "--residency", "resident"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_plan_divides_resident_memory_by_workers():
    config = build_config({"prune": {"method": "gblm"}, "runtime": {"residency": "resident"}})
    one = plan_memory(config, LLAMA2_70B)
    four = plan_memory(build_config({"prune": {"method": "gblm"}, "runtime": {"workers": 4}}), LLAMA2_70B)
    assert four.weights == pytest.approx(one.weights / 4, rel=1e-6)
    assert four.phases["gradient_pass"] < one.phases["gradient_pass"]
    assert four.scratch == pytest.approx(one.scratch / 4, rel=1e-6)
    assert "gradient_pass" not in plan_memory(build_config({"prune": {"method": "wanda"}}), LLAMA2_70B).phases


def test_plan_counts_structured_phases_and_the_loaded_files():
    saap = {"method": "saap"}
    plan = plan_memory(build_config({"prune": saap, "structured": {"recover_steps": 10}}), LLAMA2_70B)
    assert {"gradient_pass", "rebuild_smaller", "recovery"} <= set(plan.phases)
    assert "layer_loop" not in plan.phases and plan.residency == "resident"
    # four sharded fp32 sets of sums (batch and total g and F) of the decoder Linears, ~98% of the weights
    assert plan.phases["gradient_pass"] > 4 * 0.97 * plan.weights
    # loading maps this worker's rows of one file at a time
    two = build_config({"prune": saap, "runtime": {"workers": 2}})
    assert plan_memory(two, LLAMA2_70B, largest_file=4 * 10**9).phases["load"] == 2 * 10**9


def test_prune_refuses_a_run_that_cannot_fit(tiny_llama, tmp_path, capsys):
    out = tmp_path / "refused"
    code = main(["prune", "--model", str(tiny_llama), "--out", str(out), "--device-memory", "100MB"])
    assert code == 2
    assert "per worker" in capsys.readouterr().err
    assert not out.exists()


def test_progress_json_events_with_eta_and_timings():
    stream = io.StringIO()
    progress = Progress("json", stream)
    with progress.phase("layers", total=4) as advance:
        for _ in range(4):
            advance(1)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["start", "step", "step", "step", "step", "end"]
    assert events[-1]["done"] == 4 and events[2]["eta_s"] >= 0
    assert progress.timings["layers"] >= 0
