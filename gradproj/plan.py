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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gradproj.errors import UserError

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


@dataclass
class PlanConfig:
    """Options of `gradproj plan`; `validate` is the one place they are checked."""

    model: str | None = None
    hidden_size: int | None = None
    layers: int | None = None
    params: float | None = None
    n_examples: int | None = None
    mean_tokens: float | None = None
    lengths: Path | None = None
    dataset: str | None = None
    dataset_split: str = "train"
    paradigm: str = "sft"
    max_seq_length: int = 4096
    proj_dim: str = "8192,16384,204800,2048000"
    proj_type: str = "rademacher"
    gpu: str = "h100"
    gpus: int = 1
    proj_memory_gb: float | None = None
    original: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
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
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class Shape:
    hidden_size: int
    layers: int
    params: float


def model_shape(cfg: PlanConfig) -> Shape:
    """Hidden size, layers and parameters: given, or read from the model's config (parameters
    counted on the meta device, so nothing is downloaded or allocated beyond the config)."""
    given = (cfg.hidden_size, cfg.layers, cfg.params)
    if None not in given:
        return Shape(*given)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradproj import models

    source = cfg.model
    if source.startswith(models.BUNDLED_PREFIX):
        source = str(models.bundled_model_dir(source.removeprefix(models.BUNDLED_PREFIX)))
    try:
        config = AutoConfig.from_pretrained(source, token=models.hf_token())
    except OSError as err:
        raise UserError(
            f"--model {cfg.model}: no config found ({str(err).splitlines()[0]})"
        ) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return Shape(
        cfg.hidden_size or config.hidden_size,
        cfg.layers or config.num_hidden_layers,
        cfg.params or sum(p.numel() for p in model.parameters()),
    )


def token_lengths(cfg: PlanConfig) -> list[float]:
    """Each example's token count: from --dataset (tokenized as the extraction does; examples
    it would skip left out), --lengths (a run directory, its manifest.json, or a text file with
    one count per line), or n_examples x mean_tokens."""
    if cfg.dataset is not None:
        return dataset_lengths(cfg)
    if cfg.lengths is None:
        return [cfg.mean_tokens] * cfg.n_examples
    path = Path(cfg.lengths)
    path = path / "manifest.json" if path.is_dir() else path
    try:
        text = path.read_text()
        if path.suffix == ".json":
            return [e["tokens"] for e in json.loads(text)["examples"]]
        return [float(line) for line in text.split()]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"--lengths {cfg.lengths}: not a run or a list of token counts ({err})"
        ) from None


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


def gradient_rate(gpu: str) -> float:
    """FLOP/s of the gradient computation on one device of this kind."""
    if gpu == "cpu":
        return CPU_GRADIENT_FLOPS
    return H100_FLOPS * PEAK_BF16_TFLOPS[gpu] / PEAK_BF16_TFLOPS["h100"]


def projection_seconds(gpu: str, proj_type: str, coordinates: float, k: int) -> float:
    """Seconds to project gradients with this many coordinates in all to k dims."""
    rates = PROJECTION_RATES["cpu" if gpu == "cpu" else "h200"]
    scale = 1.0 if gpu in ("cpu", "h200", "h100") else PEAK_BF16_TFLOPS[gpu] / 989.0
    if proj_type in DENSE:
        return 2 * coordinates * k / (rates[proj_type] * scale)
    return coordinates * rates[proj_type] / scale


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
    device = gradient_rate(cfg.gpu) / H100_FLOPS
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
    projection = {
        out: projection_seconds(cfg.gpu, out[0], coordinates, out[1])
        for out in outputs
        if out != "full"
    }
    result = {
        "shape": shape,
        "examples": n,
        "tokens": total,
        "padded_tokens": n * cfg.max_seq_length,
        "flops": flops,
        "gradient_hours": flops / gradient_rate(cfg.gpu) / 3600 / cfg.gpus,
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
    lines += ["", *ASSUMPTIONS[cfg.gpu == "cpu"]]
    print("\n".join(lines))


ASSUMPTIONS = {
    False: [
        "assumptions: gradient rate calibrated on the original study's 53 h (381,000 examples",
        f"padded to 4096 tokens, OLMo-2-7B, one H100): {H100_FLOPS / 1e12:.0f} TFLOP/s on an H100,",
        "scaled by dense bf16 peak for other GPUs; projection rates measured on an H200 with an",
        "earlier, unfused kernel (bench/RESULTS.md). gradproj itself is not yet timed on a GPU.",
    ],
    True: [
        "assumptions: rates measured on the 2-core CPU of bench/RESULTS.md (gradients at 61% of",
        "its 205.6 GFLOP/s fp32 matmul rate); a bigger node is faster in proportion to its rate.",
    ],
}

PLAN_OPTIONS = {
    "model": dict(help="hub id, local directory or bundled:<name> (its config is read)"),
    "hidden_size": dict(help="hidden size (instead of, or over, --model)"),
    "layers": dict(help="transformer layers (instead of, or over, --model)"),
    "params": dict(help="parameters, e.g. 7.3e9 (instead of, or over, --model)"),
    "n_examples": dict(help="examples in the split"),
    "mean_tokens": dict(help="tokens per example, before truncation (all assumed equal)"),
    "lengths": dict(help="a run directory, its manifest.json, or a file of token counts"),
    "dataset": dict(help="a dataset to tokenize with --model's tokenizer (as gradproj extract)"),
    "dataset_split": dict(help="split or slice of --dataset"),
    "paradigm": dict(help="sft, pre or mlm, for --dataset"),
    "max_seq_length": dict(help="truncation length"),
    "proj_dim": dict(help="dims, comma-separated; 'full' adds the full gradient"),
    "proj_type": dict(help="rademacher, normal, sjlt, kronecker, comma-separated"),
    "gpu": dict(choices=list(DEVICES), help="device kind"),
    "gpus": dict(help="devices sharing the split (a SLURM job array)"),
    "proj_memory_gb": dict(help="projection memory budget (default: as gradproj extract)"),
    "original": dict(help="also print what the original pipeline would take for the same work"),
}
