"""The `gradproj` command: options derived from the configs, shims equal to subcommands, the
generated CLI reference up to date."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import compare_projections
import extract_gradients
import score_influence
from gradproj import cli
from gradproj.errors import UserError
from gradproj.influence import ScoreConfig
from gradproj.options import option
from gradproj.plan import PlanConfig
from tests.conftest import REPO, conversations, write_jsonl

MAX_LEN = 40


def test_cli_reference_is_generated_from_the_parsers():
    committed = (REPO / "docs" / "cli.md").read_text()
    assert committed == cli.reference_markdown(), "run: python scripts/build_cli_reference.py"


@pytest.mark.parametrize(
    "config, argv",
    [
        (ScoreConfig, ["--train", "a", "--test", "b"]),
        (PlanConfig, ["--hidden_size", "8", "--layers", "2", "--params", "1e3",
                      "--n_examples", "3", "--mean_tokens", "5"]),
    ],
)  # fmt: skip
def test_parsed_defaults_equal_the_config_defaults(config, argv):
    """An option left out means the dataclass default: nothing is declared twice."""
    name = {ScoreConfig: "score", PlanConfig: "plan"}[config]
    parsed = cli.COMMANDS[name].parser().parse_args(argv)
    given = {k: v for k, v in vars(parsed).items() if f"--{k}" in argv}
    assert config(**vars(parsed)) == config(**given)


def test_a_field_without_help_fails_the_parser_build():
    @dataclasses.dataclass
    class Config:
        a: int = option(1, "x")
        b: int = 2

    with pytest.raises(RuntimeError, match=r"Config\.b has no help"):
        cli.add_config_arguments(cli.argparse.ArgumentParser(), Config)


def test_a_literal_type_is_the_options_choices_on_the_command_line_and_in_python(capsys):
    parser = cli.COMMANDS["score"].parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--train", "a", "--test", "b", "--func", "l2"])
    assert "invalid choice: 'l2' (choose from 'dot', 'cosine', 'both')" in capsys.readouterr().err
    with pytest.raises(UserError, match="--func 'l2': use dot, cosine or both"):
        ScoreConfig("a", "b", func="l2")


def test_option_types_come_from_the_field_types():
    args = cli.COMMANDS["compare"].parser().parse_args(
        ["--reference", "r", "--candidates", "c1", "c2", "--output", "o", "--top_k", "5", "7",
         "--flag_margin", "0.5"]
    )  # fmt: skip
    assert args.candidates == [Path("c1"), Path("c2")] and args.reference == Path("r")
    assert args.top_ks == [5, 7] and args.flag_margin == 0.5 and args.emulate_original is False


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.safetensors")}


def test_shims_and_subcommands_write_the_same_bytes(tiny_llama, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", conversations(6, long_every=3))
    run = tmp_path / "shim" / "rademacher_16" / tiny_llama.name / "rows" / "train" / "0"
    score = ["--train", str(run), "--test", str(run), "--output"]
    for way, extract, score_influence_main in (
        ("shim", extract_gradients.main, score_influence.main),
        ("command", lambda a: cli.main(["extract", *a]), lambda a: cli.main(["score", *a])),
    ):
        argv = [str(tiny_llama), str(rows), "0", "--gradients_output_path", str(tmp_path / way),
                "--max_seq_length", str(MAX_LEN), "--gradients_per_file", "4",
                "--random_projection", "--proj_dim", "full,16"]  # fmt: skip
        assert extract(argv) == 0
        assert score_influence_main([*score, str(tmp_path / f"scores_{way}")]) == 0
    shim, command = shard_bytes(tmp_path / "shim"), shard_bytes(tmp_path / "command")
    assert len(shim) == 4 and shim == command  # 2 runs x 2 shards
    scores = [(tmp_path / f"scores_{way}" / "scores.safetensors").read_bytes() for way in
              ("shim", "command")]  # fmt: skip
    assert scores[0] == scores[1]


def test_the_shims_are_the_commands():
    assert extract_gradients.main is cli.extract_main
    assert score_influence.main is cli.score_main
    assert compare_projections.main is cli.compare_main


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nope"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_sbatch_runs_the_installed_command_without_a_checkout(tiny_llama, tmp_path):
    """extract_grads.sbatch run from elsewhere, with no GRADPROJ_HOME: `python -m gradproj`."""
    rows = write_jsonl(tmp_path / "rows.jsonl", conversations(5))
    options = ["--max_seq_length", str(MAX_LEN), "--gradients_per_file", "4"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADPROJ_", "SLURM_"))}
    env |= {"GRADPROJ_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    argv = ["bash", str(REPO / "extract_grads.sbatch"), str(tiny_llama), str(rows), "0", "train",
            "sft", "store", "--random_projection", "16", *options]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    direct = [str(tiny_llama), str(rows), "0", "--random_projection", "--proj_dim", "16",
              "--gradients_output_path", str(tmp_path / "direct"), *options]  # fmt: skip
    assert cli.main(["extract", *direct]) == 0
    assert shard_bytes(tmp_path / "gradients") == shard_bytes(tmp_path / "direct")
    assert len(shard_bytes(tmp_path / "direct")) == 2


def test_compare_without_the_analysis_extra_names_it():
    hide_pandas = "import sys; sys.modules['pandas'] = None; from gradproj.cli import entry_point; "
    code = hide_pandas + "sys.argv = ['gradproj', 'compare', '--help']; entry_point()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip() == "error: this command needs pandas: pip install 'gradproj[analysis]'"
    )
