"""`gradproj plan` against figures computed by hand for the original study's setting:
OLMo-2-7B (hidden 4096, 32 layers, 7.3e9 parameters), 381,000 examples, one H100."""

import json
import re
import shlex
import socket
from pathlib import Path

import pytest

from gradproj import cli
from gradproj.plan import PlanConfig, plan
from tests.conftest import snapshot, user_error_line

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
                   "full fp32: 25.6 TB", "gradient: 273.96 TFLOP/s (estimated: "):  # fmt: skip
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
    assert r["examples"] == len(run.manifest.examples)
    assert r["tokens"] == sum(e["tokens"] for e in run.manifest.examples)


def test_missing_model_shape_is_a_one_line_error(capsys):
    line = user_error_line(cli.main, ["plan", "--n_examples", "3", "--mean_tokens", "5"], capsys)
    assert "--model" in line
    line = user_error_line(cli.main, ["plan", "--model", "m", "--n_examples", "3"], capsys)
    assert "--mean_tokens" in line


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network call: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_readme_plan_command_runs_offline_without_a_network_call(no_network, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (command,) = re.findall(r"^gradproj plan .*$", readme, flags=re.M)
    argv = shlex.split(command)[1:]
    assert "allenai/OLMo-2-1124-7B-SFT" in argv
    assert cli.main(argv) == 0
    assert "model: hidden 4096, 32 layers, 7,300,000,000 parameters" in capsys.readouterr().out


def test_known_models_need_no_config_and_given_values_override(no_network):
    r = plan(PlanConfig(model="bundled:smollm2-135m-instruct", n_examples=1, mean_tokens=10))
    assert (r["shape"].hidden_size, r["shape"].layers, r["shape"].params) == (576, 30, 134_515_008)
    r = plan(PlanConfig(model="meta-llama/Llama-3.1-8B", layers=2, n_examples=1, mean_tokens=9))
    assert (r["shape"].hidden_size, r["shape"].layers, r["shape"].params) == (4096, 2, 8.03e9)


def test_known_bundled_shape_is_its_config(tiny_llama):
    """The bundled entry of KNOWN_SHAPES against the bundled model's own config, where the
    converted model is in the cache (tests never convert it)."""
    from gradproj import models

    folder = models.cache_dir() / "bundled" / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file():
        pytest.skip("the bundled model is not converted in this cache")
    from_config = plan(PlanConfig(model=str(folder), n_examples=1, mean_tokens=1))["shape"]
    known = plan(PlanConfig(model="bundled:smollm2-135m-instruct", n_examples=1, mean_tokens=1))
    assert known["shape"] == from_config


@pytest.mark.parametrize("offline", [True, False])
def test_unknown_hub_model_without_network_fails_at_once_with_the_offline_form(
    offline, monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # nothing cached
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        attempts = []

        def unreachable(*args, **kwargs):
            attempts.append(args)
            raise OSError("unreachable")

        monkeypatch.setattr(socket, "create_connection", unreachable)
    argv = ["plan", "--model", "someone/unknown-7b", "--n_examples", "3", "--mean_tokens", "5"]
    line = user_error_line(cli.main, argv, capsys)
    assert "--hidden_size H --layers L --params P" in line
    assert ("HF_HUB_OFFLINE=1" if offline else "unreachable") in line
    if not offline:
        assert len(attempts) == 1  # one short try, no retries


SHAPE = ["--hidden_size", "8", "--layers", "1", "--params", "100"]


@pytest.mark.parametrize(
    "data, needle",
    [
        (["--n_examples", "0", "--mean_tokens", "5"], "--n_examples must be at least 1"),
        (["--n_examples", "3", "--mean_tokens", "-5"], "--mean_tokens must be above 0"),
        (["--n_examples", "3", "--mean_tokens", "0"], "--mean_tokens must be above 0"),
        (["--lengths", "EMPTY"], "no examples to plan for"),
        (["--lengths", "RUN"], "no examples to plan for"),
        (["--lengths", "NEGATIVE"], "token counts must be above 0"),
    ],
)
def test_empty_or_negative_data_is_a_one_line_error(data, needle, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "negative.txt").write_text("5\n-3\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"examples": []}))
    files = {"EMPTY": "empty.txt", "RUN": "run", "NEGATIVE": "negative.txt"}
    data = [str(tmp_path / files[x]) if x in files else x for x in data]
    line = user_error_line(cli.main, ["plan", *SHAPE, *data], capsys)
    assert needle in line


TABLE = """| step | quantity | value | unit | status | seconds | note |
|---|---|---|---|---|---|---|
| environment | device kind | {kind} | | ok | | NVIDIA H200 |
| calibration | gradient | 2.0e14 | FLOP/s | ok | | extract_calibration |
| calibration | sjlt | 1e-10 | s/coordinate | ok | | projection |
| calibration | normal | 5e13 | FLOP/s | failed | | projection |
"""


def test_calibration_replaces_the_estimates_it_measures_and_says_so(tmp_path, capsys):
    """Measured gradient and sjlt rates replace the estimates (scaled by peak on another GPU
    kind); a failed row does not; every rate says where it came from."""
    table = tmp_path / "gpu_results.md"
    table.write_text(TABLE.format(kind="h200"))
    base = dict(**OLMO, mean_tokens=1000, proj_dim="8192", proj_type="sjlt,normal")
    estimated = plan(PlanConfig(**base, gpu="h200"))
    measured = plan(PlanConfig(**base, gpu="h200", calibration=table))
    flops = measured["flops"]
    assert measured["gradient_hours"] == approx(flops / 2.0e14 / 3600)
    coordinates = measured["tokens"] * 4096
    assert measured["projection_hours"][("sjlt", 8192)] == approx(coordinates * 1e-10 / 3600)
    assert measured["projection_hours"][("normal", 8192)] == approx(
        estimated["projection_hours"][("normal", 8192)]
    )
    a100 = plan(PlanConfig(**base, gpu="a100", calibration=table))
    assert a100["gradient_hours"] == approx(flops / (2.0e14 * 312 / 989) / 3600)
    argv = ["plan", *SHAPE, "--n_examples", "2", "--mean_tokens", "4", "--gpu", "h200",
            "--proj_type", "sjlt,normal", "--calibration", str(table)]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"gradient: 200.00 TFLOP/s (measured: {table} (extract_calibration))" in out
    assert f"sjlt: 1.000e-10 s/coordinate (measured: {table} (projection))" in out
    assert "normal: 4.30 TFLOP/s (estimated: " in out


def test_calibration_of_another_device_class_is_a_one_line_error(tmp_path, capsys):
    table = tmp_path / "gpu_results.md"
    table.write_text(TABLE.format(kind="cpu"))
    argv = ["plan", *SHAPE, "--n_examples", "2", "--mean_tokens", "4", "--calibration", str(table)]
    assert "measured on cpu: plan with --gpu cpu" in user_error_line(cli.main, argv, capsys)
    table.write_text("no table here\n")
    assert "no 'device kind' row" in user_error_line(cli.main, argv, capsys)


def test_a_calibration_that_is_not_utf8_is_refused_before_any_work(
    tiny_llama, sft_file, tmp_path, capsys, monkeypatch
):
    """Issue 30: it was a UnicodeDecodeError after the dataset was tokenized."""
    table = tmp_path / "gpu_results.md"
    good = TABLE.format(kind="h200").encode()
    table.write_bytes(good + "| note | é |\n".encode("latin-1"))
    monkeypatch.setattr("gradproj.plan.dataset_lengths", lambda cfg: pytest.fail("work began"))
    before = snapshot(tmp_path)
    argv = ["plan", "--model", str(tiny_llama), "--dataset", str(sft_file), "--gpu", "h200",
            "--calibration", str(table)]  # fmt: skip
    line = user_error_line(cli.main, argv, capsys)
    assert line == (
        f"error: --calibration {table}: not UTF-8 text (byte offset {len(good) + 9}); give the "
        "gpu_results.md that bench/gpu_all.sh wrote"
    )
    assert snapshot(tmp_path) == before
