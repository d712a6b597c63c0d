"""`gradproj plan`: what a study will cost, before it spends GPU time.

Conventions (docs/plan.md):
- FLOPs of one example's embedding gradient with T tokens: 4 P T + 8 L h T^2, a forward pass
  (2 P T for the weights, 4 L h T^2 for the attention products Q K^T and A V) and a backward pass
  of the same cost (activation gradients only: the weights are frozen).
- GPU rate: calibrated on the original study's reported 53 h for the full gradients of 381,000
  examples, each padded to 4,096 tokens, of OLMo-2-7B on one H100, with the same convention;
  other GPUs scale by their dense bf16 peak. Not measured with gradproj on a GPU.
- Projection rates: bench/RESULTS.md (CPU: this repository's 2-core machine; GPU: H200, with the
  earlier, unfused sign kernel, at batch 128).
- Measured rates replace these estimates where a results table of bench/gpu_all.sh is given
  (--calibration) or recorded in the package (gradproj/gpu_results.md, once one exists); every
  rate printed says whether it was measured or estimated, and where it came from.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gradproj.errors import UserError
from gradproj.options import option

# --- The original study (/work/shared/DESIGN.md): its setting and reported costs on one H100 ---
ORIGINAL_EXAMPLES = 381_000
ORIGINAL_MODEL = {"hidden_size": 4096, "layers": 32, "params": 7.3e9}  # OLMo-2-7B
ORIGINAL_SEQ = 4096
ORIGINAL_HOURS = {"full": 53.0, 16384: 83.0, 2_048_000: 212 * 24.0}


def gradient_flops(params: float, layers: int, hidden_size: int, tokens: float) -> float:
    """FLOPs of one example's embedding gradient (module docstring)."""
    return 4 * params * tokens + 8 * layers * hidden_size * tokens**2


# The H100 rate that reproduces the original's 53 h under the same FLOP convention.
H100_FLOPS = (
    ORIGINAL_EXAMPLES
    * gradient_flops(**ORIGINAL_MODEL, tokens=ORIGINAL_SEQ)
    / (ORIGINAL_HOURS["full"] * 3600)
)
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}
GPU_MEMORY_GIB = {"h100": 80.0, "h200": 141.0, "a100": 80.0}
# bench/RESULTS.md, "Embedding-gradient extraction": 61% of 205.6 GFLOP/s at max_seq_length 4096.
CPU_GRADIENT_FLOPS = 0.61 * 205.6e9

# Projection: dense kinds in FLOP/s of the product 2 D k; sparse kinds in seconds per gradient
# coordinate (nearly independent of k). bench/RESULTS.md: CPU, D = 2^24, k = 8192, full-length
# rows; H200 at D = 2,048,000, k = 8192, batch 128, earlier unfused kernels.
PROJECTION_RATES = {
    "cpu": {
        "rademacher": 2 * 2**24 * 8192 / 1.81765,
        "normal": 2 * 2**24 * 8192 / 2.80024,
        "sjlt": 0.02461 / 2**24,
        "kronecker": 0.02165 / 2**24,
    },
    "h200": {
        "rademacher": 2 * 2_048_000 * 8192 / 0.0031,
        "normal": 2 * 2_048_000 * 8192 / 0.0078,
        "sjlt": 0.00024 / 2_048_000,
        "kronecker": 0.00011 / 2_048_000,
    },
}
DENSE = ("rademacher", "normal")
DEVICES = ("h100", "h200", "a100", "cpu")
# The rates a calibration table gives, in the units above: FLOP/s, or seconds per coordinate.
RATE_UNITS = {"gradient": "FLOP/s", "rademacher": "FLOP/s", "normal": "FLOP/s",
              "sjlt": "s/coordinate", "kronecker": "s/coordinate"}  # fmt: skip
# The columns of bench/gpu_all.sh's results table (gpu_results.md): calibration rows are
# step "calibration", quantity a RATE_UNITS key, status "ok"; the row step "environment",
# quantity "device kind" names the DEVICES entry it was measured on.
RESULTS_COLUMNS = ("step", "quantity", "value", "unit", "status", "seconds", "note")
# Figures measured by bench/gpu_all.sh and shipped with the package; used without --calibration.
RECORDED_CALIBRATION = Path(__file__).with_name("gpu_results.md")

# Shapes from the models' public config.json (hidden_size, num_hidden_layers) and their
# parameter counts, so that the planner needs no network for them. Keys are lower case.
KNOWN_SHAPES = {
    **dict.fromkeys(
        ["allenai/olmo-2-1124-7b", "allenai/olmo-2-1124-7b-sft", "allenai/olmo-2-1124-7b-dpo",
         "allenai/olmo-2-1124-7b-instruct"],
        (4096, 32, 7.30e9),
    ),
    **dict.fromkeys(
        ["meta-llama/llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct",
         "meta-llama/meta-llama-3.1-8b", "meta-llama/meta-llama-3.1-8b-instruct"],
        (4096, 32, 8.03e9),
    ),
    **dict.fromkeys(["meta-llama/llama-2-7b-hf", "meta-llama/llama-2-7b-chat-hf"],
                    (4096, 32, 6.74e9)),
    **dict.fromkeys(
        ["mistralai/mistral-7b-v0.1", "mistralai/mistral-7b-instruct-v0.1",
         "mistralai/mistral-7b-instruct-v0.2", "mistralai/mistral-7b-v0.3",
         "mistralai/mistral-7b-instruct-v0.3"],
        (4096, 32, 7.24e9),
    ),
    **dict.fromkeys(
        ["huggingfacetb/smollm2-135m", "huggingfacetb/smollm2-135m-instruct",
         "bundled:smollm2-135m-instruct"],
        (576, 30, 134_515_008),
    ),
}  # fmt: skip


@dataclass
class PlanConfig:
    """Options of `gradproj plan`, checked on construction."""

    model: str | None = option(
        None,
        "hub id, local directory or bundled:<name> (its config is read)",
    )
    hidden_size: int | None = option(None, "hidden size (instead of, or over, --model)")
    layers: int | None = option(None, "transformer layers (instead of, or over, --model)")
    params: float | None = option(None, "parameters, e.g. 7.3e9 (instead of, or over, --model)")
    n_examples: int | None = option(None, "examples in the split")
    mean_tokens: float | None = option(
        None,
        "tokens per example, before truncation (all assumed equal)",
    )
    lengths: Path | None = option(
        None,
        "a run directory, its manifest.json, or a file of token counts",
    )
    dataset: str | None = option(
        None,
        "a dataset to tokenize with --model's tokenizer (as gradproj extract)",
    )
    dataset_split: str = option("train", "split or slice of --dataset")
    paradigm: str = option("sft", "sft, pre or mlm, for --dataset")
    max_seq_length: int = option(4096, "truncation length")
    proj_dim: str = option(
        "8192,16384,204800,2048000",
        "dims, comma-separated; 'full' adds the full gradient",
    )
    proj_type: str = option("rademacher", "rademacher, normal, sjlt, kronecker, comma-separated")
    gpu: Literal[DEVICES] = option("h100", "device kind")
    gpus: int = option(1, "devices sharing the split (a SLURM job array)")
    proj_memory_gb: float | None = option(
        None,
        "projection memory budget (default: as gradproj extract)",
    )
    original: bool = option(
        False,
        "also print what the original pipeline would take for the same work",
    )
    calibration: Path | None = option(
        None,
        "a gpu_results.md of bench/gpu_all.sh: its measured rates replace the estimates",
    )

    def __post_init__(self):
        from gradproj.data import PARADIGMS
        from gradproj.projection import PROJ_TYPES, parse_dims

        self.dims = parse_dims(self.proj_dim)
        if any(isinstance(d, str) and d != "full" for d in self.dims):
            raise UserError("--proj_dim: plan takes plain dims (and 'full'), not kronecker AxB")
        self.types = [t.strip() for t in self.proj_type.split(",") if t.strip()]
        checks = [
            (set(self.types) <= set(PROJ_TYPES), f"--proj_type: use {', '.join(PROJ_TYPES)}"),
            (self.gpu in DEVICES, f"--gpu {self.gpu!r}: use {', '.join(DEVICES)}"),
            (self.paradigm in PARADIGMS, f"--paradigm {self.paradigm!r}: use sft, pre or mlm"),
            (self.gpus >= 1, "--gpus must be at least 1"),
            (self.max_seq_length >= 1, "--max_seq_length must be at least 1"),
            (
                self.model is not None or None not in (self.hidden_size, self.layers, self.params),
                "give --model, or --hidden_size, --layers and --params",
            ),
            (
                self.dataset is None or self.model is not None,
                "--dataset needs --model (its tokenizer)",
            ),
            (
                sum(x is not None for x in (self.dataset, self.lengths, self.n_examples)) == 1,
                "give the data as one of --dataset, --lengths, or --n_examples with --mean_tokens",
            ),
            (
                (self.n_examples is None) == (self.mean_tokens is None),
                "give --n_examples and --mean_tokens together",
            ),
            (self.n_examples is None or self.n_examples >= 1, "--n_examples must be at least 1"),
            (
                self.mean_tokens is None or self.mean_tokens > 0,
                "--mean_tokens must be above 0 (tokens per example)",
            ),
            (
                all(x is None or x > 0 for x in (self.hidden_size, self.layers, self.params)),
                "--hidden_size, --layers and --params must be above 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.rates = device_rates(self)  # reads --calibration: refused before any work


@dataclass
class Shape:
    hidden_size: int
    layers: int
    params: float


def model_shape(cfg: PlanConfig) -> Shape:
    """Hidden size, layers and parameters: given, known (KNOWN_SHAPES), or read from the
    model's config (parameters counted on the meta device, so nothing is downloaded or
    allocated beyond the config); each given one overrides the model's."""
    given = (cfg.hidden_size, cfg.layers, cfg.params)
    if None not in given:
        return Shape(*given)
    known = KNOWN_SHAPES.get(cfg.model.lower())
    if known is not None:
        return Shape(*(g or k for g, k in zip(given, known, strict=True)))
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return Shape(
        cfg.hidden_size or config.hidden_size,
        cfg.layers or config.num_hidden_layers,
        cfg.params or sum(p.numel() for p in model.parameters()),
    )


def model_config(model: str):
    """The model's config from a local folder or the hub cache; the hub only when it answers
    at once (its client retries for half a minute when offline)."""
    from transformers import AutoConfig

    from gradproj import models

    if model.startswith(models.BUNDLED_PREFIX):  # an unknown name is refused, naming the known
        model = str(models.bundled_model_dir(model))
    local = Path(model).is_dir()
    hint = (
        f"--model {model}: {{}}; give the shape instead: --hidden_size H --layers L --params P "
        "(e.g. 4096 32 7.3e9 for OLMo-2-7B; docs/plan.md)"
    )
    try:
        return AutoConfig.from_pretrained(model, token=models.hf_token(), local_files_only=True)
    except (OSError, ValueError) as err:
        if local:
            raise UserError(hint.format(f"no config ({str(err).splitlines()[0][:120]})")) from None
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise UserError(hint.format("not a local folder or cached, and HF_HUB_OFFLINE=1"))
    if not hub_reachable():
        raise UserError(hint.format("not a local folder or cached, and the hub is unreachable"))
    try:
        return AutoConfig.from_pretrained(model, token=models.hf_token())
    except (OSError, ValueError) as err:
        reason = f"no config found ({str(err).splitlines()[0][:120]})"
        raise UserError(hint.format(reason)) from None


def hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def token_lengths(cfg: PlanConfig) -> list[float]:
    """Each example's token count: from --dataset (tokenized as the extraction does; examples
    it would skip left out), --lengths (a run directory, its manifest.json, or a text file with
    one count per line), or n_examples x mean_tokens."""
    if cfg.dataset is not None:
        lengths, source = dataset_lengths(cfg), f"--dataset {cfg.dataset} ({cfg.dataset_split})"
    elif cfg.lengths is None:
        return [cfg.mean_tokens] * cfg.n_examples
    else:
        lengths, source = file_lengths(Path(cfg.lengths)), f"--lengths {cfg.lengths}"
    if not lengths:
        raise UserError(f"{source}: no examples to plan for; give a split with examples")
    if min(lengths) <= 0:
        raise UserError(f"{source}: token counts must be above 0, found {min(lengths):g}")
    return lengths


def file_lengths(path: Path) -> list[float]:
    manifest = path / "manifest.json" if path.is_dir() else path
    try:
        text = manifest.read_text()
        if manifest.suffix == ".json":
            return [e["tokens"] for e in json.loads(text)["examples"]]
        return [float(line) for line in text.split()]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--lengths {path}: not a run or a list of token counts ({err})") from None


def dataset_lengths(cfg: PlanConfig) -> list[int]:
    from gradproj import data, models

    rows = data.load_split(cfg.dataset, cfg.dataset_split)
    data.check_columns(rows, cfg.paradigm)
    tokenizer = models.load_tokenizer(models.resolve_checkpoint(cfg.model, 0))
    examples = (
        data.tokenize(tokenizer, row, i, cfg.paradigm, cfg.max_seq_length)
        for i, row in enumerate(rows)
    )
    return [ex.length for ex in examples if data.label_positions(ex, cfg.paradigm)]


@dataclass
class Rate:
    """One rate the plan uses: FLOP/s, or seconds per gradient coordinate (RATE_UNITS), and
    where it came from."""

    value: float
    origin: str


def estimated_rates(gpu: str) -> dict[str, Rate]:
    """The rates without a calibration table: the module docstring's sources."""
    if gpu == "cpu":
        origin = "measured: bench/RESULTS.md, this repository's 2-core CPU"
        return {
            "gradient": Rate(CPU_GRADIENT_FLOPS, f"{origin} (61% of its fp32 matmul rate)"),
            **{t: Rate(v, origin) for t, v in PROJECTION_RATES["cpu"].items()},
        }
    scale = PEAK_BF16_TFLOPS[gpu] / PEAK_BF16_TFLOPS["h100"]
    scaled = "" if scale == 1 else f", scaled by bf16 peak to {gpu}"
    gradient = (
        "estimated: calibrated on the original study's reported 53 h (OLMo-2-7B, one H100)"
        f"{scaled}; gradproj not yet timed on a GPU"
    )
    projection = f"estimated: an H200 with an earlier, unfused kernel (bench/RESULTS.md){scaled}"
    return {
        "gradient": Rate(H100_FLOPS * scale, gradient),
        **{
            t: Rate(v * scale if RATE_UNITS[t] == "FLOP/s" else v / scale, projection)
            for t, v in PROJECTION_RATES["h200"].items()
        },
    }


def read_results_table(path: Path) -> list[dict]:
    """The rows of a bench/gpu_all.sh results table (RESULTS_COLUMNS), any other lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"--calibration {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise UserError(
            f"--calibration {path}: not UTF-8 text (byte offset {err.start}); give the "
            "gpu_results.md that bench/gpu_all.sh wrote"
        ) from None
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        header = tuple(cells) == RESULTS_COLUMNS or all(set(c) <= set("-:") for c in cells)
        if line.lstrip().startswith("|") and len(cells) == len(RESULTS_COLUMNS) and not header:
            rows.append(dict(zip(RESULTS_COLUMNS, cells, strict=True)))
    return rows


def calibration_rates(path: Path, gpu: str) -> dict[str, Rate]:
    """The measured rates of a results table, for `gpu`: as measured on the same kind, scaled
    by bf16 peak from another GPU kind; a CPU table plans only the CPU, and the reverse."""
    rows = read_results_table(path)
    kind = next(
        (r["value"] for r in rows if (r["step"], r["quantity"]) == ("environment", "device kind")),
        None,
    )
    if kind not in DEVICES:
        raise UserError(
            f"--calibration {path}: no 'device kind' row naming one of {', '.join(DEVICES)}; "
            "give the gpu_results.md that bench/gpu_all.sh wrote"
        )
    if (kind == "cpu") != (gpu == "cpu"):
        raise UserError(
            f"--calibration {path} was measured on {kind}: plan with --gpu {kind}"
            + ("" if kind == "cpu" else " (or another GPU kind)")
        )
    scale = 1.0 if kind == gpu else PEAK_BF16_TFLOPS[gpu] / PEAK_BF16_TFLOPS[kind]
    rates = {}
    for r in rows:
        if r["step"] != "calibration" or r["status"] != "ok" or r["quantity"] not in RATE_UNITS:
            continue
        try:
            value = float(r["value"])
        except ValueError:
            continue
        name = r["quantity"]
        value = value * scale if RATE_UNITS[name] == "FLOP/s" else value / scale
        how = "measured" if scale == 1 else f"scaled by bf16 peak from {kind}, measured"
        rates[name] = Rate(value, f"{how}: {path} ({r['note']})")
    return rates


def device_rates(cfg: PlanConfig) -> dict[str, Rate]:
    """Estimated rates, replaced by the measured ones of --calibration or of the package's
    recorded table (if any and if for a comparable device)."""
    rates = estimated_rates(cfg.gpu)
    if cfg.calibration is not None:
        rates.update(calibration_rates(cfg.calibration, cfg.gpu))
    elif RECORDED_CALIBRATION.is_file():
        try:
            rates.update(calibration_rates(RECORDED_CALIBRATION, cfg.gpu))
        except UserError:  # measured on another kind of device: the estimates stand
            pass
    return rates


def projection_seconds(rates: dict[str, Rate], proj_type: str, coordinates: float, k: int):
    """Seconds to project gradients with this many coordinates in all to k dims."""
    rate = rates[proj_type].value
    if proj_type in DENSE:
        return 2 * coordinates * k / rate
    return coordinates * rate


def block_gib(cfg: PlanConfig, proj_type: str, hidden: int) -> float:
    """Memory of one block of the random matrix: the block the projector itself would choose
    (constructing a projection allocates nothing)."""
    from gradproj.projection import make_projection

    budget = cfg.proj_memory_gb or (1.0 if cfg.gpu == "cpu" else GPU_MEMORY_GIB[cfg.gpu] / 4)
    dims = [d for d in cfg.dims if d != "full"] or [1]
    device = "cpu" if cfg.gpu == "cpu" else "cuda"
    shape = (cfg.max_seq_length, hidden)
    projection = make_projection(proj_type, dims, 0, shape, device=device, memory_gb=budget)
    return projection.block_bytes() / 2**30


def original_hours(cfg: PlanConfig, shape: Shape, n: int, output) -> float:
    """Hours the original pipeline takes for one output, one job per dim: every example padded
    to max_seq_length, gradients recomputed per dim, TRAK's projection linear in k. Fit to its
    reported 53 h (full), 83 h (16,384) and 212 days (2,048,000) for the original setting, and
    scaled by padded FLOPs, D = max_seq_length x hidden and the GPU's peak for others."""
    per_full = ORIGINAL_HOURS["full"] * 3600 / ORIGINAL_EXAMPLES
    low, high = (ORIGINAL_HOURS[k] * 3600 / ORIGINAL_EXAMPLES for k in (16384, 2_048_000))
    slope = (high - low) / (2_048_000 - 16384)  # seconds per example per projected dim
    intercept = low - slope * 16384
    original_flops = gradient_flops(**ORIGINAL_MODEL, tokens=ORIGINAL_SEQ)
    flops = gradient_flops(shape.params, shape.layers, shape.hidden_size, cfg.max_seq_length)
    device = estimated_rates(cfg.gpu)["gradient"].value / H100_FLOPS
    work = flops / original_flops / device
    coordinates = (
        cfg.max_seq_length
        * shape.hidden_size
        / (ORIGINAL_SEQ * ORIGINAL_MODEL["hidden_size"])
        / device
    )
    k = output if output == "full" else output[1]
    seconds = per_full * work if k == "full" else intercept * work + slope * k * coordinates
    return n * seconds / 3600 / cfg.gpus


def plan(cfg: PlanConfig) -> dict:
    """Every figure `gradproj plan` prints, as numbers (seconds, bytes, FLOPs)."""
    shape = model_shape(cfg)
    tokens = [min(t, cfg.max_seq_length) for t in token_lengths(cfg)]
    n, total = len(tokens), sum(tokens)
    coordinates = total * shape.hidden_size
    flops = sum(gradient_flops(shape.params, shape.layers, shape.hidden_size, t) for t in tokens)
    outputs = [d if d == "full" else (t, d) for t in cfg.types for d in cfg.dims]
    outputs = list(dict.fromkeys(outputs))
    rates = cfg.rates
    projection = {
        out: projection_seconds(rates, out[0], coordinates, out[1])
        for out in outputs
        if out != "full"
    }
    result = {
        "shape": shape,
        "examples": n,
        "tokens": total,
        "padded_tokens": n * cfg.max_seq_length,
        "flops": flops,
        "gradient_hours": flops / rates["gradient"].value / 3600 / cfg.gpus,
        "rates": {name: rates[name] for name in ("gradient", *cfg.types)},
        "projection_hours": {out: s / 3600 / cfg.gpus for out, s in projection.items()},
        "disk_bytes": {
            "full fp32": coordinates * 4 + 16 * n,
            "full bf16": coordinates * 2 + 16 * n,
            **{f"{t}_{k}": n * (4 * k + 8) for t, k in projection},
        },
        "block_gib": {t: block_gib(cfg, t, shape.hidden_size) for t in cfg.types},
    }
    result["total_hours"] = result["gradient_hours"] + sum(result["projection_hours"].values())
    if cfg.original:
        result["original_hours"] = {out: original_hours(cfg, shape, n, out) for out in outputs}
        result["original_disk_bytes"] = {
            "full fp16 padded": n * cfg.max_seq_length * shape.hidden_size * 2,
            **{f"{t}_{k}": n * k * 4 for t, k in projection},
        }
    return result


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:,.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


def _hours(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:,.1f} h" if hours < 48 else f"{hours:,.1f} h ({hours / 24:,.1f} days)"


def print_plan(cfg: PlanConfig) -> None:
    r = plan(cfg)
    s = r["shape"]
    device = f"{cfg.gpus} x {cfg.gpu}"
    lines = [
        f"model: hidden {s.hidden_size}, {s.layers} layers, {s.params:,.0f} parameters",
        f"examples: {r['examples']:,}; tokens (truncated at {cfg.max_seq_length}): "
        f"{r['tokens']:,.0f} ({r['tokens'] / r['examples']:,.1f} per example); padded would be "
        f"{r['padded_tokens']:,}",
        f"gradient FLOPs: {r['flops']:.3e} (4 P T + 8 L h T^2 per example)",
        "",
        f"time on {device} (one extraction pass computes each gradient once, all outputs):",
        f"  gradients: {_hours(r['gradient_hours'])}",
        *(f"  {t}_{k}: {_hours(h)}" for (t, k), h in r["projection_hours"].items()),
        f"  total: {_hours(r['total_hours'])}",
        "",
        "disk per split:",
        *(f"  {name}: {_size(b)}" for name, b in r["disk_bytes"].items()),
        "",
        "peak memory of one projection block (per device):",
        *(f"  {t}: {gib:.2f} GiB" for t, gib in r["block_gib"].items()),
    ]
    if cfg.original:
        lines += [
            "",
            f"the original pipeline for the same work ({device}; one job per output, padded to "
            f"{cfg.max_seq_length}, gradients recomputed per job):",
            *(
                f"  {out if out == 'full' else '{}_{}'.format(*out)}: {_hours(h)}"
                for out, h in r["original_hours"].items()
            ),
            f"  total: {_hours(sum(r['original_hours'].values()))}",
            *(f"  disk {name}: {_size(b)}" for name, b in r["original_disk_bytes"].items()),
        ]
    lines += ["", f"rates on one {cfg.gpu} (measured or estimated, and where from):"]
    for name, rate in r["rates"].items():
        unit = RATE_UNITS[name]
        value = f"{rate.value:.3e} {unit}"
        if unit == "FLOP/s":
            value = f"{rate.value / 1e12:,.2f} TFLOP/s"
        lines.append(f"  {name}: {value} ({rate.origin})")
    print("\n".join(lines))
