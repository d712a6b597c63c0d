"""`gradproj retrain`: the counterfactual ground truth of influence (docs/lds.md).

Fine-tune a model on M random subsets of the train examples and record every test example's
mean loss after each, with the base model's losses. `gradproj.analysis.lds` correlates these
with attribution scores (the linear datamodeling score).

What trains, and why: only the last `train_layers` decoder layers, with AdamW. The frozen prefix
(embeddings and the first layers) is then the same for every subset, so the hidden states that
enter the first trained layer are computed once per example and cached; each subset runs only
the trained layers. The final norm and the LM head stay frozen (SmolLM2 ties the head to the
embeddings), and logits are computed only at label positions, the costliest product otherwise.
The loss is the extraction's: each example's mean token loss over its labels (sft: assistant
turns), the same tokenization and max_seq_length; a batch's loss is the mean over its examples.

Determinism: subset s's membership and training order come from numpy's generator seeded with
(seed, s) alone, so a subset's result does not depend on which subsets ran before it. Each
subset's result is written atomically as it finishes, into `<output>.parts/`; a killed run
continues from there, and the finished file is assembled once every subset is done. The parts
record the settings and the examples (ids and a hash of each tokenized example) they were
computed on, and a run over other settings or other data is refused, never mixed in.

Sharing: processes on one output hold a shared flock on `.<output>.lock` while they work and
split the subsets by claims (flocks in `<output>.parts/.locks/`); each then waits for the
output's lock alone, and the first to get it assembles the file (the others find it done).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from gradproj import data, fsio, truth
from gradproj.errors import UserError
from gradproj.gradients import pad_batch, per_example_mean_loss
from gradproj.options import option

PARTS_SUFFIX = ".parts"
SETTINGS_FILE = "settings.json"
BASE_PART = "base.safetensors"
PREFIX_PART = "prefix_states.safetensors"
CLAIMS = ".locks"  # in the parts directory: one lock file per part being computed
CAUSAL_PARADIGMS = ("sft", "pre")
EVAL_BATCH = 8  # test examples per evaluation batch; the losses do not depend on it otherwise
# The cached-prefix loss against the full model's: fp32 results of the same operations differ by
# about 3e-7 relative (measured on the tiny test model and SmolLM2-135M); a model whose layers do
# not take the cached states as they are (an input scaling, a logit scaling) differs by far more.
PREFIX_RTOL = 1e-5


@dataclass
class RetrainConfig:
    """Options of `gradproj retrain`, checked on construction."""

    model: str = option(help="hub id, local directory, or bundled:<name>")
    train_dataset: str = option(
        help="the train examples (.json/.jsonl/.parquet, a directory, a hub id)",
    )
    test_dataset: str = option(help="the test examples whose losses are recorded")
    output: Path = option(
        help=(
            "the ground-truth file to write (.safetensors); a rerun resumes it, and processes "
            "given the same output share the work"
        ),
    )
    checkpoint_nr: int = option(0, "index into the model's checkpoints")
    train_split: str = option("train", "split or slice of the train examples")
    test_split: str = option("train", "split or slice of the test examples")
    paradigm: Literal[CAUSAL_PARADIGMS] = option("sft", "loss: sft (assistant turns) or pre")
    max_seq_length: int = option(256, "truncate each example to this many tokens")
    n_subsets: int = option(32, "number of random train subsets M")
    fraction: float = option(0.5, "fraction of the train examples in each subset")
    seed: int = option(0, "seed of the subsets and their training order")
    train_layers: int = option(2, "how many of the last decoder layers are fine-tuned")
    epochs: int = option(1, "epochs over each subset")
    lr: float = option(2e-4, "AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    batch_size: int = option(8, "examples per optimizer step")
    threads: int = option(2, "torch CPU threads")

    def __post_init__(self):
        self.output = Path(self.output)
        checks = [
            (self.paradigm in CAUSAL_PARADIGMS, f"--paradigm must be one of {CAUSAL_PARADIGMS}"),
            (self.n_subsets >= 2, "--n_subsets must be at least 2 (LDS correlates across them)"),
            (0 < self.fraction < 1, "--fraction must lie strictly between 0 and 1"),
            (self.train_layers >= 1, "--train_layers must be at least 1"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "--lr must be a finite number above 0"),
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                "--weight_decay must be a finite number >= 0",
            ),
            (self.seed >= 0, "--seed must be >= 0 (numpy's generators take no negative seed)"),
            (self.batch_size >= 1, "--batch_size must be at least 1"),
            (self.max_seq_length >= 2, "--max_seq_length must be at least 2"),
            (self.threads >= 1, "--threads must be at least 1"),
            (self.checkpoint_nr >= 0, "--checkpoint_nr must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.output.suffix != ".safetensors":
            raise UserError(f"--output {self.output}: name a .safetensors file")
        fsio.check_output(self.output, "--output")
        folder = next(p for p in self.output.absolute().parents if p.exists())
        if not folder.is_dir():  # its lock and parts go beside it
            raise UserError(f"--output {self.output}: {folder} is not a directory")
        return self

    def check_train_size(self, n_train: int) -> None:
        """What construction cannot check before the train examples are read: subsets that
        differ. `subset_plan` draws `subset_size` examples; all of them would be one subset."""
        if subset_size(n_train, self.fraction) == n_train:
            raise UserError(
                f"--fraction {self.fraction:g} of {n_train} train example(s) rounds to all of "
                "them: every subset would be the whole train set, and LDS needs subsets that "
                "differ; choose a smaller --fraction (or more train examples)"
            )

    def settings(self) -> dict:
        """What determines the result (not where it goes, nor the thread count)."""
        chosen = dataclasses.asdict(self)
        for name in ("output", "threads"):
            chosen.pop(name)
        return chosen


# --- Subsets ---


def subset_generator(seed: int, subset: int) -> np.random.Generator:
    return np.random.default_rng([seed, subset])


def subset_size(n_train: int, fraction: float) -> int:
    return max(1, round(fraction * n_train))


def subset_plan(seed: int, subset: int, n_train: int, fraction: float, epochs: int):
    """Subset `subset`'s membership mask and its training order (positions), one per epoch."""
    rng = subset_generator(seed, subset)
    members = np.sort(rng.choice(n_train, size=subset_size(n_train, fraction), replace=False))
    mask = np.zeros(n_train, dtype=np.uint8)
    mask[members] = 1
    return mask, [rng.permutation(members) for _ in range(epochs)]


def part_name(subset: int) -> str:
    return f"subset_{subset:05d}.safetensors"


# --- The model split into a frozen prefix (run once) and trained layers ---


class StopForward(Exception):
    """Raised by the caching hook: nothing after the first trained layer's input is needed."""


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(
            f"{type(model).__name__}: gradproj retrain needs a decoder with a list of layers "
            "(model.model.layers, as Llama, Mistral, Qwen2 and OLMo-2 have)"
        )
    return layers


def cache_prefix_states(model, examples: list[data.Example], first: int) -> list[torch.Tensor]:
    """The hidden states entering decoder layer `first`, `[length, hidden]` per example, each
    computed alone (no padding), stopping the forward there."""
    states: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states.append(hidden[0].detach().clone())
        raise StopForward

    handle = decoder_layers(model)[first].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            for ex in tqdm(examples, desc="frozen prefix", unit="ex", leave=False):
                try:
                    model(input_ids=torch.tensor([ex.input_ids]), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return states


def claim(parts: Path, part: str, wait: bool = True):
    """This process's claim on computing one part (a `fsio.file_lock` in `parts/.locks/`):
    processes sharing the parts split the subsets, and wait for the prefix states and the base
    losses rather than repeat them."""
    return fsio.file_lock(parts / CLAIMS / f"{part}.lock", wait=wait)


def cached_prefix_states(model, train, test, first: int, parts: Path, record: dict):
    """`cache_prefix_states` of the train and test examples, kept in the parts directory (with
    the examples' record, `examples_record`) so that a resumed run does not recompute them."""
    path = parts / PREFIX_PART
    with claim(parts, PREFIX_PART):
        if not path.is_file():
            states = [cache_prefix_states(model, examples, first) for examples in (train, test)]
            tensors = {f"{side}/{i}": state for side, group in zip(("train", "test"), states,
                                                                   strict=True)
                       for i, state in enumerate(group)}  # fmt: skip
            fsio.write_safetensors(tensors, path, {"format": truth.TRUTH_FORMAT, **record})
            return states
    with safe_open(str(path), "pt") as f:
        difference = truth.data_difference(fsio.read_metadata(f), record)
        if difference:
            raise UserError(
                f"{path} holds the prefix states of other examples ({difference}); remove "
                f"{parts} and rerun"
            )
        return [[f.get_tensor(f"{side}/{i}") for i in range(len(examples))]
                for side, examples in (("train", train), ("test", test))]  # fmt: skip


def keep_trained_layers(model, first: int) -> list[torch.nn.Parameter]:
    """Leave only layers `first`.. in the model (their input comes from the cache) and make
    their parameters, and only theirs, trainable."""
    base = model.base_model
    base.layers = torch.nn.ModuleList(list(base.layers)[first:])
    model.requires_grad_(False)
    base.layers.requires_grad_(True)
    return list(base.layers.parameters())


def batch_losses(model, states: list[torch.Tensor], batch: list[data.Example]) -> torch.Tensor:
    """`[B]` mean token loss per example, from cached states; logits only at label positions."""
    longest = max(ex.length for ex in batch)
    hidden = torch.zeros(len(batch), longest, states[0].shape[-1], dtype=states[0].dtype)
    for row, state in enumerate(states):
        hidden[row, : state.shape[0]] = state
    _, mask, labels = pad_batch(batch, 0, "cpu")
    last = model.base_model(inputs_embeds=hidden, attention_mask=mask, use_cache=False)
    targets = labels[:, 1:]  # position t predicts token t+1
    chosen = targets != data.IGNORE
    logits = model.get_output_embeddings()(last.last_hidden_state[:, :-1][chosen])
    token_loss = torch.nn.functional.cross_entropy(
        logits.float(), targets[chosen], reduction="none"
    )
    rows = chosen.nonzero()[:, 0]
    sums = torch.zeros(len(batch), dtype=token_loss.dtype).index_add(0, rows, token_loss)
    return sums / chosen.sum(dim=1).clamp(min=1)


def evaluate(model, states: list[torch.Tensor], examples: list[data.Example]) -> torch.Tensor:
    """Every example's mean loss, fp32 `[n]`, in the given order."""
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), EVAL_BATCH):
            out.append(
                batch_losses(model, states[i : i + EVAL_BATCH], examples[i : i + EVAL_BATCH])
            )
    return torch.cat(out).float()


def full_loss(model, example: data.Example) -> float:
    """The example's mean loss from the whole model, as extraction computes it."""
    ids, _, labels = pad_batch([example], 0, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return float(per_example_mean_loss(logits, labels, causal=True))


def check_prefix_scheme(model, state: torch.Tensor, example: data.Example, full: float) -> None:
    """The trained layers fed from the cached state (`keep_trained_layers` done) give the whole
    model's loss, `full`: else the model does something between its layers that the cache skips
    (e.g. scales the input embeddings, as Granite does), and every loss would be wrong."""
    cached = float(evaluate(model, [state], [example]))
    if not math.isclose(cached, full, rel_tol=PREFIX_RTOL):
        raise UserError(
            f"{type(model).__name__} does not fit gradproj retrain's cached frozen prefix: test "
            f"example {example.id!r} has a loss of {full:.7g} from the whole model but "
            f"{cached:.7g} from its cached hidden states through the trained layers (the model "
            "changes the hidden states outside its layers, e.g. scales the input embeddings); "
            "retrain needs a decoder that passes them on unchanged, as Llama, Mistral, Qwen2 "
            "and OLMo-2 do"
        )


def check_finite_losses(
    losses: torch.Tensor, test: list[data.Example], when: str, advice: str
) -> None:
    """Refuse to record a loss that is not finite (a diverged training), naming its example."""
    bad = (~torch.isfinite(losses)).nonzero()[:, 0].tolist()
    if bad:
        raise UserError(
            f"{when}, test example {test[bad[0]].id!r} has a loss of {losses[bad[0]].item()} "
            f"({len(bad)} of {len(test)} test losses are not finite); {advice}"
        )


def train_subset(model, params, states, examples, order: list[np.ndarray], cfg: RetrainConfig):
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for epoch_order in order:
        for i in range(0, len(epoch_order), cfg.batch_size):
            chosen = [int(k) for k in epoch_order[i : i + cfg.batch_size]]
            loss = batch_losses(model, [states[k] for k in chosen], [examples[k] for k in chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            optimizer.step()


# --- The command ---


def read_examples(cfg: RetrainConfig, tokenizer, dataset: str, split: str):
    """Tokenized examples of a split (as the extraction tokenizes them), and the file's records
    of those skipped for having no label token."""
    rows, first_row = data.load_rows(dataset, split)
    tokenization = data.Tokenization(tokenizer, cfg.paradigm, cfg.max_seq_length)
    kept, skipped = tokenization.split(rows, first_row, f"{dataset} {split}")
    if not kept:
        raise UserError(f"{dataset} {split}: no example has a label token within max_seq_length")
    return kept, [truth.skipped_record(s) for s in skipped]


def training_description(cfg: RetrainConfig, n_layers: int) -> str:
    first = n_layers - cfg.train_layers
    return (
        f"last {cfg.train_layers} of {n_layers} decoder layers (layers {first}..{n_layers - 1}) "
        f"trained with AdamW (lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, batch "
        f"{cfg.batch_size}, {cfg.epochs} epoch(s)); embeddings, earlier layers, final norm and "
        "LM head frozen; the frozen prefix's output is cached once per example"
    )


def join_parts(parts: Path, settings: dict, record: dict) -> None:
    """Make the parts directory of a run with these settings and examples, or join the one that
    a killed or a concurrent run of the same made (else an error: its parts are another run's)."""
    if not parts.exists():
        make_parts(parts, settings | {"examples": record})
    try:
        before = json.loads((parts / SETTINGS_FILE).read_text())
        examples = dict(before.pop("examples", {}))
    except (OSError, ValueError, TypeError, AttributeError):
        raise UserError(
            f"{parts} has no readable {SETTINGS_FILE}, so nothing says which run its parts "
            "belong to (a crash of an older gradproj leaves such a directory); remove it and rerun"
        ) from None
    if before != settings:
        differ = sorted(
            k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k)
        )
        raise UserError(
            f"{parts} holds the parts of a run with other settings (differing in "
            f"{', '.join(differ)}); remove it, or choose another --output"
        )
    difference = truth.data_difference(examples, record)
    if difference:
        raise UserError(
            f"{parts} holds the parts of a run on other examples ({difference}); remove it to "
            "start over, or restore the data it was computed on"
        )


def make_parts(parts: Path, settings: dict) -> None:
    """A new parts directory, made whole by one rename: whoever finds it finds its settings."""
    fsio.create_dir(parts, lambda new: fsio.atomic_write_json(new / SETTINGS_FILE, settings))


def finished(cfg: RetrainConfig, record: dict) -> bool:
    """True (and says so) when the output is a finished ground truth of these settings and
    examples; an output of others is an error."""
    if not cfg.output.exists():
        return False
    written = truth.load_ground_truth(cfg.output)
    if written.info.get("settings") != cfg.settings():
        raise UserError(
            f"{cfg.output} exists and was written with other settings; remove it or choose "
            "another --output"
        )
    difference = truth.data_difference(written.info, record)
    if difference:
        raise UserError(
            f"{cfg.output} exists and was computed on other examples ({difference}); remove it "
            "or choose another --output"
        )
    print(f"complete already, nothing to do: {cfg.output}", file=sys.stderr)
    return True


def retrain(cfg: RetrainConfig) -> Path:
    """Write the ground truth for `cfg` (resuming from its parts); returns its path. Runs with
    `cfg.threads` torch threads and gives the caller back its own count (the thread count
    changes the last bits of every later computation in the process)."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.threads)
        return _retrain(cfg)
    finally:
        torch.set_num_threads(previous)


def _retrain(cfg: RetrainConfig) -> Path:
    from gradproj import models

    checkpoint = models.resolve_checkpoint(cfg.model, cfg.checkpoint_nr)
    tokenizer = models.load_tokenizer(checkpoint)
    train, train_skipped = read_examples(cfg, tokenizer, cfg.train_dataset, cfg.train_split)
    test, test_skipped = read_examples(cfg, tokenizer, cfg.test_dataset, cfg.test_split)
    cfg.check_train_size(len(train))
    record = truth.examples_record(train, test)
    if finished(cfg, record):  # before any lock: a finished file is only read
        return cfg.output
    model = models.load_model(checkpoint, cfg.paradigm, torch.float32, "cpu")
    n_layers = len(decoder_layers(model))
    if cfg.train_layers > n_layers:
        raise UserError(f"--train_layers {cfg.train_layers}: the model has {n_layers} layers")
    description = training_description(cfg, n_layers)
    info = {
        **record,
        "train_skipped": train_skipped,
        "test_skipped": test_skipped,
        "checkpoint": checkpoint.name,
        "n_layers": n_layers,
        "trained": description,
        "subset_seeds": [[cfg.seed, s] for s in range(cfg.n_subsets)],
        "settings": cfg.settings(),
        "threads": cfg.threads,  # fp32 sums may round differently with another thread count
        "versions": models.versions("torch", "transformers"),
    }
    began = time.time()
    lock = cfg.output.with_name(f".{cfg.output.name}.lock")
    with fsio.file_lock(lock, shared=True):  # shared by the processes working on the output
        if finished(cfg, record):  # assembled meanwhile
            return cfg.output
        compute_parts(cfg, model, train, test, record, description)
    with fsio.file_lock(lock):  # once no process works on the parts: they are complete
        if finished(cfg, record):  # another process sharing the parts assembled them
            return cfg.output
        assemble(parts_dir(cfg.output), cfg.output, cfg.n_subsets, info)
    print(
        f"ground truth of {cfg.n_subsets} subsets written to {cfg.output} "
        f"({time.time() - began:.0f} s in this call)",
        file=sys.stderr,
    )
    return cfg.output


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + PARTS_SUFFIX)


def compute_parts(cfg: RetrainConfig, model, train, test, record: dict, description: str) -> None:
    """Every part of the output not written yet (under the output's shared lock)."""
    parts = parts_dir(cfg.output)
    # Subset s depends on (seed, s) alone: parts of a run with another n_subsets are reused.
    settings = {k: v for k, v in cfg.settings().items() if k != "n_subsets"}
    join_parts(parts, settings, record)
    print(f"retrain: {description}", file=sys.stderr)
    todo = [s for s in range(cfg.n_subsets) if not (parts / part_name(s)).is_file()]
    if todo or not (parts / BASE_PART).is_file():
        run_subsets(cfg, model, train, test, parts, record, todo)


def run_subsets(
    cfg: RetrainConfig, model, train, test, parts: Path, record: dict, todo: list[int]
) -> None:
    """The base losses (unless written) and every subset in `todo`, each written as it ends.
    Processes sharing the parts directory split the subsets: each computes those it can claim,
    then waits for those that another holds (and computes any whose holder died)."""
    first = len(decoder_layers(model)) - cfg.train_layers
    began = time.time()
    train_states, test_states = cached_prefix_states(model, train, test, first, parts, record)
    full = full_loss(model, test[0])
    params = keep_trained_layers(model, first)
    check_prefix_scheme(model, test_states[0], test[0], full)
    initial = {k: v.clone() for k, v in model.base_model.layers.state_dict().items()}
    with claim(parts, BASE_PART):
        if not (parts / BASE_PART).is_file():
            base = evaluate(model, test_states, test)
            check_finite_losses(
                base, test, "before fine-tuning", "the model gives it no finite loss"
            )
            fsio.write_safetensors(
                {"losses": base}, parts / BASE_PART, {"format": truth.TRUTH_FORMAT}
            )
    print(f"frozen prefix cached in {time.time() - began:.0f} s", file=sys.stderr)
    progress = tqdm(
        total=cfg.n_subsets, initial=cfg.n_subsets - len(todo), desc="subsets", unit="subset"
    )

    def run(s: int, wait: bool) -> bool:
        """Subset s, unless another process holds it (False) or it is written."""
        with claim(parts, part_name(s), wait) as claimed:
            if claimed and not (parts / part_name(s)).is_file():
                t0 = time.time()
                mask, order = subset_plan(cfg.seed, s, len(train), cfg.fraction, cfg.epochs)
                model.base_model.layers.load_state_dict(initial)
                train_subset(model, params, train_states, train, order, cfg)
                losses = evaluate(model, test_states, test)
                diverged = f"the training diverged; lower --lr (now {cfg.lr:g})"
                check_finite_losses(losses, test, f"after fine-tuning on subset {s}", diverged)
                tensors = {"mask": torch.from_numpy(mask), "losses": losses}
                fsio.write_safetensors(
                    tensors, parts / part_name(s), {"format": truth.TRUTH_FORMAT}
                )
                progress.set_postfix(s_per_subset=f"{time.time() - t0:.0f}")
            progress.update(int(claimed))
        return claimed

    with progress:  # closed on an error too, so that the error starts its own line
        held = [s for s in todo if not run(s, wait=False)]
        for s in held:
            run(s, wait=True)


def assemble(parts: Path, output: Path, n_subsets: int, info: dict) -> None:
    """The one file from the parts (under the output's exclusive lock); the parts, and any
    parts directory that a killed process left half made, are removed once it is in place."""
    masks, losses = [], []
    for s in range(n_subsets):
        with safe_open(str(parts / part_name(s)), "pt") as f:
            masks.append(f.get_tensor("mask"))
            losses.append(f.get_tensor("losses"))
    with safe_open(str(parts / BASE_PART), "pt") as f:
        base = f.get_tensor("losses")
    truth.write_ground_truth(output, masks, losses, base, info)
    for leftover in [parts, *parts.parent.glob(f".{parts.name}.new-*")]:
        shutil.rmtree(leftover)
