"""The whole prune job on 1, 2 and 3 workers, in both residencies, under every launcher: masks agree.

1 worker runs in-process (`--launcher local`); 2 and 3 workers run the same worker code in spawned
processes with gloo (what torchrun and Ray actors run too); then torchrun itself with --nnodes 2 on
127.0.0.1, Ray actors, and `ray start --head` + `ray job submit`. The tiny model's row counts and the
calibration sequences divide unevenly over 2 and 3 workers.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import spawn_workers, write_tiny_llama
from safetensors import safe_open

from dist_prune.config import build_config

ROOT = Path(__file__).resolve().parents[1]
UNEVEN = dict(hidden_size=48, intermediate_size=100, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
RUNS = {  # name -> prune settings; patterns need widths divisible by M (48 and 100 are by 4)
    "magnitude-matrix": {"method": "magnitude", "magnitude_scope": "matrix"},
    "magnitude-2of4": {"method": "magnitude", "pattern": "2:4"},
    "wanda": {"method": "wanda"},
    "wanda-2of4": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt": {"method": "sparsegpt"},
    "sparsegpt-2of4": {"method": "sparsegpt", "pattern": "2:4"},
    "gblm": {"method": "gblm"},
    # reconstruction fits the kept weights from fp64 sums over workers; OWL's layer sparsities from dense scores
    "wanda-block": {"method": "wanda", "reconstruct": "block"},
    "sparsegpt-owl": {"method": "sparsegpt", "sparsity_profile": "owl", "owl_lambda": 0.05, "reconstruct": "linear"},
}
RECONSTRUCTED = ("wanda-block", "sparsegpt-owl")
RESIDENCIES = ("stream", "resident")
# Structured pruning on the same engine: sharded scores, a rebuilt smaller sharded model, sharded recovery.
STRUCTURED = {name: {"method": name} for name in ("saap", "flap")}
STRUCTURED_SETTINGS = {"ratio": 0.3, "protect_first": 0, "protect_last": 1, "recover_steps": 2}
CALIBRATION = {"nsamples": 5, "seqlen": 32, "seed": 0, "batch_size": 2}
EVALUATION = {"eval_seqlen": 32, "eval_windows": 5}
ENV = {"GLOO_SOCKET_IFNAME": "lo", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def uneven_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("uneven") / "llama", **UNEVEN)


def run_config(model: Path, out: Path, text: Path, settings: dict, residency: str = "resident", **runtime):
    """What the driver hands the workers: residency and activation storage resolved. One thread per worker at
    every world size: BLAS and LAPACK round differently with another thread count (not with another split)."""
    runtime = dict(runtime, residency=residency, activation_storage=runtime.get("activation_storage", "memory"))
    runtime.setdefault("threads", 1)
    return build_config(
        {
            "model": str(model),
            "out": str(out),
            "prune": settings,
            "structured": STRUCTURED_SETTINGS if settings in STRUCTURED.values() else {},
            "calibration": dict(CALIBRATION, calib_source=str(text)),
            "evaluation": dict(EVALUATION, eval_text=str(text), plots=False),  # the masks are compared
            "runtime": runtime,
        }
    )


def all_runs() -> list[tuple[str, dict, str]]:
    """(output name, settings, residency): every method in both residencies; structured runs resident only.
    Stream runs keep the gradient pass's stored inputs on disk, resident ones in memory."""
    runs = [
        (f"{name}-{residency}", settings, residency) for name, settings in RUNS.items() for residency in RESIDENCIES
    ]
    return runs + [(name, settings, "resident") for name, settings in STRUCTURED.items()]


def run_configs(model: Path, out: Path, text: Path) -> list:
    return [
        run_config(model, out / name, text, settings, residency, activation_storage=STORAGE[residency])
        for name, settings, residency in all_runs()
    ]


STORAGE = {"stream": "disk", "resident": "memory"}


def _worker_main(rank: int, world: int, port: int, jobs: list) -> None:
    from dist_prune.distributed import init_workers, on_workers
    from dist_prune.launch import run_job
    from dist_prune.progress import Progress

    os.environ.update(ENV)
    torch.set_num_threads(1)

    def run_all(workers) -> None:
        for resolved in jobs:
            run_job("prune", resolved, workers, Progress("quiet"))

    on_workers(lambda: init_workers(rank, world, "127.0.0.1", port), run_all)


def prune_on_workers(world: int, configs: list) -> None:
    """The configs' jobs in order on `world` spawned workers, resolved once here as the driver does; their stderr
    goes beside the first job's output."""
    from dist_prune.distributed import free_port
    from dist_prune.pipeline import resolve

    jobs = [resolve(replace(c, runtime=replace(c.runtime, workers=world))) for c in configs]
    log_dir = Path(configs[0].out).parent / f"worker-logs-w{world}"
    spawn_workers(_worker_main, world, (world, free_port(), jobs), log_dir)


@pytest.fixture(scope="module")
def outputs(uneven_llama, text_file, tmp_path_factory) -> dict[int, Path]:
    """Every run at 1 (in-process, through the CLI's API), 2 and 3 workers."""
    from dist_prune import prune

    root = tmp_path_factory.mktemp("engine")
    for config in run_configs(uneven_llama, root / "w1", text_file):
        prune(config)
    for world in (2, 3):
        prune_on_workers(world, run_configs(uneven_llama, root / f"w{world}", text_file))
    assert not list(root.rglob(".dist_prune-scratch*")), "scratch files left behind"
    return {world: root / f"w{world}" for world in (1, 2, 3)}


def decoder_masks(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    masks = {}
    for name, file in index.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            with safe_open(path / file, framework="pt") as f:
                masks[name] = f.get_tensor(name) == 0
    return masks


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(a[n].numel() for n in a)


def same_masks(a: Path, b: Path) -> bool:
    first, second = decoder_masks(a), decoder_masks(b)
    return first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize("residency", RESIDENCIES)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("run", list(RUNS))
def test_masks_do_not_depend_on_the_number_of_workers(outputs, world, run, residency):
    """Identical, not merely close: statistics and gradient sums are fp64 and batches are cut before the
    sequences are split, so no rounding depends on the split."""
    name = f"{run}-{residency}"
    assert same_masks(outputs[1] / name, outputs[world] / name), f"{name}: masks differ at {world} workers"


def decoder_weights(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {}
    for name, file in index.items():
        if name.startswith("model.layers."):
            with safe_open(path / file, framework="pt") as f:
                weights[name] = f.get_tensor(name)
    return weights


@pytest.mark.parametrize("residency", RESIDENCIES)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("run", RECONSTRUCTED)
def test_reconstructed_weights_do_not_depend_on_the_number_of_workers(outputs, world, run, residency):
    """Every fitted weight, bit for bit: each worker fits its own rows from the same summed statistics."""
    name = f"{run}-{residency}"
    one, many = decoder_weights(outputs[1] / name), decoder_weights(outputs[world] / name)
    assert one.keys() == many.keys()
    assert all(torch.equal(one[n], many[n]) for n in one), f"{name}: weights differ at {world} workers"
    report = json.loads((outputs[world] / name / "prune_report.json").read_text())
    assert all("reconstruction_error_after" in m for layer in report["layers"] for m in layer["modules"].values())


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("run", list(RUNS))
def test_stream_equals_resident(outputs, world, run):
    assert same_masks(outputs[world] / f"{run}-stream", outputs[world] / f"{run}-resident")
    stream = json.loads((outputs[world] / f"{run}-stream" / "prune_report.json").read_text())
    resident = json.loads((outputs[world] / f"{run}-resident" / "prune_report.json").read_text())
    assert stream["perplexity"]["pruned"] == resident["perplexity"]["pruned"]
    assert all(w["weight_bytes"] == 0 for w in stream["workers"])  # nothing resident in stream mode
    assert sum(w["weight_bytes"] for w in resident["workers"]) > 0


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("run", list(RUNS))
def test_perplexity_does_not_depend_on_the_number_of_workers(outputs, world, run):
    single = json.loads((outputs[1] / f"{run}-stream" / "prune_report.json").read_text())["perplexity"]
    many = json.loads((outputs[world] / f"{run}-stream" / "prune_report.json").read_text())["perplexity"]
    assert many["pruned"] == pytest.approx(single["pruned"], rel=1e-9)
    assert many["dense"] == pytest.approx(single["dense"], rel=1e-9)


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            state.update({name: f.get_tensor(name) for name in f.keys() if name != "input_ids"})
    return state


@pytest.mark.parametrize("name", STRUCTURED)
@pytest.mark.parametrize("world", [2, 3])
def test_structured_pruning_does_not_depend_on_the_number_of_workers(outputs, world, name):
    """Same heads and channels removed (group scores summed over row shards), the same recovered weights up
    to float summation order (FLAP's compensation biases too), the same perplexities."""
    single, many = outputs[1] / name, outputs[world] / name
    report_1, report_w = (json.loads((p / "prune_report.json").read_text()) for p in (single, many))
    assert report_w["structure"] == report_1["structure"]
    assert report_w["parameters"] == report_1["parameters"]
    assert report_w["parameters"]["removed"] > 0
    state_1, state_w = checkpoint_state(single), checkpoint_state(many)
    assert state_1.keys() == state_w.keys()
    for name, tensor in state_1.items():
        torch.testing.assert_close(state_w[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for key in ("dense", "before_recovery", "pruned"):
        assert report_w["perplexity"][key] == pytest.approx(report_1["perplexity"][key], rel=1e-4)
    assert report_w["recovery"]["losses"] == pytest.approx(report_1["recovery"]["losses"], rel=1e-4)
    assert len(report_w["workers"]) == world


def test_engine_matches_the_plain_single_process_maths(outputs, uneven_llama, text_file):
    """The worker engine at 1 worker against the pure functions applied layer by layer on a plain model."""
    from transformers import AutoModelForCausalLM

    from dist_prune.checkpoint import load_tokenizer
    from dist_prune.data import calibration_stream, calibration_windows
    from dist_prune.layerwise import collect_input_statistics, embed_batches, run_layer
    from dist_prune.methods import GroupMember
    from dist_prune.methods.wanda import WANDA
    from dist_prune.models import EMBEDDING, LINEAR_INPUT_OWNER, LINEARS, Shell, family_of

    config = run_config(uneven_llama, outputs[1] / "unused", text_file, RUNS["wanda"])
    windows = calibration_windows(config, calibration_stream(config, load_tokenizer(uneven_llama)))
    model = AutoModelForCausalLM.from_pretrained(uneven_llama, dtype=torch.float32).eval()
    embedding = {EMBEDDING: model.model.embed_tokens.weight.detach()}
    stem = Shell(family_of(model.config), model.config, embedding, torch.float32, "cpu")
    inputs = embed_batches(stem, list(windows.split(2)))
    expected = {}
    for index, layer in enumerate(model.model.layers):
        stats = collect_input_statistics(layer, inputs, with_hessian=False)
        for name in LINEARS:
            linear = layer.get_submodule(name)
            owner = LINEAR_INPUT_OWNER[name]
            outcome = WANDA.prune({name: GroupMember(linear.weight.data)}, config.prune, stats[owner], None)[name]
            linear.weight.data = outcome.weight
            expected[f"model.layers.{index}.{name}.weight"] = linear.weight.data == 0
        inputs = run_layer(layer, inputs)
    got = decoder_masks(outputs[1] / "wanda-stream")
    assert agreement(expected, got) >= 0.9999


def _cli(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env={**os.environ, **ENV, **env}, capture_output=True, text=True, timeout=600)


def _prune_args(model: Path, out: Path, text: Path, run: str) -> list[str]:
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in RUNS[run].items()]
    calibration = [f"--{k.replace('_', '-')}={v}" for k, v in {**CALIBRATION, **EVALUATION}.items()]
    return [
        "--quiet", "prune", "--model", str(model), "--out", str(out), *settings, *calibration,
        "--calib-source", str(text), "--eval-text", str(text), "--no-plots",
    ]  # fmt: skip


def test_torchrun_two_nodes_on_loopback(outputs, uneven_llama, text_file, tmp_path):
    from dist_prune.distributed import free_port

    out, port = tmp_path / "torchrun", free_port()
    args = _prune_args(uneven_llama, out, text_file, "gblm") + ["--launcher", "torchrun"]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "dist_prune",
                *args,
            ],
            cwd=ROOT,
            env={**os.environ, **ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert same_masks(outputs[1] / "gblm-resident", out)
    assert json.loads((out / "prune_report.json").read_text())["machine"]["workers"] == 2


def test_ray_actors(outputs, uneven_llama, text_file, tmp_path, ray_head):
    out = tmp_path / "ray"
    args = _prune_args(uneven_llama, out, text_file, "sparsegpt") + ["--launcher", "ray", "--workers", "2"]
    result = _cli([sys.executable, "-m", "dist_prune", *args], RAY_ADDRESS=ray_head)
    assert result.returncode == 0, result.stderr[-3000:]
    assert same_masks(outputs[1] / "sparsegpt-resident", out)


def test_ray_worker_error_reaches_the_driver(uneven_llama, tmp_path, ray_head):
    """Too little calibration text is found inside the workers: one clear message, exit 2, nothing written."""
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of text.")
    out = tmp_path / "never"
    args = _prune_args(uneven_llama, out, short, "wanda") + ["--launcher", "ray", "--workers", "2"]
    result = _cli([sys.executable, "-m", "dist_prune", *args], RAY_ADDRESS=ray_head)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "calibration text has" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_ray_job_submit(uneven_llama, text_file, tmp_path, ray_head):
    ray = str(Path(sys.executable).with_name("ray"))
    out = tmp_path / "job"
    args = _prune_args(uneven_llama, out, text_file, "wanda")[1:] + ["--workers", "2"]  # the script adds prune
    args = [a for a in args if a != "prune"]
    result = _cli(
        [ray, "job", "submit", "--address", "http://127.0.0.1:8265", "--",
         sys.executable, str(ROOT / "launchers" / "prune_job.py"), *args],
        RAY_ADDRESS=ray_head,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (out / "prune_report.json").is_file()


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "launchers" / "prune70b.yaml").read_text())
    validate_config(prepare_config(config))
    commands = " ".join(config["setup_commands"])
    assert "pip install" in commands and "torch==2.13.0" in commands
