"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, and greedy generation speed.

The harness runs through its Python API with the loaded transformers model wrapped as its Hugging Face LM
(`HFLM`), which adds nothing to the model's log-likelihoods (tests/test_zeroshot.py). Tasks are any harness
task whose data the user's machine can reach (their datasets cache), unchanged, or the offline suite: six
BIG-bench multiple-choice tasks shipped in dist_prune/tasks (its README says where they come from and how
they were chosen), turned into harness task configurations here.
"""

import functools
import hashlib
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DistPruneError

SUITE_DIR = Path(__file__).with_name("tasks") / "bigbench"
SUITE = "bigbench"  # `--tasks bigbench`: the whole offline suite
SUITE_PREFIX = "bb_"  # the suite's harness task names: bb_general_knowledge, ...
SUITE_SHA256 = {
    "general_knowledge": "7d8f07136b3539d5555f0452355fed441d94f02edf730745a772f2c612ce3445",
    "emoji_movie": "cbcc9f1ff55bfa88815af3a68ac4db8d13cecb5a22cf70d05054f93facf71f50",
    "movie_recommendation": "94e9b3bafa38735d5d44bdca5449314cd7241b6ed0bbb83d8d061efb573d2b46",
    "similarities_abstraction": "e7cfa6daf208891726b304f5f4490444efbb48e2f8b7efc573842087a9609331",
    "phrase_relatedness": "947515b991dad077867238cee02b1c5ac60a1c5fcc6412c7e999edd5e5e76bd1",
    "human_organs_senses": "99e08ea573eef328f558068c29d3e855df7be40ec34ef527afd6323a719d4378",
}
# BIG-bench's JSON tasks put an input between these unless the task names its own.
INPUT_PREFIX, OUTPUT_PREFIX = "\nQ: ", "\nA: "
METRICS = ("acc", "acc_norm")


def bigbench_documents(task: dict, seed: int = 0) -> list[dict[str, Any]]:
    """A BIG-bench multiple-choice task's examples as harness documents {prompt, choices, label, chance}, in a
    seeded order so that `--limit N` takes a fair sample. Each choice is scored as a continuation of the
    prompt; the prompt ends before the space that the harness puts between prompt and choice."""
    prefix = task.get("task_prefix", "")
    before = task.get("example_input_prefix", INPUT_PREFIX)
    after = task.get("example_output_prefix", OUTPUT_PREFIX)
    documents = []
    for example in task["examples"]:
        choices = list(example["target_scores"])
        scores = [example["target_scores"][c] for c in choices]
        prompt = f"{prefix}{before}{example['input']}{after}".rstrip()
        documents.append(
            {"prompt": prompt, "choices": choices, "label": scores.index(max(scores)), "chance": 1 / len(choices)}
        )
    random.Random(seed).shuffle(documents)
    return documents


def suite_task(name: str) -> dict:
    """One shipped BIG-bench task file, checked against its SHA-256."""
    path = SUITE_DIR / f"{name}.json"
    if not path.is_file():
        raise DistPruneError(f"the offline suite's task file {path} is missing: reinstall dist_prune")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != SUITE_SHA256[name]:
        raise DistPruneError(f"{path} is not the task file dist_prune shipped (SHA-256 differs): reinstall dist_prune")
    return json.loads(data)


def suite_config(name: str, data_file: Path) -> dict:
    """The harness task configuration of one suite task whose documents are in `data_file` (JSON lines)."""
    return {
        "task": SUITE_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
    }


def expand(names: list[str]) -> list[str]:
    """`bigbench` stands for the whole suite; suite tasks are named without their harness prefix."""
    out = []
    for name in filter(None, (n.strip() for n in names)):
        out += list(SUITE_SHA256) if name == SUITE else [name.removeprefix(SUITE_PREFIX)]
    return list(dict.fromkeys(out))


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError as missing:
        raise DistPruneError(
            f"zero-shot accuracy needs EleutherAI's harness ({missing.name} is not installed): "
            "pip install 'dist_prune[zeroshot]' (lm-eval==0.4.13)"
        ) from None
    return lm_eval, HFLM, TaskManager, get_task_dict


@functools.cache
def _task_manager():
    """lm-eval's index of its tasks (it reads some thousand YAML files: once a process)."""
    _, _, TaskManager, _ = _harness()
    return TaskManager()


def check_tasks(names: list[str]):
    """Every name is a suite task or one lm-eval knows (before any work: `prune --eval-tasks` checks it in the
    driver); returns the harness's task manager."""
    manager = _task_manager()
    unknown = [n for n in names if n not in SUITE_SHA256 and n not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown task {unknown[0]!r}: the offline suite has {', '.join(SUITE_SHA256)} (or `{SUITE}` for all "
            "six); any other name must be a task of lm-eval (`lm-eval ls tasks`)"
        )
    return manager


def load_tasks(names: list[str], workdir: Path) -> tuple[dict, dict[str, float]]:
    """The harness's task objects for `names` (suite documents written into `workdir`), and each suite task's
    chance accuracy. One line naming what to do for a task whose data this machine cannot reach."""
    _, _, _, get_task_dict = _harness()
    manager, tasks, chance = check_tasks(names), {}, {}
    for name in names:
        spec = label = name
        if name in SUITE_SHA256:
            documents = bigbench_documents(suite_task(name))
            data_file = workdir / f"{name}.jsonl"
            data_file.write_text("".join(json.dumps(d) + "\n" for d in documents))
            spec, label = suite_config(name, data_file), SUITE_PREFIX + name
            chance[label] = statistics.fmean(d["chance"] for d in documents)
        tasks.update(_loaded(get_task_dict, [spec], manager, label))
    return tasks, chance


def _loaded(get_task_dict, spec: list, manager, label: str) -> dict:
    """The harness reads a task's data when it builds it: a dataset neither cached nor reachable fails here."""
    try:
        return get_task_dict(spec, manager)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as missing:
        raise DistPruneError(
            f"the data of task {label} is not on this machine ({type(missing).__name__}: {str(missing)[:200]}); "
            "it comes from the Hugging Face hub: load it once where the hub is reachable (lm-eval run with "
            "--tasks " + label + ") and copy the datasets cache (~/.cache/huggingface/datasets, or $HF_DATASETS_CACHE) "
            "here, or use the offline suite: --tasks " + SUITE
        ) from None


def zero_shot(model, tokenizer, tasks: dict, chance: dict[str, float], limit: int | None, batch_size: int) -> dict:
    """Accuracy (and length-normalised accuracy where the harness gives it) with standard errors, per task
    and the mean over tasks."""
    lm_eval, HFLM, _, _ = _harness()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), limit=limit, log_samples=False)
    per_task = {}
    for name, values in sorted(out["results"].items()):
        entry = {m: values.get(f"{m},none") for m in METRICS}
        entry.update({f"{m}_stderr": values.get(f"{m}_stderr,none") for m in METRICS})
        entry["examples"] = out["n-samples"][name]["effective"]
        entry["chance"] = chance.get(name)
        per_task[name] = entry
    return {
        "tasks": per_task,
        "mean_acc": statistics.fmean(t["acc"] for t in per_task.values()),
        "limit": limit,
        "seconds": round(time.perf_counter() - start, 1),
        "harness": f"lm-eval {lm_eval.__version__}",
    }


def format_zero_shot(results: dict[str, dict]) -> str:
    """A table of one or more models' results (name -> zero_shot result), side by side; with two or more, the
    later ones' accuracy as a fraction of the first's (the dense model's, by convention)."""
    names = list(results)
    first = results[names[0]]
    header = ["task", "chance"] + [f"{n} acc ± se" for n in names] + [f"{n} / {names[0]}" for n in names[1:]]
    rows = [header, ["---"] * len(header)]
    for task, entry in first["tasks"].items():
        row = [task, "-" if entry["chance"] is None else f"{entry['chance']:.3f}"]
        row += [f"{r['tasks'][task]['acc']:.3f} ± {r['tasks'][task]['acc_stderr']:.3f}" for r in results.values()]
        row += [_ratio(results[n]["tasks"][task]["acc"], entry["acc"]) for n in names[1:]]
        rows.append(row)
    mean = ["mean", ""] + [f"{r['mean_acc']:.3f}" for r in results.values()]
    rows.append(mean + [_ratio(results[n]["mean_acc"], first["mean_acc"]) for n in names[1:]])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference else "-"


@torch.no_grad()
def generation_speed(model, prompts: torch.Tensor, new_tokens: int, batch_sizes: tuple[int, ...], runs: int) -> dict:
    """Greedy decoding speed, tokens per second (new tokens of the whole batch over the wall time): the median of
    `runs` after one warm-up, per batch size; `prompts` (N, T) token ids, the first rows used."""
    speeds = {}
    for batch in batch_sizes:
        ids = prompts[:batch].to(model.device)
        generate = _greedy(model, ids, new_tokens)
        generate()  # warm-up: allocator, thread pool
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            generate()
            if ids.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        speeds[str(batch)] = round(batch * new_tokens / statistics.median(times), 2)
    return {"tokens_per_s": speeds, "prompt_tokens": prompts.shape[1], "new_tokens": new_tokens, "runs": runs}


def _greedy(model, ids: torch.Tensor, new_tokens: int):
    mask = torch.ones_like(ids)
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def generate():  # min_new_tokens: every run decodes exactly `new_tokens`, an end-of-text token or not
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=pad)  # fmt: skip

    return generate
