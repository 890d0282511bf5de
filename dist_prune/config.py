"""The run's configuration: typed dataclasses, loaded from YAML, overridden from the CLI, validated once.

Precedence is CLI > YAML file > defaults. Every leaf field has a unique name so that it maps 1:1 onto a
`--flag` of the same name; unknown keys in a file are an error rather than silently ignored.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .errors import ConfigError, shown
from .registry import METHODS, method
from .structured.allocation import ALLOCATIONS
from .structured.importance import IMPORTANCES

LAUNCHERS = ("local", "ray", "torchrun")
SPARSITY_PROFILES = ("uniform", "owl")
RECONSTRUCT_MODES = ("none", "linear", "block")
RESIDENCIES = ("auto", "resident", "stream")
ACTIVATION_STORAGES = ("auto", "memory", "disk")
GRADIENT_DTYPES = ("fp32", "fp16")
OUT_DTYPES = ("bf16", "fp16", "fp32")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclass(frozen=True)
class MethodConfig:
    method: str = "gblm"
    """Scoring method: magnitude, wanda, sparsegpt or gblm."""
    sparsity: float = 0.5
    """Unstructured fraction of weights removed from every decoder Linear; ignored when `pattern` is set."""
    pattern: str | None = None
    """N:M semi-structured pattern, e.g. "2:4" (keep 2 of every 4 consecutive inputs of each row)."""
    magnitude_scope: str = "matrix"
    """Magnitude comparison group: one threshold per "matrix" (as in the papers) or per "row"."""
    gblm_scale: float = 100.0
    """GBLM: gradients are multiplied by this before squaring (the paper's 100)."""
    gblm_norm: str = "l2"
    """GBLM: "l2" -> sqrt(sum (s g)^2), "l1" -> sum |s g| over calibration sequences."""
    gradients: str | None = None
    """GBLM: a gradients.safetensors from `dist-prune grad` to reuse instead of a new gradient pass."""
    gradient_dtype: str = "fp32"
    """GBLM: dtype of the per-layer gradient sums kept in the scratch directory ("fp32", or "fp16" as the GBLM
    reference stores them: half the scratch disk for very large models)."""
    sparsegpt_damp: float = 0.01
    """SparseGPT: diagonal damping as a fraction of mean(diag(H))."""
    sparsegpt_blocksize: int = 128
    """SparseGPT: columns per lazy-update block."""
    sparsity_profile: str = "uniform"
    """How `sparsity` is spread over the decoder layers: "uniform", or "owl" (outlier-weighted: layers holding
    more activation outliers pruned less, the mean kept; unstructured only)."""
    owl_threshold: float = 5.0
    """OWL: a score counts as an outlier above this many times its layer's mean Wanda score (the paper's M)."""
    owl_lambda: float = 0.08
    """OWL: half the width of the range the layer sparsities span around the target (the paper's lambda)."""
    reconstruct: str = "none"
    """Fit the kept weights after each layer's masks are chosen (masks fixed; reconstruct.py): "none", "linear"
    (each Linear on its own inputs in the dense layer) or "block" (the input groups in order, each on its inputs
    in the layer as fitted so far: the attention's and the MLP's outputs fitted to the dense ones)."""
    reconstruct_damp: float = 0.01
    """Reconstruction: diagonal damping as a fraction of mean(diag(X X^T)), as SparseGPT's."""
    reconstruct_iterations: int = 8
    """Reconstruction: conjugate-gradient iterations of each row's least-squares fit, from the method's weights
    (fewer stop short of the calibration's exact fit: on SmolLM2, Wanda 50%, 8 gave perplexity 28.72 against
    29.23 for 32, in half the time)."""


@dataclass(frozen=True)
class StructuredConfig:
    ratio: float = 0.2
    """SAAP-style structured pruning: target fraction of decoder-layer parameters removed."""
    protect_first: int = 2
    """Number of first decoder layers kept whole."""
    protect_last: int = 1
    """Number of last decoder layers kept whole."""
    importance: str | None = None
    """Group importance: "fused" (SAAP-style), "element" (element-wise Taylor, LLM-Pruner), "vector",
    "activation", or "fluctuation" (FLAP's WIFV); unset: the method's (saap: fused, flap: fluctuation)."""
    allocation: str | None = None
    """Per-module ratios: "global" (FLAP's: one threshold over scores standardised per module), "adaptive"
    (importance stability across calibration batches), or "uniform"; unset: the method's (global for both)."""
    ratio_spread: float | None = None
    """Adaptive allocation: the farthest a module's ratio may move from the uniform ratio, up or down (OWL's
    bound; 1 or more: unbounded, up to one unit left per module); unset: the method's (saap: 0.2, used
    only when its allocation is adaptive)."""
    bias_compensation: bool | None = None
    """Add the removed channels' mean contribution as a bias of o_proj and down_proj (FLAP); unset: the
    method's (on for saap and flap)."""
    stability_batches: int = 4
    """Calibration batches over which importance stability is measured."""
    recover_steps: int = 0
    """Recovery fine-tuning steps with low-rank adapters, merged back into the weights (0: none). Each step
    trains on batch_size fresh windows of seqlen tokens of the calibration split (never the evaluation split)."""
    recover_rank: int = 8
    """Rank of the recovery adapters."""
    recover_lr: float = 2e-4
    """Learning rate of the recovery adapters (AdamW, constant)."""
    recover_eval_every: int = 0
    """Recovery steps between perplexity measurements (the recovery curve in the report; 0: before and after
    only)."""


@dataclass(frozen=True)
class CalibrationConfig:
    calib_source: str = "wikipedia"
    """"wikipedia" (bundled calibration split), a .txt/.jsonl path, or "hf:NAME[:CONFIG]" for a dataset."""
    calib_tokens: str | None = None
    """A safetensors file holding an integer tensor [N, T] of token windows; overrides calib_source."""
    nsamples: int = 128
    """Number of calibration sequences."""
    seqlen: int = 2048
    """Tokens per calibration sequence."""
    seed: int = 0
    """Seed for choosing the calibration windows."""
    batch_size: int = 8
    """Sequences per forward call in the layer loop (speed only: statistics are exact sums)."""


EVAL_BATCH = 2  # evaluation windows per forward (speed and memory only; the memory plan counts it)


@dataclass(frozen=True)
class EvalConfig:
    eval_after: bool = True
    """Measure dense and pruned perplexity on the evaluation split after pruning."""
    eval_text: str = "wikipedia"
    """"wikipedia" (bundled evaluation split) or a path to a text file."""
    eval_seqlen: int = 512
    """Window length for perplexity (non-overlapping windows)."""
    eval_windows: int | None = None
    """Cap on the number of evaluation windows (None: all of them)."""
    eval_tasks: str | None = None
    """Zero-shot tasks (as `eval --tasks`: "bigbench" or lm-eval task names, comma-separated) run through the
    harness on the dense and the pruned model after the run; accuracies go into prune_report.json and report.md."""
    eval_limit: int | None = None
    """With eval_tasks: at most this many examples per task."""
    plots: bool = True
    """Draw report.md's figures (PNG files beside it). --no-plots: report.md keeps its tables and
    prune_report.json everything, without the second or so matplotlib takes per run."""


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    workers: int = 1
    """Number of workers, each holding a row shard of every weight."""
    launcher: str = "local"
    """"local" (in-process, one worker), "ray" (Ray actors) or "torchrun" (this process is one rank)."""
    residency: str = "auto"
    """Where weights live: "stream" (a worker holds one decoder layer at a time, read from the checkpoint when
    its turn comes), "resident" (each worker keeps its row block of every layer, in the checkpoint's dtype),
    or "auto" (resident when the memory plan says it fits, else stream)."""
    overlap: bool | None = None
    """Read the next layer and write the finished one in threads while the current one computes. Unset: on for
    CUDA, off on a CPU (there reading and writing are about 1% of a layer's compute, and the two more layers
    held would cost more memory than the overlap saves time: 1.2 GiB at 13B)."""
    scratch: str | None = None
    """Directory for scratch files (per-layer gradient sums, stored layer inputs); None: beside the output."""
    activation_storage: str = "auto"
    """Gradient pass: keep each layer's inputs in host "memory" or on "disk" in the scratch directory;
    "auto" picks disk when the memory plan says host memory is short."""
    device_memory: str | None = None
    """Memory one worker may use, e.g. "80GiB" (None: the device's total, or the host's available RAM)."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""
    overwrite: bool = False
    """Replace an existing output directory (only a previous dist_prune output, and only once the new one is
    complete)."""
    max_restarts: int = 0
    """Ray: restart the workers this many times when one dies, resuming from the last verified layer."""
    heartbeat_timeout: float = 60.0
    """Seconds a worker may be silent (dead, hung, stopped) before the others end the job, naming it."""
    resume: bool = False
    """Continue the interrupted run whose partial output (`.NAME.partial` beside --out) is there: every finished
    layer that still verifies is reused; the settings must be the interrupted run's. With nothing to resume, a
    new run starts, so the same command can be repeated (torchrun --max-restarts)."""


@dataclass(frozen=True)
class SourceConfig:
    out_dtype: str | None = None
    """dtype of the written weights: "bf16", "fp16" or "fp32" (None: the checkpoint's own dtype; bf16 for a
    DeepSpeed checkpoint, whose fp32 master weights are read). Weights are rounded to it as they are read, so
    pruning decides on exactly the weights that are written."""
    trust_pickle: bool = False
    """Read a DeepSpeed ZeRO checkpoint, whose *_states.pt files are Python pickles: loading one runs whatever
    code its writer put in it. Only for checkpoints you trust."""
    ds_tag: str | None = None
    """DeepSpeed checkpoint: the tag folder to read (e.g. global_step1000) instead of the one `latest` names."""
    ds_config_dir: str | None = None
    """DeepSpeed checkpoint: a folder with the model's config.json and tokenizer (default: beside the
    checkpoint: the folder holding `latest`, or the one above the tag folder)."""


@dataclass(frozen=True)
class PruneConfig:
    model: str = "smollm2-135m"
    """"smollm2-135m" or "gemma3-270m" (the cached assets), a Hugging Face checkpoint folder of a family
    dist_prune reads (llama, mistral, qwen2, qwen3, gemma3_text), or a DeepSpeed ZeRO checkpoint
    folder (the one holding `latest`, or a `global_stepN` tag folder; needs --trust-pickle)."""
    source: SourceConfig = field(default_factory=SourceConfig)
    out: str = "out/pruned"
    """Output directory; it appears only when complete."""
    prune: MethodConfig = field(default_factory=MethodConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.prune.pattern)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_bytes(text: str) -> int:
    """ "80GiB", "512 MB", "1e9" -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"memory size must look like 80GiB or 512MB, got {shown(text)}")
    try:
        size = float(match.group(1)) * _UNITS[unit]
    except ValueError:
        raise ConfigError(f"memory size must look like 80GiB or 512MB, got {shown(text)}") from None
    if not size < LARGEST_INT:  # 1e400 reads as infinity
        raise ConfigError(f"memory size {shown(text)} is beyond any machine's")
    return int(size)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """ "2:4" -> (2, 4): keep N of every M consecutive inputs."""
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise ConfigError(f"pattern must look like N:M (e.g. 2:4), got {shown(pattern)}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"impossible N:M pattern {pattern!r}: need 0 < N < M")
    return n, m


def _hint(cls: type, name: str) -> Any:
    return get_type_hints(cls)[name]


def leaf_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every leaf field by its (unique) name -> (section or None, field)."""
    leaves: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in fields(PruneConfig):
        hint = _hint(PruneConfig, f.name)
        if dataclasses.is_dataclass(hint):
            leaves.update({sub.name: (f.name, sub) for sub in fields(hint)})
        else:
            leaves[f.name] = (None, f)
    return leaves


def leaf_type(section: str | None, name: str) -> Any:
    owner = _hint(PruneConfig, section) if section else PruneConfig
    return _hint(owner, name)


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> PruneConfig:
    """Merge a YAML mapping (nested by section, or flat leaf names) with CLI overrides, then validate."""
    leaves = leaf_fields()
    flat: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        if isinstance(value, dict) and key in {s for s, _ in leaves.values() if s}:
            for sub_key, sub_value in value.items():
                if sub_key not in leaves or leaves[sub_key][0] != key:
                    raise ConfigError(f"unknown config key {key}.{shown(sub_key)}")
                flat[sub_key] = sub_value
        elif key in leaves:
            flat[key] = value
        else:
            raise ConfigError(f"unknown config key {shown(key)}")
    flat.update({k: v for k, v in (overrides or {}).items() if v is not None})
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        section, _ = leaves[key]
        (sections.setdefault(section, {}) if section else top)[key] = value
    built = {name: _hint(PruneConfig, name)(**values) for name, values in sections.items()}
    config = _with_method_defaults(PruneConfig(**top, **built))
    validate(config)
    return config


def _with_method_defaults(config: PruneConfig) -> PruneConfig:
    """A structured method's choices fill the `structured` fields the user left unset, once, here."""
    m = METHODS.get(config.prune.method)
    if m is None or m.structured_defaults is None:
        return config
    s, defaults = config.structured, m.structured_defaults
    unset = {f.name: getattr(defaults, f.name) for f in fields(defaults) if getattr(s, f.name) is None}
    if unset.get("allocation", s.allocation) != "adaptive":
        unset.pop("ratio_spread", None)  # it bounds the adaptive allocation only
    return dataclasses.replace(config, structured=dataclasses.replace(s, **unset))


class _Yaml12IntLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 integers, under which an unquoted `pattern: 2:4` reads as 124."""


_Yaml12IntLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:int" or ":" not in regex.pattern]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12IntLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


# A run's YAML file is a page of settings; a megabyte is far beyond any (and bounds what a parse can cost).
CONFIG_LIMIT = 2**20


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PruneConfig:
    values: dict[str, Any] = {}
    if path is not None:
        from .safe_io import read_bounded

        data = read_bounded(Path(path), CONFIG_LIMIT, "config file", ConfigError)
        try:
            values = yaml.load(data.decode("utf-8"), Loader=_Yaml12IntLoader) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} cannot be read as text: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {shown(str(err))}") from None
        except RecursionError:
            raise ConfigError(f"config file {path} is nested too deeply to be read") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
    return build_config(values, overrides)


def validate(config: PruneConfig) -> None:
    p, c, e = config.prune, config.calibration, config.evaluation
    _check_types(config)
    if Path(config.out).name in ("", ".", ".."):
        raise ConfigError(f"out {shown(config.out)} names no folder or file of its own: give the output's name")
    if p.method not in METHODS:
        raise ConfigError(f"unknown method {shown(p.method)}; choose one of {', '.join(METHODS)}")
    if method(p.method).structured:
        _validate_structured(p.method, config.structured, p.pattern)
        if config.runtime.resume:
            raise ConfigError("--resume is not available for structured pruning: it writes every layer at the end")
    elif p.pattern is None and not 0.0 < p.sparsity < 1.0:
        raise ConfigError(f"sparsity must be strictly between 0 and 1, got {p.sparsity}")
    parse_pattern(p.pattern)
    _method_check(config)
    if p.magnitude_scope not in ("matrix", "row"):
        raise ConfigError(f"magnitude_scope must be 'matrix' or 'row', got {shown(p.magnitude_scope)}")
    if p.gblm_norm not in ("l1", "l2"):
        raise ConfigError(f"gblm_norm must be 'l1' or 'l2', got {shown(p.gblm_norm)}")
    _one_of("gradient_dtype", p.gradient_dtype, GRADIENT_DTYPES)
    if config.source.out_dtype is not None:
        _one_of("out_dtype", config.source.out_dtype, OUT_DTYPES)
    _positive("gblm_scale", p.gblm_scale)
    _positive("sparsegpt_damp", p.sparsegpt_damp)
    _validate_reconstruction(p)
    _validate_profile(p)
    for name in ("sparsegpt_blocksize",):
        _positive(name, getattr(p, name))
    for name in ("nsamples", "seqlen", "batch_size"):
        _positive(name, getattr(c, name))
    if c.seqlen < 2:
        raise ConfigError("seqlen must be at least 2 tokens")
    _positive("eval_seqlen", e.eval_seqlen)
    if e.eval_limit is not None:
        _positive("eval_limit", e.eval_limit)
    if e.eval_windows is not None:
        _positive("eval_windows", e.eval_windows)
    r = config.runtime
    if r.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {shown(r.device)}")
    _positive("workers", r.workers, MAX_WORKERS)
    if r.threads is not None:
        _positive("threads", r.threads, MAX_THREADS)
    _positive("heartbeat_timeout", r.heartbeat_timeout, MAX_HEARTBEAT_S)
    if r.max_restarts < 0:
        raise ConfigError(f"max_restarts must not be negative, got {r.max_restarts}")
    if r.launcher not in LAUNCHERS:
        raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {shown(r.launcher)}")
    _one_of("residency", r.residency, RESIDENCIES)
    _one_of("activation_storage", r.activation_storage, ACTIVATION_STORAGES)
    if r.device_memory is not None:
        parse_bytes(r.device_memory)


def _validate_profile(p: MethodConfig) -> None:
    _one_of("sparsity_profile", p.sparsity_profile, SPARSITY_PROFILES)
    if p.sparsity_profile == "uniform":
        return
    if method(p.method).structured:
        raise ConfigError(f"--sparsity-profile owl spreads an unstructured sparsity; {p.method} allocates its own "
                          "ratios (--allocation)")  # fmt: skip
    if p.pattern is not None:
        raise ConfigError(f"--sparsity-profile owl gives each layer its own unstructured sparsity; the pattern "
                          f"{shown(p.pattern)} prunes the same share of every layer: drop one of them")  # fmt: skip
    _positive("owl_threshold", p.owl_threshold)
    _positive("owl_lambda", p.owl_lambda)
    room = min(p.sparsity, 1 - p.sparsity) / 2  # a layer may sit 2 * lambda from the target (methods/owl.py)
    if p.owl_lambda > room:
        raise ConfigError(f"owl_lambda {p.owl_lambda:g} could take a layer's sparsity out of (0, 1) around "
                          f"{p.sparsity:g}: at most {room:g}")  # fmt: skip


def _validate_reconstruction(p: MethodConfig) -> None:
    _one_of("reconstruct", p.reconstruct, RECONSTRUCT_MODES)
    if p.reconstruct == "none":
        return
    if method(p.method).structured:
        raise ConfigError(f"--reconstruct fits the kept weights of masked Linears; {p.method} removes whole heads "
                          "and channels and recovers with --recover-steps")  # fmt: skip
    _positive("reconstruct_damp", p.reconstruct_damp)
    _positive("reconstruct_iterations", p.reconstruct_iterations)


def _method_check(config: PruneConfig) -> None:
    """The method's own settings (a `Method.check`: SparseGPT's blocks hold whole N:M groups)."""
    check = method(config.prune.method).check
    if check is not None:
        try:
            check(config)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _validate_structured(name: str, s: StructuredConfig, pattern: str | None) -> None:
    if pattern is not None:
        raise ConfigError(f"{name} removes whole heads and channels; it takes --ratio, not --pattern")
    if not 0.0 < s.ratio < 1.0:
        raise ConfigError(f"ratio must be strictly between 0 and 1, got {s.ratio}")
    _one_of("importance", s.importance, tuple(IMPORTANCES))
    _one_of("allocation", s.allocation, tuple(ALLOCATIONS))
    if ALLOCATIONS[s.allocation].needs_stability and IMPORTANCES[s.importance].forward_only:
        raise ConfigError(
            f"allocation {s.allocation!r} does not go with importance {s.importance!r}: it needs the stability of a "
            "gradient measure across calibration batches ('global' and 'uniform' go with every importance)"
        )
    if s.ratio_spread is not None:
        _positive("ratio_spread", s.ratio_spread)
        if s.allocation != "adaptive":
            raise ConfigError(f"ratio_spread bounds the adaptive allocation; allocation {s.allocation!r} has none")
    if min(s.protect_first, s.protect_last, s.recover_steps, s.recover_eval_every) < 0:
        raise ConfigError("protect_first, protect_last, recover_steps and recover_eval_every must not be negative")
    _positive("stability_batches", s.stability_batches)
    _positive("recover_rank", s.recover_rank)
    _positive("recover_lr", s.recover_lr)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {shown(value)}")


# Bounds where a value would reach a C integer, a loop or a timer before any plan could refuse it.
LARGEST_INT = 2**63  # every integer setting fits a C int64
MAX_THREADS = 4096
MAX_WORKERS = 65536
MAX_HEARTBEAT_S = 86400.0


def _positive(name: str, value: float, most: float | None = None) -> None:
    if not math.isfinite(value) or value <= 0:  # NaN compares False with everything: test it by name
        raise ConfigError(f"{name} must be a positive number, got {value}")
    if most is not None and value > most:
        raise ConfigError(f"{name} must be at most {most:g}, got {shown(value)}")


def _check_types(config: PruneConfig) -> None:
    """YAML and the CLI both deliver loosely typed values: check each leaf against its annotation."""
    for name, (section, _) in leaf_fields().items():
        owner = getattr(config, section) if section else config
        value = getattr(owner, name)
        hint = leaf_type(section, name)
        allowed = getattr(hint, "__args__", (hint,))
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool) and bool not in allowed:
            raise ConfigError(f"{name} must be {_type_name(hint)}, got {shown(value)}")
        if isinstance(value, int) and not -LARGEST_INT <= value < LARGEST_INT:
            raise ConfigError(f"{name} {shown(value)} is too large: integer settings fit in 64 bits")
        if float in allowed and isinstance(value, int):
            continue
        if not isinstance(value, tuple(t for t in allowed if isinstance(t, type))):
            raise ConfigError(f"{name} must be {_type_name(hint)}, got {shown(value)}")


def _type_name(hint: Any) -> str:
    return " or ".join(getattr(t, "__name__", str(t)) for t in getattr(hint, "__args__", (hint,)))


def field_doc(section: str | None, name: str) -> str:
    """The docstring written under a field, for --help."""
    owner = _hint(PruneConfig, section) if section else PruneConfig
    return _field_docs(owner).get(name, "")


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    return {
        node.target.id: following.value.value
        for node, following in zip(body, body[1:], strict=False)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant)
    }
