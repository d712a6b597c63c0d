"""`gradproj plan` against figures computed by hand for the original study's setting:
OLMo-2-7B (hidden 4096, 32 layers, 7.3e9 parameters), 381,000 examples, one H100."""

import pytest

from gradproj import cli
from gradproj.plan import PlanConfig, plan
from tests.conftest import user_error_line

OLMO = dict(hidden_size=4096, layers=32, params=7.3e9, n_examples=381_000)
DIMS = "full,8192,16384,204800,2048000"


def approx(x):
    return pytest.approx(x, rel=1e-9)


def test_padded_length_reproduces_the_original_full_gradient_hours():
    """At 4,096 tokens per example the work equals the original's: its reported 53 h."""
    r = plan(PlanConfig(**OLMO, mean_tokens=4096))
    assert r["tokens"] == r["padded_tokens"] == 381_000 * 4096
    assert r["flops"] == approx(381_000 * (4 * 7.3e9 * 4096 + 8 * 32 * 4096 * 4096**2))
    assert r["gradient_hours"] == approx(53.0)


def test_unpadded_hours_scale_with_flops_per_example():
    # per example: 4 P T + 8 L h T^2 = 29,900,800,000,000 + 1,099,511,627,776 at T = 1024,
    # 119,603,200,000,000 + 17,592,186,044,416 at T = 4096 (the calibration)
    r = plan(PlanConfig(**OLMO, mean_tokens=1024, gpus=4))
    assert r["gradient_hours"] == approx(53.0 * 31_000_311_627_776 / 137_195_386_044_416 / 4)


def test_projection_hours_disk_and_block_memory():
    r = plan(PlanConfig(**OLMO, mean_tokens=1024, proj_dim=DIMS))
    coordinates = 381_000 * 1024 * 4096  # 1,598,029,824,000
    # H200 rate of bench/RESULTS.md: 0.0031 s per example of 2,048,000 coordinates at k = 8192
    seconds_8192 = coordinates / 2_048_000 * 0.0031
    for k in (8192, 16384, 204800, 2048000):
        assert r["projection_hours"]["rademacher", k] == approx(seconds_8192 * k / 8192 / 3600)
        assert r["disk_bytes"][f"rademacher_{k}"] == 381_000 * (4 * k + 8)
    assert r["disk_bytes"]["full fp32"] == 6_392_119_296_000 + 16 * 381_000
    assert r["disk_bytes"]["full bf16"] == 3_196_059_648_000 + 16 * 381_000
    # an H100's 80 GiB / 4 = 20 GiB budget, half of it for the block: 16384 x 65536 x 24 B
    # (24 GiB) halves its rows to 4096 (6 GiB)
    assert r["block_gib"]["rademacher"] == 6.0


def test_original_pipeline_reproduces_the_reported_costs():
    """One job per dim, linear in k through the reported 83 h (16,384) and 212 days
    (2,048,000): hours(k) = 83 + (k - 16384) x 5005 / 2,031,616."""
    r = plan(PlanConfig(**OLMO, mean_tokens=1024, proj_dim=DIMS, original=True))
    hours = r["original_hours"]
    assert hours["full"] == approx(53.0)
    assert hours["rademacher", 16384] == approx(83.0)
    assert hours["rademacher", 2048000] == approx(212 * 24.0)
    assert hours["rademacher", 8192] == approx(83 - 8192 * 5005 / 2_031_616)  # 62.8 h
    assert hours["rademacher", 204800] == approx(83 + 188_416 * 5005 / 2_031_616)  # 547.2 h
    assert r["original_disk_bytes"]["full fp16 padded"] == 381_000 * 4096 * 4096 * 2


def test_lengths_are_truncated_at_max_seq_length(tmp_path):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("3\n5000\n100\n")
    r = plan(PlanConfig(hidden_size=8, layers=1, params=100, lengths=lengths, max_seq_length=64))
    assert (r["examples"], r["tokens"]) == (3, 3 + 64 + 64)
    assert r["flops"] == sum(4 * 100 * t + 8 * 8 * t**2 for t in (3, 64, 64))


def test_model_shape_is_read_from_its_config(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    r = plan(PlanConfig(model=str(tiny_llama), n_examples=2, mean_tokens=10))
    s = r["shape"]
    assert s.hidden_size == model.config.hidden_size
    assert s.layers == model.config.num_hidden_layers
    assert s.params == sum(p.numel() for p in model.parameters())


def test_plan_prints_every_figure(capsys):
    argv = ["plan", "--hidden_size", "4096", "--layers", "32", "--params", "7.3e9",
            "--n_examples", "381000", "--mean_tokens", "4096", "--original"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for needle in ("gradients: 53.0 h", "rademacher_2048000: 5,088.0 h (212.0 days)",
                   "full fp32: 25.6 TB", "assumptions:"):  # fmt: skip
        assert needle in out, needle


def test_dataset_lengths_are_what_the_extraction_computes(tiny_llama, sft_file, tmp_path):
    """Planned from the dataset: the tokens and examples of a real extraction's manifest (the
    examples it skips for want of a label token left out)."""
    from gradproj.cli import extract_main
    from gradproj.store import Run

    argv = [str(tiny_llama), str(sft_file), "0", "--gradients_output_path", str(tmp_path),
            "--max_seq_length", "24"]  # fmt: skip
    assert extract_main(argv) == 0
    (manifest,) = tmp_path.rglob("manifest.json")
    run = Run(manifest.parent)
    assert run.skipped  # the long examples lose every label token at 24 tokens
    r = plan(PlanConfig(model=str(tiny_llama), dataset=str(sft_file), max_seq_length=24))
    assert r["examples"] == len(run.manifest["examples"])
    assert r["tokens"] == sum(e["tokens"] for e in run.manifest["examples"])


def test_missing_model_shape_is_a_one_line_error(capsys):
    line = user_error_line(cli.main, ["plan", "--n_examples", "3", "--mean_tokens", "5"], capsys)
    assert "--model" in line
    line = user_error_line(cli.main, ["plan", "--model", "m", "--n_examples", "3"], capsys)
    assert "--mean_tokens" in line
