"""--target params: hook-based per-example weight gradients and their projections on a tiny
Llama, checked against torch.func per-sample gradients (vmap of grad)."""

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradproj import data, store
from gradproj.cli import extract_main as main
from gradproj.gradients import (
    embedding_gradients,
    kronecker_projected,
    linear_layers_captured,
    linear_modules,
)
from gradproj.projection import FULL, OutputSpec, make_projection
from gradproj.targets import ParamsTarget, run_batch
from tests.conftest import conversations, user_error_line

MAX_LEN = 40
MLP = ["*.mlp.*"]


@pytest.fixture(scope="module")
def setup(tiny_llama):
    """Model, pad id and 8 examples of different lengths (so every batch is padded)."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data.ensure_chat_template(tokenizer)
    rows = conversations(9, long_every=5)
    examples = [data.tokenize(tokenizer, r, i, "sft", MAX_LEN, "0") for i, r in enumerate(rows)]
    examples = [e for e in examples if data.label_positions(e, "sft") > 0][:8]
    assert len(examples) == 8 and len({e.length for e in examples}) > 3
    return model, tokenizer.pad_token_id, examples


def func_per_sample_grads(model, examples, names, pad_id) -> dict[str, torch.Tensor]:
    """{layer: [n, d_out, d_in]} by torch.func: vmap over examples of grad of HF's own loss."""
    longest = max(e.length for e in examples)
    pad = [longest - e.length for e in examples]
    ids = torch.tensor([e.input_ids + [pad_id] * p for e, p in zip(examples, pad, strict=True)])
    labels = torch.tensor(
        [e.labels + [data.IGNORE] * p for e, p in zip(examples, pad, strict=True)]
    )
    mask = torch.tensor([[1] * e.length + [0] * p for e, p in zip(examples, pad, strict=True)])
    weights = {f"{n}.weight": model.get_submodule(n).weight.detach() for n in names}

    def loss(params, i, m, y):
        kwargs = {"input_ids": i[None], "attention_mask": m[None], "labels": y[None]}
        return functional_call(model, params, args=(), kwargs=kwargs).loss

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(weights, ids, mask, labels)
    return {n: grads[f"{n}.weight"] for n in names}


def flat_reference(reference, names) -> torch.Tensor:
    return torch.cat([reference[n].flatten(1) for n in names], dim=1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def captured_pass(model, examples, pad_id, modules):
    """The chosen layers' inputs and output gradients, captured around one pass."""
    with linear_layers_captured(modules) as captured:
        embedding_gradients(model, examples, True, pad_id)
    return captured


def test_hook_gradients_equal_func_per_sample_gradients(setup):
    model, pad_id, examples = setup
    modules = linear_modules(model, None, include_lm_head=True)
    names = [n for n, _ in modules]
    reference = flat_reference(func_per_sample_grads(model, examples, names, pad_id), names)
    got = captured_pass(model, examples, pad_id, modules).weight_gradients(slice(None))
    for i in range(len(examples)):
        assert relative_error(got[i], reference[i]) < 1e-5


def test_padded_positions_have_zero_output_gradient(setup):
    model, pad_id, examples = setup
    modules = linear_modules(model, None, include_lm_head=True)
    captured = captured_pass(model, examples, pad_id, modules)
    for name, _ in modules:
        for row, ex in enumerate(examples):
            assert torch.all(captured.output_grads[name][row, ex.length :] == 0), name
            assert captured.output_grads[name][row, : ex.length].abs().max() > 0, name


def test_kronecker_hooks_equal_factors_applied_to_exact_gradient(setup):
    model, pad_id, examples = setup
    spec = OutputSpec("kronecker", "4x8")
    target = ParamsTarget(model, None, False, [spec], seed=3, device="cpu")
    names = [n for n, _ in target.modules]
    reference = func_per_sample_grads(model, examples, names, pad_id)
    with kronecker_projected(target.modules, target.factors) as got:
        embedding_gradients(model, examples, True, pad_id)
    for name in names:
        left, right = target.factors[name]
        want = left.T @ reference[name].double().float() @ right  # A^T G B, batched over examples
        assert relative_error(got[name], want) < 1e-5, name


@pytest.mark.parametrize("output", [OutputSpec("kronecker", "4x4"), FULL])
def test_batch_size_invariance(setup, output):
    model, pad_id, examples = setup
    target = ParamsTarget(model, MLP, False, [output], seed=0, device="cpu")

    def payloads(batch):
        return run_batch([target], model, batch, True, pad_id)[0]

    one = [payloads([ex])[0].vectors[output] for ex in examples]
    eight = [e.vectors[output] for e in payloads(examples)]
    for a, b in zip(one, eight, strict=True):
        assert relative_error(b, a) < 1e-5


@pytest.mark.slow
def test_kronecker_inner_products_are_unbiased_across_seeds(setup):
    model, pad_id, examples = setup
    names = [n for n, _ in linear_modules(model, MLP, False)]
    reference = func_per_sample_grads(model, examples[:2], names, pad_id)
    exact = flat_reference(reference, names).double()
    want = float(exact[0] @ exact[1])
    estimates = []
    for seed in range(400):
        target = ParamsTarget(model, MLP, False, [OutputSpec("kronecker", "4x4")], seed, "cpu")
        # A^T G B from the exact gradients (the hooks compute the same, as tested above)
        projected = {n: target.factors[n][0].T @ reference[n] @ target.factors[n][1] for n in names}
        a, b = target.kronecker_vectors(projected)[OutputSpec("kronecker", "4x4")].double()
        estimates.append(float(a @ b))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    standard_error = float(estimates.std() / math.sqrt(len(estimates)))
    assert standard_error < 0.1 * abs(want)  # so that the check below can tell a bias
    assert abs(float(estimates.mean()) - want) < 4 * standard_error


def test_dense_projection_is_the_projector_of_the_exact_gradient(setup):
    model, pad_id, examples = setup
    specs = [OutputSpec("rademacher", 64), OutputSpec("sjlt", 32)]
    target = ParamsTarget(model, MLP, False, specs, 5, "cpu")
    names = [n for n, _ in target.modules]
    exact = flat_reference(func_per_sample_grads(model, examples, names, pad_id), names)
    (got,) = run_batch([target], model, examples, True, pad_id)
    for spec in specs:
        projection = make_projection(spec.proj_type, [spec.k], 5, (1, exact.shape[1]))
        want = projection.project_batch([g[None] for g in exact])[spec.k]
        assert relative_error(torch.stack([e.vectors[spec] for e in got]), want) < 1e-5


def extract(model, dataset, out, *extra):
    argv = [str(model), str(dataset), "0", "--gradients_output_path", str(out),
            "--max_seq_length", str(MAX_LEN), "--gradients_per_file", "4", *extra]  # fmt: skip
    assert main(argv) == 0


def test_params_runs_record_layers_and_their_slices(tiny_llama, sft_file, tmp_path, setup):
    model, pad_id, _ = setup
    extract(tiny_llama, sft_file, tmp_path, "--target", "params", "--modules", "*.mlp.*",
            "--random_projection", "--proj_dim", "2x4", "--full")  # fmt: skip
    base = tmp_path / "{}" / tiny_llama.name / "sft" / "train" / "0"
    kron, full = (store.Run(str(base).format(v)) for v in ("params_kronecker_2x4", "params_full"))
    assert kron.kind == "projected" and full.kind == "params_full"
    layers = kron.manifest.modules
    assert [la["name"] for la in layers] == [n for n, _ in linear_modules(model, MLP, False)]
    assert [la["slice"] for la in layers] == [[8 * i, 8 * i + 8] for i in range(len(layers))]
    ids, vectors = full.load_matrix()
    assert ids == kron.ids and vectors.shape[1] == full.manifest.params_dim
    rows = data.load_split(str(sft_file), "train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data.ensure_chat_template(tokenizer)
    examples = [
        data.tokenize(tokenizer, rows[e["index"]], e["index"], "sft", MAX_LEN)
        for e in full.manifest.examples
    ]
    reference = func_per_sample_grads(model, examples, [la["name"] for la in layers], pad_id)
    for la in full.manifest.modules:
        start, end = la["slice"]
        assert relative_error(vectors[:, start:end], reference[la["name"]].flatten(1)) < 1e-5


def bad(argv, capsys) -> str:
    return user_error_line(main, argv, capsys)


def test_bad_params_options_get_one_line(tiny_llama, sft_file, tmp_path, capsys):
    m, d, out = str(tiny_llama), str(sft_file), ["--gradients_output_path", str(tmp_path)]
    cases = {
        "matches no linear layer": [m, d, "0", "--target", "params", "--modules", "*.conv*", *out],
        "--target params only": [m, d, "0", "--modules", "*.mlp.*", *out],
        "budget": [m, d, "0", "--target", "params", "--proj_type", "rademacher",
                   "--proj_dim", "64", "--proj_memory_gb", "0.0001", *out],
    }  # fmt: skip
    for needle, argv in cases.items():
        assert needle in bad(argv, capsys), needle


def test_scoring_accepts_params_runs_and_refuses_to_mix_targets(
    tiny_llama, sft_file, tmp_path, capsys
):
    from safetensors.torch import load_file

    from gradproj.cli import score_main as score

    kron = ["--random_projection", "--proj_type", "kronecker", "--proj_dim", "2x4"]
    extract(tiny_llama, sft_file, tmp_path, "--target", "params", *kron)
    extract(tiny_llama, sft_file, tmp_path / "emb", *kron)
    base = tiny_llama.name + "/sft/train/0"
    params_run = tmp_path / "params_kronecker_2x4" / base
    assert score(["--train", str(params_run), "--test", str(params_run), "--func", "dot",
                  "--output", str(tmp_path / "scores")]) == 0  # fmt: skip
    _, vectors = store.Run(params_run).load_matrix()
    dot = load_file(tmp_path / "scores" / "scores.safetensors")["dot"]
    torch.testing.assert_close(dot, vectors @ vectors.T, rtol=1e-5, atol=1e-9)
    embeddings_run = tmp_path / "emb" / "kronecker_2x4" / base
    argv = [
        "--train",
        str(params_run),
        "--test",
        str(embeddings_run),
        "--output",
        str(tmp_path / "x"),
    ]
    assert "target ('params' vs 'embeddings')" in user_error_line(score, argv, capsys)
    extract(tiny_llama, sft_file, tmp_path / "mlp", "--target", "params", "--modules", "*.mlp.*",
            *kron)  # fmt: skip
    argv[3] = str(tmp_path / "mlp" / "params_kronecker_2x4" / base)
    assert "modules" in user_error_line(score, argv, capsys)
