"""CUDA against CPU on the same matrices: the gradients, projections and scores computed on a
GPU are the CPU's up to fp32 rounding (bench/gpu_all.sh runs these with `-m gpu`). Each test
also runs on the CPU, against an independent reference (fp64 gradients, another batch size,
brute-force fp64 scores), so the comparison itself is checked without a GPU."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gradproj import data, models, scoredir
from gradproj.cli import extract_main, score_main
from gradproj.gradients import embedding_gradients
from gradproj.store import Run

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.cpu().double(), reference.cpu().double()
    return float((ours - reference).norm() / reference.norm())


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_gradients_match_an_fp64_cpu_reference(device, tiny_llama, sft_file):
    checkpoint = models.Checkpoint(str(tiny_llama), None, "tiny")
    tokenizer = models.load_tokenizer(checkpoint)
    rows = [json.loads(line) for line in sft_file.read_text().splitlines()]
    examples = [data.tokenize(tokenizer, row, i, "sft", 64) for i, row in enumerate(rows)]
    examples = [e for e in examples if data.label_positions(e, "sft")]
    reference_model = models.load_model(checkpoint, "sft", torch.float64, "cpu")
    model = models.load_model(checkpoint, "sft", torch.float32, device)
    pad = tokenizer.pad_token_id
    for batch in data.batches_by_tokens(examples, 256):
        reference = embedding_gradients(reference_model, batch, True, pad)
        ours = embedding_gradients(model, batch, True, pad)
        for r, o in zip(reference, ours, strict=True):
            assert o.device.type == device
            assert relative_error(o, r) < 1e-5


def extract(model, dataset, out, device, batch_tokens) -> None:
    argv = [str(model), str(dataset), "0", "--gradients_output_path", str(out),
            "--device", device, "--dtype", "fp32", "--batch_tokens", str(batch_tokens),
            "--max_seq_length", "64", "--target", "embeddings,params",
            "--random_projection", "--proj_dim", "full,64"]  # fmt: skip
    assert extract_main(argv) == 0


def runs(root) -> dict[str, Run]:
    """{variant folder (full, rademacher_64, params_kronecker_...): run} of one extraction."""
    found = {}
    for manifest in root.rglob("manifest.json"):
        variant = manifest.relative_to(root).parts[0]
        found[variant] = Run(manifest.parent)
    return found


@pytest.mark.parametrize("device", DEVICES)
def test_extraction_matches_a_cpu_run(device, tiny_llama, sft_file, tmp_path):
    """Full and projected embedding gradients and kronecker parameter gradients of one pass on
    `device` against a CPU pass with another batch size (so the CPU variant checks batching)."""
    extract(tiny_llama, sft_file, tmp_path / "ref", "cpu", 64)
    extract(tiny_llama, sft_file, tmp_path / "dev", device, 1024)
    reference, ours = runs(tmp_path / "ref"), runs(tmp_path / "dev")
    assert reference.keys() == ours.keys() and len(reference) == 3
    for variant, run in reference.items():
        if run.kind == "full":
            for i in range(len(run.ids)):
                assert relative_error(ours[variant].dense_vector(i), run.dense_vector(i)) < 1e-5
        else:
            ids, matrix = run.load_matrix()
            their_ids, theirs = ours[variant].load_matrix()
            assert ids == their_ids
            for o, r in zip(theirs, matrix, strict=True):
                assert relative_error(o, r) < 1e-5, variant


@pytest.mark.parametrize("device", DEVICES)
def test_scores_match_brute_force_fp64(device, tiny_llama, sft_file, tmp_path):
    extract(tiny_llama, sft_file, tmp_path / "run", "cpu", 1024)
    run = runs(tmp_path / "run")["rademacher_64"]
    out = tmp_path / "scores"
    argv = ["--train", str(run.path), "--test", str(run.path), "--output", str(out),
            "--func", "both", "--device", device, "--precision", "fp64"]  # fmt: skip
    assert score_main(argv) == 0
    scores = load_file(str(out / scoredir.SCORES_FILE))
    _, matrix = run.load_matrix()
    matrix = matrix.double()
    unit = matrix / matrix.norm(dim=1, keepdim=True)
    expected = {"dot": matrix @ matrix.T, "cosine": unit @ unit.T}
    for name, reference in expected.items():
        difference = (scores[name].double() - reference).abs().max()
        assert difference <= 1e-12 * reference.abs().max(), name
