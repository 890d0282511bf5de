"""Zero-shot accuracy through lm-evaluation-harness (dist_prune/zeroshot.py): the suite's documents, the
harness's log-likelihoods against the project's own layer-by-layer forward, one line for each kind of data
that is not there, `eval --tasks` end to end and generation speed on a tiny model."""

import json
import sys

import pytest
import torch

from dist_prune.cli import main
from dist_prune.errors import DistPruneError
from dist_prune.zeroshot import SUITE_SHA256, bigbench_documents, suite_task


def test_bigbench_documents_follow_the_task_file():
    task = {
        "task_prefix": "Answer.\n",
        "examples": [
            {"input": "2 + 2?", "target_scores": {"3": 0, "4": 1, "5": 0}},
            {"input": "Sky?", "target_scores": {"blue": 1, "green": 0}},
        ],
    }
    documents = bigbench_documents(task, seed=0)
    assert sorted(d["prompt"] for d in documents) == ["Answer.\n\nQ: 2 + 2?\nA:", "Answer.\n\nQ: Sky?\nA:"]
    by_prompt = {d["prompt"]: d for d in documents}
    assert by_prompt["Answer.\n\nQ: 2 + 2?\nA:"]["choices"][by_prompt["Answer.\n\nQ: 2 + 2?\nA:"]["label"]] == "4"
    assert by_prompt["Answer.\n\nQ: Sky?\nA:"]["chance"] == 0.5
    assert bigbench_documents(task, seed=0) == documents  # the order is seeded: --limit takes the same examples


@pytest.mark.parametrize("name", list(SUITE_SHA256))
def test_every_suite_task_is_shipped_intact_and_multiple_choice(name):
    task = suite_task(name)
    documents = bigbench_documents(task)
    assert len(documents) == len(task["examples"]) >= 40
    assert all(len(d["choices"]) >= 2 and 0 <= d["label"] < len(d["choices"]) for d in documents)


def test_a_changed_suite_file_is_refused(tmp_path, monkeypatch):
    import dist_prune.zeroshot

    name = "human_organs_senses"
    changed = suite_task(name)
    changed["examples"][0]["target_scores"] = {"wrong": 1}
    (tmp_path / f"{name}.json").write_text(json.dumps(changed))
    monkeypatch.setattr(dist_prune.zeroshot, "SUITE_DIR", tmp_path)
    with pytest.raises(DistPruneError, match="SHA-256"):
        suite_task(name)


def test_the_harness_log_likelihood_is_the_projects_own_forward(tiny_llama):
    """HFLM adds nothing: its log-likelihood of a few suite choices equals the sum of the continuation tokens'
    log-probabilities from the project's layer-by-layer forward (models.Shell + each decoder layer), on the
    same tokens (the context's, then the rest of the context + continuation's)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from safetensors.torch import load_file

    from dist_prune.checkpoint import inspect_checkpoint, load_model, load_tokenizer
    from dist_prune.layerwise import embed_batches, run_layer
    from dist_prune.models import Shell, family_of, layer_prefix

    info = inspect_checkpoint(tiny_llama)
    model, tokenizer = load_model(info, torch.device("cpu")), load_tokenizer(tiny_llama)
    document = bigbench_documents(suite_task("general_knowledge"))[0]
    pairs = [(document["prompt"], " " + choice) for choice in document["choices"][:3]]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    harness = [value for value, _ in HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2).loglikelihood(requests)]

    config, state = model.config, load_file(tiny_llama / "model.safetensors")
    family = family_of(config)
    shell = Shell(family, config, {n: state[n] for n in family.rest_shapes(config)}, torch.float32, "cpu")
    layers = [
        family.decoder_layer(config, i, {n: t for n, t in state.items() if n.startswith(layer_prefix(i))}, torch.float32)
        for i in range(config.num_hidden_layers)
    ]
    for (context, continuation), value in zip(pairs, harness, strict=True):
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        tokens = torch.tensor([whole])
        inputs = embed_batches(shell, [tokens])
        for layer in layers:
            inputs = run_layer(layer, inputs)
        log_probs = torch.log_softmax(shell.logits(inputs.hidden[0])[0].double(), dim=-1)
        own = sum(log_probs[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole)))
        assert value == pytest.approx(own, abs=1e-4)


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_an_unknown_task_is_one_line(tiny_llama, capsys):
    assert main(["eval", "--model", str(tiny_llama), "--tasks", "no_such_task"]) == 2
    line = one_line_error(capsys)
    assert "unknown task 'no_such_task'" in line and "bigbench" in line


def test_a_harness_task_whose_data_is_not_here_is_one_line(tiny_llama, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as on these machines: no hub
    assert main(["eval", "--model", str(tiny_llama), "--tasks", "arc_easy", "--limit", "2"]) == 2
    line = one_line_error(capsys)
    assert "arc_easy is not on this machine" in line and "datasets cache" in line and "--tasks bigbench" in line


def test_without_the_harness_installed_the_message_says_what_to_install(tiny_llama, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["eval", "--model", str(tiny_llama), "--tasks", "bigbench"]) == 2
    assert "pip install 'dist_prune[zeroshot]'" in one_line_error(capsys)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--tasks", "bigbench", "--limit", "0"], "--limit must be at least 1"),
        (["--limit", "5"], "--limit and --against go with --tasks or --generation"),
    ],
)
def test_bad_zero_shot_flags_are_one_line(tiny_llama, capsys, argv, says):
    assert main(["eval", "--model", str(tiny_llama), *argv]) == 2
    assert says in one_line_error(capsys)


def test_eval_tasks_end_to_end(tiny_llama, capsys):
    """The suite, two examples a task, of a model beside itself (evaluated once): accuracies and the table."""
    argv = ["eval", "--model", str(tiny_llama), "--against", str(tiny_llama), "--tasks", "bigbench", "--limit", "2"]
    assert main([*argv, "--json"]) == 0
    (accuracy,) = json.loads(capsys.readouterr().out)["zero_shot"].values()
    assert len(accuracy["tasks"]) == len(SUITE_SHA256)
    assert all(t["examples"] == 2 and 0 <= t["acc"] <= 1 for t in accuracy["tasks"].values())
    assert accuracy["mean_acc"] == pytest.approx(sum(t["acc"] for t in accuracy["tasks"].values()) / 6)


def test_generation_speed_decodes_every_new_token(tiny_llama):
    from dist_prune.pipeline import generation_model

    speed = generation_model(str(tiny_llama), batch_sizes=(1, 3), prompt_tokens=16, new_tokens=8, runs=1)
    assert set(speed["tokens_per_s"]) == {"1", "3"} and min(speed["tokens_per_s"].values()) > 0


def test_prune_eval_tasks_puts_dense_and_pruned_accuracy_in_the_report(tiny_llama, text_file, tmp_path):
    from test_bad_input import prune_args

    from dist_prune.writer import read_manifest

    out = tmp_path / "out"
    argv = prune_args(tiny_llama, out, text_file, "--eval-tasks", "human_organs_senses,emoji_movie", "--eval-limit", "3")
    assert main(argv) == 0
    results = json.loads((out / "prune_report.json").read_text())["zero_shot"]
    assert list(results) == ["dense", "pruned"]
    assert all(set(r["tasks"]) == {"bb_human_organs_senses", "bb_emoji_movie"} for r in results.values())
    markdown = (out / "report.md").read_text()
    assert "## Zero-shot accuracy" in markdown and "![zero-shot accuracy, dense and pruned](report-zero-shot.png)" in markdown
    assert "report-zero-shot.png" in read_manifest(out)["files"]  # the output's own: --overwrite may replace it


def test_prune_with_an_unknown_task_stops_before_any_work(tiny_llama, text_file, tmp_path, capsys):
    from test_bad_input import prune_args

    out = tmp_path / "out"
    assert main(prune_args(tiny_llama, out, text_file, "--eval-tasks", "bigbench,no_such_task")) == 2
    assert "unknown task 'no_such_task'" in one_line_error(capsys)
    assert not out.exists() and list(tmp_path.iterdir()) == []
