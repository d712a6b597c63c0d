"""The extraction loop: dataset -> one pass per batch for every target -> shards, manifests.

One pass computes each example's gradient once and writes every requested output (the full
gradient and/or several projection dims, of one target or several), each into its own run
directory.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from gradproj import data, fsio, models, store
from gradproj.errors import UserError
from gradproj.extract.config import SAVE_DTYPES, ExtractConfig
from gradproj.extract.layout import check_existing, is_complete, run_dirs
from gradproj.extract.slurm import Preemption, Stopped, array_share, task_range
from gradproj.targets import Target, TargetOptions, make_target, run_batch


def run_extraction(cfg: ExtractConfig) -> int:
    dirs = run_dirs(cfg)
    if cfg.skip_if_gradient_folder_exists and all(d.exists() for d in dirs.values()):
        print(f"gradient folder exists, skipping: {', '.join(map(str, dirs.values()))}")
        return 0
    check_existing(cfg, dirs)
    rows, first_row = data.load_rows(cfg.dataset, cfg.dataset_split)
    data.check_columns(rows, cfg.paradigm)
    if cfg.limit is not None:
        rows = rows.select(range(min(cfg.limit, len(rows))))
    start, end = task_range(cfg, len(rows))  # before loading the model: bad ranges fail fast
    where = f"{cfg.dataset} {cfg.dataset_split}"
    ids = data.checked_ids(rows, first_row, where)
    chosen = [(first_row + i, example) for i, example in enumerate(ids)]
    if all(is_complete(d, chosen) for d in dirs.values()):  # may be read-only: write nothing
        print(f"complete already, nothing to do: {', '.join(map(str, dirs.values()))}")
        return 0
    data.check_invalid_rows(rows, first_row, where, cfg.paradigm, cfg.skip_invalid_rows)
    for path in dirs.values():
        fsio.check_writable(path, f"the output directory {path}", "--gradients_output_path")
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
    options = TargetOptions(
        cfg.proj_seed, cfg.device, cfg.proj_memory_gb, cfg.max_seq_length, cfg.batch_tokens,
        cfg.gradients_per_file, cfg.modules, cfg.include_lm_head,
    )  # fmt: skip
    targets = {
        name: make_target(name, model, specs, options) for name, specs in cfg.outputs.items()
    }
    header = run_header(cfg, checkpoint, model, len(rows))
    extractor = Extractor(cfg, rows, first_row, ids, tokenizer, model, targets, dirs, header)
    if cfg.mode == "store_mean":
        return extractor.run_mean()
    return extractor.run(start, end)


def run_header(cfg: ExtractConfig, checkpoint, model, n_rows: int) -> dict:
    """The manifest fields every run of this pass shares ("target" and "identity" per target)."""
    return {
        "target": None,
        "model": cfg.model,
        "checkpoint": checkpoint.name,
        "checkpoint_nr": cfg.checkpoint_nr,
        "dataset": cfg.dataset,
        "split": cfg.dataset_split,
        "paradigm": cfg.paradigm,
        "mode": cfg.mode,
        "hidden_size": model.get_input_embeddings().weight.shape[1],
        "max_seq_length": cfg.max_seq_length,
        "shard_size": n_rows if cfg.mode == "store_mean" else cfg.gradients_per_file,
        "identity": None,
        "options": asdict(cfg),
        "versions": models.versions("python", "torch", "transformers", "datasets", "safetensors"),
    }


class Extractor:
    """Runs the batches of one task range, shard by shard, for every target at once."""

    def __init__(self, cfg, rows, first_row, ids, tokenizer, model, targets, dirs, header):
        self.cfg, self.rows, self.model = cfg, rows, model
        self.first_row = first_row  # split row of rows[0]: examples are named by split rows
        self.ids = ids  # each row's example id
        self.targets: dict[str, Target] = targets
        self.dirs = dirs
        self.header = header
        self.causal = cfg.paradigm != "mlm"
        self.pad_id = tokenizer.pad_token_id or 0
        self.tokenization = data.Tokenization(
            tokenizer, cfg.paradigm, cfg.max_seq_length, str(cfg.checkpoint_nr),
            cfg.skip_invalid_rows,
        )  # fmt: skip
        self.preemption = Preemption()
        self.stats = {"examples": 0, "skipped": 0, "tokens": 0, "shards_written": 0}

    def header_for(self, target: str, spec) -> dict:
        identity = self.cfg.run_identity(target)
        common = {
            "target": target,
            "identity": identity,
            "identity_sha256": store.options_sha256(identity | {"output": spec.name}),
        }
        return self.header | common | self.targets[target].header(spec)

    def shard_run(self, target: str, spec) -> dict:
        """What each shard records of its run: the header without what varies by process."""
        header = self.header_for(target, spec)
        described = {k: v for k, v in header.items() if k not in store.PROCESS_FIELDS}
        return described | {"n_examples": len(self.rows)}

    def shard_problems(self, start: int, end: int, recorded: dict) -> dict:
        """{run directory: why its shard start..end must be computed}, empty when every one is
        accepted; `recorded`: each directory's manifest checksums (None: check the contents)."""
        rows = [(self.first_row + i, self.ids[i]) for i in range(start, end)]
        problems = {}
        for (name, spec), path in self.dirs.items():
            shard = path / store.shard_name(start, end)
            checksum = None if recorded is None else recorded[path].get(shard.name)
            identity = self.header_for(name, spec)["identity_sha256"]
            problem = store.shard_problem(shard, identity, checksum, rows)
            if problem is not None:
                problems[shard] = problem
        return problems

    def payloads(self, examples, progress) -> dict[str, list]:
        """{target: [(example, payload)]} in dataset order within a shard."""
        names = list(self.targets)
        results = {name: {} for name in names}
        for batch in data.batches_by_tokens(examples, self.cfg.batch_tokens):
            if self.preemption.requested:
                raise Stopped
            per_target = run_batch(
                list(self.targets.values()), self.model, batch, self.causal, self.pad_id
            )
            for name, payloads in zip(names, per_target, strict=True):
                for ex, payload in zip(batch, payloads, strict=True):
                    results[name][ex.index] = (ex, payload)
            progress.update(len(batch))
        return {name: [found[i] for i in sorted(found)] for name, found in results.items()}

    def run(self, start: int, end: int) -> int:
        began = time.time()
        for path in self.dirs.values():
            store.remove_leftovers(path)
        ranges = store.shard_ranges(start, end, self.cfg.gradients_per_file)
        # Each manifest is read once here, not once per shard: it lists every example.
        recorded = {d: store.recorded_checksums(d) for d in self.dirs.values()}
        todo = []
        for s, e in ranges:
            problems = self.shard_problems(s, e, recorded)
            for shard, problem in problems.items():
                if problem != "missing":
                    print(f"recomputing {shard}: {problem}", file=sys.stderr)
            if problems:
                todo.append((s, e))
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
        dirs = list(self.dirs.values())
        with store.claim_shard(dirs, start, end, wait) as claimed:
            if not claimed:
                return False
            if not self.shard_problems(start, end, None):  # another process wrote it meanwhile
                progress.update(end - start)
            else:
                self.write_shard(start, end, progress)
        return True

    def write_shard(self, start: int, end: int, progress) -> None:
        kept, skipped = self.tokenization.examples(self.rows, self.first_row, start, end)
        progress.update(len(skipped))
        fresh = {}
        for i, (name, pairs) in enumerate(self.payloads(kept, progress).items()):
            target = self.targets[name]
            record, vectors = self.describe(target, pairs, skipped, first=i == 0)
            index = [e["index"] for e in record.examples]
            for spec in target.specs:
                tensors = store.shard_tensors(
                    vectors[spec], index, self.dtype(spec), target.width(spec)
                )
                entry = store.write_shard(
                    self.dirs[name, spec], start, end, tensors, record, self.shard_run(name, spec)
                )
                fresh[name, spec] = {entry["file"]: entry}
        self.merge_all(fresh)
        self.stats["shards_written"] += 1

    def dtype(self, spec) -> torch.dtype:
        """Projections are stored in fp32; exact vectors in the chosen --save_dtype."""
        return SAVE_DTYPES[self.cfg.save_dtype] if spec.is_full else torch.float32

    def describe(self, target: Target, pairs, skipped, first: bool) -> tuple:
        """The shard record of one target (examples with a zero norm are skipped) and the
        vectors of its kept examples. Statistics and warnings come from the first target."""
        record, kept, zero = store.ShardRecord(), [], []
        for ex, payload in pairs:
            norm = target.norm(payload)
            if norm == 0.0:
                zero.append(
                    {"index": ex.index, "id": ex.id, "tokens": ex.length, "reason": "zero gradient"}
                )
                continue
            kept.append(payload)
            record.examples.append(
                {
                    "index": ex.index,
                    "id": ex.id,
                    "tokens": ex.length,
                    "label_tokens": data.label_positions(ex, self.cfg.paradigm),
                    "grad_norm": norm,
                }
            )
        record.skipped = sorted(skipped + zero, key=lambda s: s["index"])
        if first:
            self.stats["examples"] += len(kept)
            self.stats["skipped"] += len(record.skipped)
            self.stats["tokens"] += sum(ex.length for ex, _ in pairs)
        for s in record.skipped if first else zero:
            tqdm.write(f"warning: skipped example {s['id']!r}: {s['reason']}", file=sys.stderr)
        return record, target.shard_vectors(kept)

    def merge_all(self, fresh: dict) -> None:
        n = len(self.rows)
        for (name, spec), path in self.dirs.items():
            store.merge_manifest(
                path,
                self.header_for(name, spec),
                n,
                self.header["shard_size"],
                fresh.get((name, spec), {}),
            )

    def run_mean(self) -> int:
        """store_mean: one vector per output, the mean over every example with a gradient."""
        began = time.time()
        n = len(self.rows)
        for path in self.dirs.values():
            store.remove_leftovers(path)
        progress = tqdm(total=n, unit="ex", desc="gradients")
        kept, skipped = self.tokenization.examples(self.rows, self.first_row, 0, n)
        progress.update(len(skipped))
        fresh = {}
        payloads = self.payloads(kept, progress)
        progress.close()
        for i, (name, pairs) in enumerate(payloads.items()):
            target = self.targets[name]
            record, vectors = self.describe(target, pairs, skipped, first=i == 0)
            mean_record = store.ShardRecord(
                [{"index": 0, "id": "mean", "tokens": 0, "label_tokens": 0, "grad_norm": 0.0,
                  "count": len(record.examples)}],
                record.skipped,
            )  # fmt: skip
            for spec in target.specs:
                tensors = store.mean_tensors(vectors[spec], self.dtype(spec))
                mean_record.examples[0]["grad_norm"] = store.stored_norm(tensors)
                entry = store.write_shard(
                    self.dirs[name, spec], 0, n, tensors, mean_record, self.shard_run(name, spec)
                )
                fresh[name, spec] = {entry["file"]: entry}
        self.merge_all(fresh)
        self.print_summary(began, 0, n, 0)
        return 0

    def print_summary(self, began, start, end, resumed) -> None:
        seconds = time.time() - began
        s = self.stats
        rate = s["examples"] / seconds if seconds > 0 else 0.0
        print(
            f"done: examples {start}..{end}: {s['examples']} gradients, {s['skipped']} skipped, "
            f"{s['tokens']} tokens, {resumed} shard(s) already present, {seconds:.1f} s, "
            f"{rate:.2f} examples/s\noutput: " + ", ".join(str(p) for p in self.dirs.values())
        )


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
