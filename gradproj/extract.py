"""The extraction command: dataset -> gradients -> (projections) -> shards and manifests.

One pass computes each example's gradient once and writes every requested output (the full
gradient and/or several projection dims), each into its own run directory.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gradproj import __version__, data, models, store
from gradproj.errors import UserError
from gradproj.gradients import embedding_gradients, mean_last_hidden_states
from gradproj.params import ParamsExample, ParamsTarget
from gradproj.projection import PROJ_TYPES, Projector

MODES = ("store", "store_mean")
TARGETS = ("embeddings", "params", "hidden")
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Options that decide the bytes of a run: a rerun into the same directory must agree on them.
IDENTITY = (
    "model", "dataset", "dataset_split", "checkpoint_nr", "paradigm", "mode", "max_seq_length",
    "limit", "gradients_per_file", "proj_seed", "dtype", "save_dtype", "target",
)  # fmt: skip


@dataclass
class ExtractConfig:
    model: str
    dataset: str
    checkpoint_nr: int = 0
    dataset_split: str = "train"
    paradigm: str = "sft"
    mode: str = "store"
    random_projection: bool = False
    proj_dim: list | str | None = None  # None: the target's default (see _target_defaults)
    proj_type: str | list | None = None
    proj_seed: int = 42
    proj_memory_gb: float | None = None
    gradients_per_file: int = 1000
    gradients_output_path: str = "./gradients"
    skip_if_gradient_folder_exists: bool = False
    max_seq_length: int = 4096
    dtype: str = "auto"
    save_dtype: str = "fp32"
    device: str | None = None
    batch_tokens: int | None = None
    limit: int | None = None
    start: int | None = None
    end: int | None = None
    target: str = "embeddings"
    modules: str | list | None = None
    include_lm_head: bool = False
    full: bool = False
    skip_invalid_rows: bool = False

    def __post_init__(self):
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # CPU: small batches stay in cache (measured: 1024 tokens ran 2.3x faster than 8192)
        self.batch_tokens = self.batch_tokens or (8192 if self.device.startswith("cuda") else 1024)
        self._check_projection_options()
        self._target_defaults()
        self.proj_dim = parse_dims(self.proj_dim) if self.random_projection else ["full"]
        if self.full and "full" not in self.proj_dim:
            self.proj_dim.append("full")
        if isinstance(self.proj_type, str):
            self.proj_type = [t.strip() for t in self.proj_type.split(",") if t.strip()]
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.paradigm in data.PARADIGMS, f"unknown paradigm {self.paradigm!r}"),
            (self.mode in MODES, f"unknown mode {self.mode!r}; use store or store_mean"),
            (
                bool(self.proj_type) and set(self.proj_type) <= set(PROJ_TYPES),
                f"unknown --proj_type {','.join(self.proj_type)!r}; use {', '.join(PROJ_TYPES)}",
            ),
            (self.max_seq_length >= 2, "--max_seq_length must be at least 2"),
            (self.gradients_per_file >= 1, "--gradients_per_file must be at least 1"),
            (self.batch_tokens >= 1, "--batch_tokens must be at least 1"),
            (self.limit is None or self.limit >= 0, "--limit must be >= 0"),
            (self.checkpoint_nr >= 0, "checkpoint_nr must be >= 0"),
            (self.save_dtype in SAVE_DTYPES, "--save_dtype must be fp32 or bf16"),
            (self.dtype in ("auto", *models.DTYPES), "--dtype must be auto, fp32, bf16 or fp16"),
            (
                self.target in TARGETS,
                f"unknown --target {self.target!r}; use embeddings, params or hidden",
            ),
            (
                self.target != "hidden" or self.proj_dim == ["full"],
                "--target hidden stores the mean last hidden state as is: drop --random_projection",
            ),
            (
                self.target == "params" or (not self.modules and not self.include_lm_head),
                "--modules and --include_lm_head choose layers for --target params only",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if not self.device.startswith(("cpu", "cuda")):
            raise UserError(f"--device {self.device!r}: use cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA device is visible")

    def outputs(self) -> list:
        """What one pass writes: "full" and/or (proj_type, dim) pairs, each its own run."""
        pairs = [d if d == "full" else (t, d) for t in self.proj_type for d in self.proj_dim]
        return list(dict.fromkeys(pairs))

    def identity(self) -> dict:
        identity = {key: getattr(self, key) for key in IDENTITY}
        if self.target == "params":
            identity |= {"modules": self.modules, "include_lm_head": self.include_lm_head}
        return identity

    def _check_projection_options(self) -> None:
        """--proj_dim/--proj_type without a projection would be silently ignored: refuse."""
        projects = self.random_projection or (self.target == "params" and not self.full)
        given = [f"--{k}" for k in ("proj_dim", "proj_type") if getattr(self, k) is not None]
        if given and not projects:
            raise UserError(
                f"{' and '.join(given)} without --random_projection would store only full "
                "gradients; add --random_projection (and 'full' in --proj_dim to keep them too)"
            )

    def _target_defaults(self) -> None:
        """--target params projects by default, with kronecker 16x16 per layer; --full alone
        stores the exact gradient instead. Unset options mean the embedding target's defaults."""
        params = self.target == "params"
        if self.proj_type is None:
            self.proj_type = "kronecker" if params else "rademacher"
        if self.proj_dim is None:
            self.proj_dim = ["16x16"] if params and "kronecker" in str(self.proj_type) else [16384]
        if params and not self.full:
            self.random_projection = True
        if isinstance(self.modules, str):
            self.modules = [m.strip() for m in self.modules.split(",") if m.strip()] or None


def parse_dims(spec) -> list:
    """'8192,16384' or [8192] -> [8192, 16384]; 'full' may stand among them."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    dims = []
    for item in items:
        item = str(item).strip()
        if item == "full":
            dims.append("full")
            continue
        if not re.fullmatch(r"\d+(x\d+)?", item) or int(item.split("x")[0]) < 1:
            raise UserError(f"--proj_dim {item!r}: each dim must be an integer >= 1 (or 'full')")
        dims.append(item if "x" in item else int(item))
    if not dims:
        raise UserError("--proj_dim is empty")
    return list(dict.fromkeys(dims))


def path_component(name: str) -> str:
    """A hub id keeps its owner/name nesting, as the original layout; a local path its name."""
    if name.startswith(models.BUNDLED_PREFIX):
        return name.removeprefix(models.BUNDLED_PREFIX)
    path = Path(name)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return name


def run_dir(cfg: ExtractConfig, output: str | int) -> Path:
    variant = "full" if output == "full" else "{}_{}".format(*output)
    if cfg.target == "params":  # never shares a directory with an embedding run
        variant = f"params_{variant}"
    if cfg.target == "hidden":
        variant = "hidden"
    if cfg.mode == "store_mean":
        variant += "_mean"
    split = re.sub(r"[^\w.-]+", "_", cfg.dataset_split).strip("_")
    return (
        Path(cfg.gradients_output_path)
        / variant
        / path_component(cfg.model)
        / path_component(cfg.dataset)
        / split
        / str(cfg.checkpoint_nr)
    )


def task_range(cfg: ExtractConfig, n: int) -> tuple[int, int]:
    """This process's example range: --start/--end, else its SLURM array share, else all.

    A range is widened to whole shards: each bound is rounded up to a multiple of
    --gradients_per_file (at most n), so processes whose ranges partition the dataset also
    partition its shards, and no two of them ever write the same shard. Array tasks get
    contiguous runs of whole shards; a task left without any (more tasks than shards) gets the
    empty range n..n and exits cleanly.
    """
    if cfg.start is not None or cfg.end is not None:
        start = cfg.start or 0
        end = max(n, start) if cfg.end is None else cfg.end
        if start < 0 or end < start:
            raise UserError(f"--start {start} / --end {end} is not a range of example indices")
        per = cfg.gradients_per_file
        aligned = tuple(min(n, -(-x // per) * per) for x in (start, end))
        if aligned != (start, min(end, n)):
            print(
                f"examples {start}..{end} rounded up to shard boundaries (multiples of {per}): "
                f"{aligned[0]}..{aligned[1]} of {n}",
                file=sys.stderr,
            )
        return aligned
    share = array_share()
    if share is None:
        return 0, n
    rank, count = share
    shards = store.shard_ranges(0, n, cfg.gradients_per_file)
    mine = shards[rank * len(shards) // count : (rank + 1) * len(shards) // count]
    return (mine[0][0], mine[-1][1]) if mine else (n, n)


def array_share() -> tuple[int, int] | None:
    """(rank, count) of this SLURM array task among its array, or None outside an array.

    Works from SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_MIN/MAX/STEP and/or COUNT, for any
    evenly spaced array (--array=0-N, 1-N, 0-N:step, with or without a %limit).
    """
    env = os.environ
    if env.get("SLURM_ARRAY_TASK_ID") is None:
        return None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        count = int(env["SLURM_ARRAY_TASK_COUNT"]) if env.get("SLURM_ARRAY_TASK_COUNT") else None
        lo = int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
        if env.get("SLURM_ARRAY_TASK_MAX"):
            hi = int(env["SLURM_ARRAY_TASK_MAX"])
        elif count is not None:
            hi = lo + (count - 1) * step
        else:
            raise ValueError("neither SLURM_ARRAY_TASK_MAX nor SLURM_ARRAY_TASK_COUNT is set")
    except ValueError as err:
        raise UserError(f"cannot read this SLURM array task's position: {err}") from err
    if count is None:
        count = (hi - lo) // step + 1 if step > 0 else 0
    spaced = step >= 1 and count >= 1 and hi - lo == (count - 1) * step
    if not (spaced and lo <= task <= hi and (task - lo) % step == 0):
        raise UserError(
            f"SLURM array task {task} of ids {lo}..{hi} (step {step}, {count} tasks) is not part "
            "of an evenly spaced array; submit with --array=0-N (optionally :STEP or %LIMIT), "
            "or give each job --start/--end"
        )
    return (task - lo) // step, count


class Preemption:
    """SIGTERM/SIGUSR1 (SLURM's warning before a kill) stop the run at the next batch."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


class Stopped(Exception):
    pass


@dataclass
class Outputs:
    """The run directories one pass writes, with what each needs to describe itself."""

    dirs: dict
    header: dict
    projectors: dict[str, Projector]
    params: ParamsTarget | None = None

    def header_for(self, output) -> dict:
        if self.params is not None:
            return self.header | self.params.header_for(output)
        if self.header["target"] == "hidden":
            return self.header | {"kind": "hidden", "projection": None}
        projected = output != "full"
        projection = None
        if projected:
            proj_type, dim = output
            projection = self.projectors[proj_type].describe() | {"dim": dim}
        return self.header | {
            "kind": "projected" if projected else "full",
            "projection": projection,
        }


def versions() -> dict:
    import datasets
    import safetensors
    import transformers

    return {
        "gradproj": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "safetensors": safetensors.__version__,
    }


def check_existing(cfg: ExtractConfig, dirs: dict) -> None:
    for path in dirs.values():
        manifest = path / store.MANIFEST
        if not manifest.is_file():
            continue
        previous = store.Run(path).manifest.get("identity", {})
        diff = [k for k, v in cfg.identity().items() if previous.get(k) != v]
        if diff:
            raise UserError(
                f"{path} holds a run with different options ({', '.join(diff)}); "
                "use another --gradients_output_path or delete that run"
            )


def run_extraction(cfg: ExtractConfig) -> int:
    dirs = {out: run_dir(cfg, out) for out in cfg.outputs()}
    if cfg.skip_if_gradient_folder_exists and all(d.exists() for d in dirs.values()):
        print(f"gradient folder exists, skipping: {', '.join(map(str, dirs.values()))}")
        return 0
    check_existing(cfg, dirs)
    rows, first_row = data.load_rows(cfg.dataset, cfg.dataset_split)
    data.check_columns(rows, cfg.paradigm)
    if cfg.limit is not None:
        rows = rows.select(range(min(cfg.limit, len(rows))))
    start, end = task_range(cfg, len(rows))  # before loading the model: bad ranges fail fast
    if all(is_complete(d, len(rows)) for d in dirs.values()):  # may be read-only: write nothing
        print(f"complete already, nothing to do: {', '.join(map(str, dirs.values()))}")
        return 0
    check_rows(cfg, rows, first_row)
    for path in dirs.values():
        store.check_writable(path)
    if cfg.mode == "store_mean":
        if cfg.start is not None or cfg.end is not None:
            raise UserError("--mode store_mean averages the whole dataset: drop --start/--end")
        if (array_share() or (0,))[0] != 0:
            print("--mode store_mean averages the whole dataset: array task 0 computes it")
            return 0
    elif start == end and len(rows) > 0:  # e.g. an array with more tasks than shards
        print(f"examples {start}..{end}: no shard left for this task ({len(rows)} examples)")
        return 0
    checkpoint = models.resolve_checkpoint(cfg.model, cfg.checkpoint_nr)
    tokenizer = models.load_tokenizer(checkpoint)
    model = models.load_model(
        checkpoint, cfg.paradigm, models.resolve_dtype(cfg.dtype, cfg.device), cfg.device
    )
    outputs = make_outputs(cfg, dirs, checkpoint, model, len(rows))
    extractor = Extractor(cfg, rows, first_row, tokenizer, model, outputs)
    if cfg.mode == "store_mean":
        return extractor.run_mean()
    return extractor.run(start, end)


def is_complete(path: Path, n_rows: int) -> bool:
    """Whether a run directory already holds every shard of `n_rows` rows, as its manifest says."""
    if not (path / store.MANIFEST).is_file():
        return False
    run = store.Run(path)
    listed = {s["file"] for s in run.manifest.get("shards", [])}
    return (
        run.manifest.get("complete") is True
        and run.manifest.get("n_examples") == n_rows
        and listed == set(run.expected_shards())
        and run.verify().ok
    )


def check_rows(cfg: ExtractConfig, rows, first_row: int) -> None:
    """Every chosen row must suit the paradigm, or with --skip_invalid_rows is named and skipped."""
    invalid = data.invalid_rows(rows, cfg.paradigm, first_row)
    if not invalid:
        return
    where = f"{cfg.dataset} {cfg.dataset_split}"
    if not cfg.skip_invalid_rows:
        outcome = "fix them, or pass --skip_invalid_rows to record them as skipped and go on"
        raise UserError(data.describe_invalid(invalid, where, outcome))
    outcome = "skipped (--skip_invalid_rows), each recorded in the manifest with its reason"
    print("warning: " + data.describe_invalid(invalid, where, outcome), file=sys.stderr)


def make_outputs(cfg, dirs, checkpoint, model, n_rows) -> Outputs:
    hidden = model.get_input_embeddings().weight.shape[1]
    dims = [d for d in cfg.proj_dim if d != "full"]
    projectors = {
        proj_type: Projector(
            proj_type,
            dims,
            cfg.proj_seed,
            (cfg.max_seq_length, hidden),
            device=cfg.device,
            memory_gb=cfg.proj_memory_gb,
        )
        for proj_type in (cfg.proj_type if dims and cfg.target == "embeddings" else [])
    }
    params = None
    if cfg.target == "params":
        params = ParamsTarget(
            model, cfg.modules, cfg.include_lm_head, cfg.outputs(), cfg.proj_seed, cfg.device,
            cfg.proj_memory_gb, cfg.batch_tokens, cfg.gradients_per_file,
        )  # fmt: skip
    header = {
        "target": cfg.target,
        "model": cfg.model,
        "checkpoint": checkpoint.name,
        "checkpoint_nr": cfg.checkpoint_nr,
        "dataset": cfg.dataset,
        "split": cfg.dataset_split,
        "paradigm": cfg.paradigm,
        "mode": cfg.mode,
        "hidden_size": hidden,
        "max_seq_length": cfg.max_seq_length,
        "shard_size": n_rows if cfg.mode == "store_mean" else cfg.gradients_per_file,
        "identity": cfg.identity(),
        "options": asdict(cfg),
        "versions": versions(),
    }
    return Outputs(dirs, header, projectors, params)


class Extractor:
    """Runs the batches of one task range, shard by shard."""

    def __init__(self, cfg, rows, first_row: int, tokenizer, model, outputs: Outputs):
        self.cfg, self.rows, self.tokenizer, self.model = cfg, rows, tokenizer, model
        self.first_row = first_row  # split row of rows[0]: examples are named by split rows
        self.outputs = outputs
        self.causal = cfg.paradigm != "mlm"
        self.pad_id = tokenizer.pad_token_id or 0
        self.preemption = Preemption()
        self.stats = {"examples": 0, "skipped": 0, "tokens": 0, "shards_written": 0}

    def tokenize(self, start: int, end: int) -> tuple[list[data.Example], list[dict]]:
        """Rows start..end-1 of the chosen rows as examples; those without a label are skipped."""
        kept, skipped = [], []
        for i in range(start, end):
            index, row = self.first_row + i, self.rows[i]
            ex, problem = self.tokenize_row(row, index)
            if ex is None:
                eid = data.example_id(row, index)
                skipped.append({"index": index, "id": eid, "tokens": 0, "reason": problem})
            elif data.label_positions(ex, self.cfg.paradigm) == 0:
                reason = f"no label token within max_seq_length={self.cfg.max_seq_length}"
                skipped.append({"index": index, "id": ex.id, "tokens": ex.length, "reason": reason})
            else:
                kept.append(ex)
        return kept, skipped

    def tokenize_row(self, row: dict, index: int) -> tuple[data.Example | None, str | None]:
        """The row's example, or (None, why) for a row --skip_invalid_rows lets through."""
        problem = data.row_problem(row, self.cfg.paradigm)
        if problem is None:
            try:
                return data.tokenize(
                    self.tokenizer, row, index, self.cfg.paradigm, self.cfg.max_seq_length,
                    str(self.cfg.checkpoint_nr),
                ), None  # fmt: skip
            except Exception as err:  # text that the tokenizer or chat template cannot take
                problem = f"the tokenizer cannot take it ({type(err).__name__}: {err})"
        if not self.cfg.skip_invalid_rows:
            eid = data.example_id(row, index)
            raise UserError(f"row {index} (id {eid!r}): {problem}; fix it or --skip_invalid_rows")
        return None, f"invalid row: {problem}"

    def gradients(self, examples, progress):
        """Yields (example, fp32 [length, hidden] gradient) in dataset order within a shard."""
        results = {}
        for batch in data.batches_by_tokens(examples, self.cfg.batch_tokens):
            if self.preemption.requested:
                raise Stopped
            grads = self.batch_gradients(batch)
            for ex, g in zip(batch, grads, strict=True):
                results[ex.index] = (ex, g)
            progress.update(len(batch))
        return [results[i] for i in sorted(results)]

    def batch_gradients(self, batch) -> list:
        """Embedding gradients, for --target params each example's ParamsExample, for --target
        hidden each example's mean last hidden state."""
        if self.outputs.params is not None:
            return self.outputs.params.batch(self.model, batch, self.causal, self.pad_id)
        if self.cfg.target == "hidden":
            return mean_last_hidden_states(self.model, batch, self.pad_id)
        return embedding_gradients(self.model, batch, self.causal, self.pad_id)

    def run(self, start: int, end: int) -> int:
        began = time.time()
        for path in self.outputs.dirs.values():
            store.remove_leftovers(path)
        ranges = store.shard_ranges(start, end, self.cfg.gradients_per_file)
        # Each manifest is read once here, not once per shard: it lists every example.
        recorded = {d: store.recorded_checksums(d) for d in self.outputs.dirs.values()}
        todo = [r for r in ranges if not all(shard_is_valid(d, *r, recorded[d]) for d in recorded)]
        progress = tqdm(total=sum(e - s for s, e in todo), unit="ex", desc="gradients")
        logger = WandbLogger.maybe(self.cfg)
        try:
            # shards another process holds are left for later: by then done, or free to take
            held = []
            for s, e in todo:
                if not self.write_claimed(s, e, progress, wait=False):
                    held.append((s, e))
                logger.log(self.stats, began)
            for s, e in held:
                self.write_claimed(s, e, progress, wait=True)
                logger.log(self.stats, began)
        except BaseException as err:
            progress.close()  # an error message must not share the progress bar's line
            if not isinstance(err, Stopped):
                raise
            self.merge_all({})
            sig = self.preemption.signal
            done = len(ranges) - len(todo) + self.stats["shards_written"]
            print(
                f"stopped by {signal.Signals(sig).name} (preemption, time limit or scancel): "
                f"{done} of {len(ranges)} shard(s) of examples {start}..{end} done, "
                f"{self.stats['shards_written']} of them in this run; the shard in progress was "
                "abandoned (no partial file is left) and the manifest written. To resume, rerun "
                "the same command or resubmit the same sbatch job (a job requeued by SLURM "
                "resumes by itself): finished shards are kept.",
                file=sys.stderr,
                flush=True,
            )
            return 128 + sig
        progress.close()
        if not todo:
            self.merge_all({})
        self.print_summary(began, start, end, len(ranges) - len(todo))
        return 0

    def write_claimed(self, start: int, end: int, progress, wait: bool) -> bool:
        """Write a shard unless another process holds it (False) or has written it meanwhile."""
        dirs = list(self.outputs.dirs.values())
        with store.claim_shard(dirs, start, end, wait) as claimed:
            if not claimed:
                return False
            if all(shard_is_valid(d, start, end, {}) for d in dirs):
                progress.update(end - start)
            else:
                self.write_shard(start, end, progress)
        return True

    def write_shard(self, start: int, end: int, progress) -> None:
        kept, skipped = self.tokenize(start, end)
        progress.update(len(skipped))
        pairs = self.gradients(kept, progress)
        records, vectors = self.describe(pairs, skipped)
        fresh = {}
        for out, path in self.outputs.dirs.items():
            tensors = self.shard_tensors(out, vectors, records)
            entry = store.write_shard(path, start, end, tensors, records)
            fresh[out] = {entry["file"]: entry}
        self.merge_all(fresh)
        self.stats["shards_written"] += 1

    def describe(self, pairs, skipped) -> tuple[store.ShardRecord, dict]:
        record = store.ShardRecord(skipped=list(skipped))
        kept = []
        for ex, g in pairs:
            norm = g.norm if isinstance(g, ParamsExample) else float(g.double().norm())
            if norm == 0.0:
                record.skipped.append(
                    {"index": ex.index, "id": ex.id, "tokens": ex.length, "reason": "zero gradient"}
                )
                continue
            kept.append((ex, g))
            record.examples.append(
                {
                    "index": ex.index,
                    "id": ex.id,
                    "tokens": ex.length,
                    "label_tokens": data.label_positions(ex, self.cfg.paradigm),
                    "grad_norm": norm,
                }
            )
        self.stats["examples"] += len(kept)
        self.stats["skipped"] += len(record.skipped)
        self.stats["tokens"] += sum(ex.length for ex, _ in pairs)
        record.skipped.sort(key=lambda s: s["index"])
        for s in record.skipped:
            tqdm.write(f"warning: skipped example {s['id']!r}: {s['reason']}", file=sys.stderr)
        grads = [g for _, g in kept]
        if self.outputs.params is not None:  # params: the batch pass already projected
            return record, self.outputs.params.stack(grads, list(self.outputs.dirs))
        if self.cfg.target == "hidden":
            hidden = self.outputs.header["hidden_size"]
            return record, {"full": torch.stack(grads) if grads else torch.zeros(0, hidden)}
        vectors = {"full": grads}
        for proj_type, projector in self.outputs.projectors.items() if grads else ():
            for dim, matrix in projector.project_batch(grads).items():
                vectors[proj_type, dim] = matrix
        return record, vectors

    def shard_tensors(self, out, vectors: dict, record: store.ShardRecord) -> dict:
        index = torch.tensor([e["index"] for e in record.examples], dtype=torch.long)
        if out != "full":
            got = vectors.get((out[0], dim_size(out[1])))
            empty = torch.zeros(0, dim_size(out[1]))
            return {"vectors": got if got is not None else empty, "index": index}
        if self.outputs.params is not None or self.cfg.target == "hidden":  # one row per example
            full = vectors["full"].to(SAVE_DTYPES[self.cfg.save_dtype])
            return {"vectors": full, "index": index}
        grads = vectors["full"]
        hidden = self.outputs.header["hidden_size"]
        values = torch.cat(grads) if grads else torch.zeros(0, hidden)
        lengths = torch.tensor([0] + [g.shape[0] for g in grads], dtype=torch.long)
        return {
            "values": values.to(SAVE_DTYPES[self.cfg.save_dtype]),
            "offsets": torch.cumsum(lengths, 0),
            "index": index,
        }

    def merge_all(self, fresh: dict) -> None:
        n = len(self.rows)
        for out, path in self.outputs.dirs.items():
            store.merge_manifest(
                path,
                self.outputs.header_for(out),
                n,
                self.outputs.header["shard_size"],
                fresh.get(out, {}),
            )

    def run_mean(self) -> int:
        """store_mean: one vector per output, the mean over every example with a gradient."""
        began = time.time()
        n = len(self.rows)
        for path in self.outputs.dirs.values():
            store.remove_leftovers(path)
        progress = tqdm(total=n, unit="ex", desc="gradients")
        kept, skipped = self.tokenize(0, n)
        progress.update(len(skipped))
        pairs = self.gradients(kept, progress)
        progress.close()
        record, vectors = self.describe(pairs, skipped)
        count = len(record.examples)
        mean_record = store.ShardRecord(
            [{"index": 0, "id": "mean", "tokens": 0, "label_tokens": 0, "grad_norm": 0.0,
              "count": count}],
            record.skipped,
        )  # fmt: skip
        fresh = {}
        for out, path in self.outputs.dirs.items():
            tensors = self.mean_tensors(out, vectors)
            mean_record.examples[0]["grad_norm"] = float(_mean_norm(tensors))
            entry = store.write_shard(path, 0, n, tensors, mean_record)
            fresh[out] = {entry["file"]: entry}
        self.merge_all(fresh)
        self.print_summary(began, 0, n, 0)
        return 0

    def mean_tensors(self, out, vectors) -> dict:
        index = torch.zeros(1, dtype=torch.long)
        if out != "full":
            mean = vectors[out[0], dim_size(out[1])].double().mean(0, keepdim=True)
            return {"vectors": mean.float(), "index": index}
        if self.outputs.params is not None or self.cfg.target == "hidden":
            mean = vectors["full"].double().mean(0, keepdim=True)
            return {"vectors": mean.to(SAVE_DTYPES[self.cfg.save_dtype]), "index": index}
        grads = vectors["full"]
        longest = max(g.shape[0] for g in grads)
        total = torch.zeros(longest, grads[0].shape[1], dtype=torch.float64)
        for g in grads:
            total[: g.shape[0]] += g.double()
        values = (total / len(grads)).to(SAVE_DTYPES[self.cfg.save_dtype])
        return {"values": values, "offsets": torch.tensor([0, longest]), "index": index}

    def print_summary(self, began, start, end, resumed) -> None:
        seconds = time.time() - began
        s = self.stats
        rate = s["examples"] / seconds if seconds > 0 else 0.0
        print(
            f"done: examples {start}..{end}: {s['examples']} gradients, {s['skipped']} skipped, "
            f"{s['tokens']} tokens, {resumed} shard(s) already present, {seconds:.1f} s, "
            f"{rate:.2f} examples/s\noutput: "
            + ", ".join(str(p) for p in self.outputs.dirs.values())
        )


def dim_size(spec: int | str) -> int:
    """The length of a projected vector: k, or k1 * k2 for a kronecker 'k1xk2'."""
    factors = [int(x) for x in str(spec).split("x")]
    return factors[0] * (factors[1] if len(factors) > 1 else 1)


def _mean_norm(tensors: dict) -> torch.Tensor:
    t = tensors.get("vectors", tensors.get("values"))
    return t.double().norm()


def shard_is_valid(run_dir: Path, start: int, end: int, recorded: dict[str, str]) -> bool:
    """A shard counts as done when its file matches its recorded (or its own) checksum."""
    path = run_dir / store.shard_name(start, end)
    if not path.is_file():
        return False
    if path.name in recorded:
        return store.file_sha256(path) == recorded[path.name]
    return store.check_shard(path) is not None


class WandbLogger:
    """Logs throughput and memory to wandb only when the user configured wandb."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def maybe(cls, cfg: ExtractConfig) -> WandbLogger:
        if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
            return cls(None)
        import wandb

        safe = {k: v for k, v in asdict(cfg).items() if "token" not in k.lower()}
        return cls(wandb.init(project=os.environ.get("WANDB_PROJECT", "gradproj"), config=safe))

    def log(self, stats: dict, began: float) -> None:
        if self.run is None:
            return
        seconds = max(time.time() - began, 1e-9)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _peak_rss_bytes()
        self.run.log(
            {
                "examples_per_s": stats["examples"] / seconds,
                "tokens_per_s": stats["tokens"] / seconds,
                "peak_memory_gb": peak / 2**30,
            }
        )


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_dirs_below(path: str) -> list[Path]:
    """`path` itself when it is a run directory, else every run directory below it."""
    root = Path(path)
    if (root / store.MANIFEST).is_file() or not root.is_dir():
        return [root]
    return sorted(p.parent for p in root.rglob(store.MANIFEST)) or [root]


def verify_run(path: str) -> int:
    """Print complete, missing and corrupt shards of a run (or of every run below `path`);
    exit status 0 only when every run is complete and its manifest lists every shard."""
    status = 0
    for run_path in run_dirs_below(path):
        status |= _verify_one(run_path)
    return status


def _verify_one(path: Path) -> int:
    run = store.Run(path)
    report = run.verify()
    for label, names in (("missing", report.missing), ("corrupt", report.corrupt)):
        for name in names:
            print(f"{label}: {path / name}")
    listed = {s["file"] for s in run.manifest["shards"]}
    unmerged = [name for name in report.complete if name not in listed]
    if not report.ok:
        print(f"{path}: INCOMPLETE: {report.summary()}; rerun the extraction to resume it")
        return 1
    if unmerged:
        print(
            f"{path}: every shard is present, but manifest.json lacks {len(unmerged)} of them "
            f"({', '.join(unmerged[:5])}); run: extract_gradients.py --merge {path}"
        )
        return 1
    print(
        f"{path}: complete: {len(report.complete)} shard(s), {len(run.manifest['examples'])} "
        f"gradient(s), {len(run.manifest['skipped'])} skipped"
    )
    return 0


def merge_run(path: str) -> int:
    """Rebuild manifest.json from the shards present (after job-array tasks), of a run or of
    every run below `path`."""
    for run_path in run_dirs_below(path):
        manifest = store.Run(run_path).manifest
        header = {k: v for k, v in manifest.items() if k not in store.DERIVED_FIELDS}
        merged = store.merge_manifest(
            run_path, header, manifest["n_examples"], manifest["shard_size"], {}
        )
        print(f"{run_path}: {len(merged['shards'])} shard(s), complete={merged['complete']}")
    return 0
