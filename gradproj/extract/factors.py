"""kfac's factor pass: the model read once more over a train run's examples, for the Kronecker
factors that `gradproj score --precondition kfac` whitens by.

The run's stored vectors do not hold the factors (the covariances of each module's projected
output gradients and inputs over every token), so they come from the extraction stage, the one
that loads the model; `gradproj.curvature` keeps their file and the whitening, and scoring reads
stored vectors only. The examples are tokenized and batched as the run's extraction did (the
options its manifest records), and each must be the one the run recorded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from gradproj import curvature, data, fsio, gradients, models, store
from gradproj.errors import UserError
from gradproj.targets.params import Layer, layer_projection


def ensure_kfac_factors(run: store.Run, path: str | None, device: str) -> None:
    """Before a scoring preconditioned by kfac: the train run's factors, computed and stored
    at `path` (None: the run's own file) unless a current file is there."""
    path = Path(path or curvature.default_path(run.path, "kfac"))
    if not curvature.stored(path):
        write_kfac_factors(run, path, device)


def write_kfac_factors(run: store.Run, path: Path, device: str) -> None:
    """Compute the run's kfac factors and store them at `path` (docs/formats.md, "Curvature
    file"); every check that can fail is made before the model loads."""
    curvature.check_supported(run)
    fsio.check_output(path, "--curvature")
    curvature.check_file_writable(path)
    curvature.save(compute_kfac(run, device), path)


def compute_kfac(run: store.Run, device: str) -> curvature.Curvature:
    """Each module's Kronecker factors in the projected space, eigendecomposed:
    `S_out = E_t[(A^T delta_t)(A^T delta_t)^T]` and `S_in = E_t[(B^T x_t)(B^T x_t)^T]` over every
    token of the run's examples (x a layer's input, delta the gradient of the example's loss at
    its output, A and B the run's own projection factors)."""
    k_out, k_in = curvature.kronecker_dims(run)
    options = run.extraction_options(
        "--precondition kfac",
        "give the run's kfac file computed before (--curvature), restore the extraction's "
        "manifest, or use --precondition gram",
    )
    sums, tokens = factor_sums(run, options, device, k_out, k_in)
    return curvature.kfac_factorization(run, sums, tokens)


def factor_sums(run: store.Run, options: dict, device: str, k_out: int, k_in: int):
    """Each module's sums of `[k_out, k_out]` and `[k_in, k_in]` outer products over the run's
    tokens (fp64, padding left out), and the token count."""
    checkpoint = models.resolve_checkpoint(options["model"], options["checkpoint_nr"])
    tokenizer = models.load_tokenizer(checkpoint)
    examples = run_examples(run, tokenizer, options)  # checked before the model loads
    dtype = models.resolve_dtype(options["dtype"], device)
    model = models.load_model(checkpoint, options["paradigm"], dtype, device)
    named = dict(model.named_modules())
    modules = [(m["name"], named[m["name"]]) for m in run.manifest.modules]
    seed, dim = run.manifest.projection["seed"], run.manifest.projection["dim"]
    factors = [
        layer_projection(seed, Layer(name, *module.weight.shape, 0), [dim], device).widest_factors()
        for name, module in modules
    ]
    position = {name: i for i, (name, _) in enumerate(modules)}
    count = len(modules)
    sums = {
        "out": torch.zeros(count, k_out, k_out, dtype=curvature.COMPUTE, device=device),
        "in": torch.zeros(count, k_in, k_in, dtype=curvature.COMPUTE, device=device),
    }
    valid = {}

    def add(side: str, name: str, projected: torch.Tensor) -> None:
        rows = projected[valid["mask"]].to(curvature.COMPUTE)  # the examples' own tokens
        sums[side][position[name]] += rows.T @ rows

    def on_input(name, x):
        add("in", name, x.float() @ factors[position[name]][1])

    def on_output_grad(name, delta):
        add("out", name, delta.float() @ factors[position[name]][0])

    tokens = 0
    causal, pad_id = options["paradigm"] != "mlm", tokenizer.pad_token_id or 0
    progress = tqdm(total=len(examples), desc="kfac factors", unit="ex")
    with gradients.LinearTaps(modules, on_input, on_output_grad), progress:
        for batch in data.batches_by_tokens(examples, options["batch_tokens"]):
            lengths = torch.tensor([ex.length for ex in batch], device=device)
            longest = int(lengths.max())
            valid["mask"] = torch.arange(longest, device=device)[None, :] < lengths[:, None]
            gradients.embedding_gradients(model, batch, causal, pad_id)
            tokens += int(lengths.sum())
            progress.update(len(batch))
    return sums, tokens


def run_examples(run: store.Run, tokenizer, options: dict) -> list[data.Example]:
    """The run's examples, tokenized as its extraction tokenized them. Each must have the id,
    token count and loss-token count the run recorded: the run holds no hash of its examples'
    text, so an edit that keeps every count is not seen."""
    dataset, paradigm = options["dataset"], options["paradigm"]
    advice = "restore the extraction's dataset or re-extract the run"
    rows = run.dataset_rows(dataset, advice)
    # invalid rows come back as None: a row the run read and cannot now is a changed dataset
    tokenization = data.Tokenization(
        tokenizer, paradigm, options["max_seq_length"], str(options["checkpoint_nr"]), True
    )
    examples = []
    for entry, row in zip(run.manifest.examples, rows, strict=True):
        ex, problem = tokenization.example(row, entry["index"])
        if ex is None:
            raise UserError(
                f"row {entry['index']} of {dataset} is an {problem}, but the run's extraction "
                f"read it: the dataset changed since, and kfac reads it again; {advice}"
            )
        now = (ex.id, ex.length, data.label_positions(ex, paradigm))
        then = (entry["id"], entry["tokens"], entry["label_tokens"])
        if now != then:
            raise UserError(
                f"row {entry['index']} of {dataset} is {example_summary(*now)}, but the run's "
                f"extraction read {example_summary(*then)} there: the dataset changed since, "
                f"and kfac reads it again; {advice}"
            )
        examples.append(ex)
    return examples


def example_summary(example_id: str, tokens: int, label_tokens: int) -> str:
    return f"{example_id!r} of {tokens} tokens ({label_tokens} in the loss)"
