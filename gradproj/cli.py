"""The `gradproj` command and its subcommands; the top-level scripts are shims over it.

Each command's options are derived from its config dataclass, where an option is declared once:
name, type and default are the field's, help (and flag spelling, nargs, metavar) its
`gradproj.options.option` metadata, choices its `Literal` type. A field without help fails the
parser build. This module holds the parsers and the dispatch only. Heavy modules (torch,
transformers, pandas) are imported only by the command that runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradproj import __version__, options

# A fixed width, so that --help and the generated docs/cli.md do not depend on the terminal.
FORMATTER = functools.partial(argparse.RawDescriptionHelpFormatter, width=100, max_help_position=36)

EXTRACT_DOC = """\
Extract per-example loss gradients (full or randomly projected) of a Hugging Face model.

The command line of the original study works unchanged, e.g.
  gradproj extract allenai/OLMo-2-1124-7B-SFT daryna3325/sampled-tulu-1000 0 \\
      --dataset_split train --paradigm sft --mode store --random_projection --proj_dim 8192
(or the same arguments to `python extract_gradients.py`).
"""

SCORE_DOC = """\
Score every train example against every test example (dot product and/or cosine).

  gradproj score --train gradients/rademacher_8192/M/tulu/train/0 \\
      --test gradients/rademacher_8192/M/ultrachat/train/0 --func both --mapped

Writes scores.safetensors ([n_test, n_train] fp32 per function), topk.jsonl and summary.json
(and mapped/<test row>.json with --mapped) to --output, by default
./explainability/<dim or full>/<train dataset>__<test dataset>/<func>/.
"""

COMPARE_DOC = """\
Compare projected influence scores with a reference (usually full-gradient) score directory.

Example:
    gradproj compare --reference scores/full --candidates scores/rademacher_* \\
        --output results/comparison
"""

QUERY_DOC = """\
Explain new answers: score them against a train run, as extract + score would, and print each
one's top-k proponents and bottom-k opponents with the start of their text.

  gradproj query --train gradients/rademacher_4096/M/train/train/0 \\
      --prompt "How do I reverse a string in Python?" --response "Use s[::-1]."
  gradproj query --train RUN --messages questions.jsonl --format json

The gradient is computed with the train run's own settings (model, checkpoint, paradigm,
target, projection, max_seq_length, dtype: its manifest's), the model loaded once for all.
"""

ORIGINAL_DOC = """\
The original study's published JSON lists (explainability/<dim>/<where>/<func>): each
candidate's agreement with the reference, the notebook's way (list position, the NaN id dropped)
and correctly (ranks from the scores, NaN-scored examples excluded by name), side by side.
`compare_projections.py --original_json ...` runs this command.

Example:
    gradproj original --original_json explainability/16777216/OLMO/cosine \\
        explainability/8192/OLMO/rademacher/cosine --output results/original
"""

VERIFY_DOC = """\
Check a run's shards against its manifest (or every run below a directory); exit status 0 only
when every run is complete: every shard present, made by this run's options, matching its
checksum and listed in the manifest (the one definition that extract, merge and score use).
"""

MERGE_DOC = """\
Rebuild a run's manifest.json from the shards present (after the tasks of a SLURM job array, or
when it was lost or damaged: then from the shards' own metadata), or of every run below a
directory; then verify it as `gradproj verify` does (exit status 0 only when complete).
"""

RETRAIN_DOC = """\
The counterfactual ground truth of influence (docs/lds.md): fine-tune the model on random
subsets of the train examples and record every test example's loss after each. `gradproj
compare --lds FILE` scores each ranking by it (the linear datamodeling score, LDS).

Example (the shipped examples/ground_truth.safetensors):
    gradproj retrain --model bundled:smollm2-135m-instruct \\
        --train_dataset examples/data/train.jsonl --test_dataset examples/data/test.jsonl \\
        --test_split test --output examples/ground_truth.safetensors
"""


def add_config_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """One argument per field of the dataclass `config`, in field order.

    Name, default and type come from the field, the help text and any flag, nargs, metavar or
    positional=True (then optional, default None, so that a command can tell a missing
    positional from a given one) from its `gradproj.options.option` metadata, the choices from a
    `Literal[...]` type. A field without help fails the parser build."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        if options.HELP not in field.metadata:
            raise RuntimeError(
                f"{config.__name__}.{field.name} has no help: declare it with options.option"
            )
        spec = {"help": field.metadata[options.HELP], **field.metadata[options.ARGPARSE]}
        if (choices := options.choices(hints[field.name])) is not None:
            spec["choices"] = choices
        _add_argument(parser, config, field, _scalar_type(hints[field.name]), spec)


def _add_argument(parser, config: type, field: dataclasses.Field, kind: Callable, spec: dict):
    name = field.name
    if spec.pop("positional", False):
        parser.add_argument(name, nargs="?", type=kind, **spec)
        return
    flag = spec.pop("flag", f"--{name}")
    default = _default(field)
    shown = default is not None and default is not False and default is not dataclasses.MISSING
    if shown and "default" not in spec["help"]:
        text = " ".join(map(str, default)) if isinstance(default, tuple) else default
        spec["help"] += f" (default: {text})"
    if kind is bool:
        if default is not False:
            raise RuntimeError(f"{config.__name__}.{name}: a flag must default to False")
        parser.add_argument(flag, dest=name, action="store_true", **spec)
    elif default is dataclasses.MISSING:
        parser.add_argument(flag, dest=name, type=kind, required=True, **spec)
    else:
        parser.add_argument(flag, dest=name, type=kind, default=default, **spec)


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _scalar_type(hint) -> Callable:
    """The type argparse converts a string to: the first of bool, int, float, Path in the hint
    (or its element type for list[...] / tuple[..., ...]), else str."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else (hint,)
    for arg in args:
        if typing.get_origin(arg) in (list, tuple):
            return _scalar_type(typing.get_args(arg)[0]) if args == (arg,) else str
        if arg in (bool, int, float, Path):
            return arg
    return str


# --- The commands ---


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.extract import ExtractConfig

    add_config_arguments(parser, ExtractConfig)
    # Kept for the original command line; `gradproj verify` / `gradproj merge` do the same.
    parser.add_argument("--verify", metavar="RUN_DIR", help="check a run's shards and exit")
    parser.add_argument("--merge", metavar="RUN_DIR", help="rebuild a run's manifest.json and exit")


def extract_command(args: argparse.Namespace) -> int:
    from dotenv import load_dotenv

    from gradproj import extract, store
    from gradproj.errors import UserError

    load_dotenv()
    if args.verify:
        return store.verify_run(args.verify)
    if args.merge:
        return store.merge_run(args.merge)
    if args.model is None or args.dataset is None or args.checkpoint_nr is None:
        raise UserError("model, dataset and checkpoint_nr are required (see --help)")
    options = {k: v for k, v in vars(args).items() if k not in ("verify", "merge")}
    return extract.run_extraction(extract.ExtractConfig(**options))


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.influence import ScoreConfig

    add_config_arguments(parser, ScoreConfig)


def score_command(args: argparse.Namespace) -> int:
    from gradproj import influence, scoredir
    from gradproj.extract.factors import ensure_kfac_factors

    began = time.time()
    cfg = influence.ScoreConfig(**vars(args))
    if cfg.precondition == "kfac":  # its factors come from the model, which scoring does not read
        train = influence.open_run(cfg.train, "train")
        influence.check_compatible(train, influence.open_run(cfg.test, "test"))  # before the pass
        ensure_kfac_factors(train, cfg.curvature, cfg.device)
    out, written = influence.score_influence(cfg)
    counts = scoredir.read_summary(out)["counts"]
    excluded = ", ".join(f"{n} {r}" for r in ("train", "test") if (n := counts[f"{r}_excluded"]))
    note = f"; not scored: {excluded} example(s), listed in summary.json" if excluded else ""
    if written:
        print(f"scores written to {out} in {time.time() - began:.1f} s{note}", file=sys.stderr)
    else:
        print(f"{out} is up to date (same runs, options and gradproj): kept{note}", file=sys.stderr)
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.analysis import CompareConfig

    add_config_arguments(parser, CompareConfig)


def compare_command(args: argparse.Namespace) -> int:
    from gradproj.analysis import CompareConfig, compare_projections

    config = CompareConfig(**vars(args) | {"top_ks": tuple(args.top_ks)})
    comparison = compare_projections(config)
    print(f"wrote {config.output / 'report.md'}")
    if comparison.explanations:
        print(f"wrote {comparison.explanations}")
    return 0


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.query import QueryConfig

    add_config_arguments(parser, QueryConfig)


def query_command(args: argparse.Namespace) -> int:
    from dotenv import load_dotenv

    from gradproj import query

    load_dotenv()
    config = query.QueryConfig(**vars(args))
    query.print_results(config, query.run_query(config))
    return 0


def add_original_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.analysis.original_json import OriginalJsonConfig

    add_config_arguments(parser, OriginalJsonConfig)


def original_command(args: argparse.Namespace) -> int:
    from gradproj.analysis.original_json import OriginalJsonConfig, compare_original_json
    from gradproj.analysis.report import markdown_table

    config = OriginalJsonConfig(**vars(args))
    reference, *candidates = config.original_json
    table = compare_original_json(reference, candidates, config.output, config.nan_id)
    print(markdown_table(table), end="")
    print(f"wrote {config.output / 'original_json_summary.csv'}")
    return 0


def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.retrain import RetrainConfig

    add_config_arguments(parser, RetrainConfig)


def retrain_command(args: argparse.Namespace) -> int:
    from dotenv import load_dotenv

    from gradproj.retrain import RetrainConfig, retrain

    load_dotenv()
    retrain(RetrainConfig(**vars(args)))
    return 0


def add_run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a folder above runs")


def verify_command(args: argparse.Namespace) -> int:
    from gradproj import store

    return store.verify_run(args.run_dir)


def merge_command(args: argparse.Namespace) -> int:
    from gradproj import store

    return store.merge_run(args.run_dir)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.plan import PlanConfig

    add_config_arguments(parser, PlanConfig)


def plan_command(args: argparse.Namespace) -> int:
    from gradproj.plan import PlanConfig, print_plan

    print_plan(PlanConfig(**vars(args)))
    return 0


@dataclass(frozen=True)
class Command:
    summary: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    extra: str | None = None  # the pyproject extra whose packages the command needs

    def parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=prog, description=self.description, formatter_class=FORMATTER
        )
        self.add_arguments(parser)
        return parser

    def main(self, argv=None, prog: str | None = None) -> int:
        try:
            return self.run(self.parser(prog).parse_args(argv))
        except ModuleNotFoundError as err:
            if self.extra is None:
                raise
            from gradproj.errors import UserError

            raise UserError(
                f"this command needs {err.name}: pip install 'gradproj[{self.extra}]'"
            ) from None


COMMANDS = {
    "extract": Command(
        "extract per-example gradients, full and/or projected", EXTRACT_DOC,
        add_extract_arguments, extract_command,
    ),
    "score": Command(
        "score every train example against every test example", SCORE_DOC,
        add_score_arguments, score_command,
    ),
    "compare": Command(
        "compare projected scores with the full-gradient ones", COMPARE_DOC,
        add_compare_arguments, compare_command, extra="analysis",
    ),
    "query": Command(
        "explain new answers: their top train examples, against a train run", QUERY_DOC,
        add_query_arguments, query_command,
    ),
    "original": Command(
        "the original study's JSON lists: agreement as published and corrected", ORIGINAL_DOC,
        add_original_arguments, original_command, extra="analysis",
    ),
    "retrain": Command(
        "fine-tune on random train subsets: the ground truth of influence (LDS)", RETRAIN_DOC,
        add_retrain_arguments, retrain_command,
    ),
    "verify": Command("check a run's shards", VERIFY_DOC, add_run_dir_argument, verify_command),
    "merge": Command("rebuild a run's manifest", MERGE_DOC, add_run_dir_argument, merge_command),
    "plan": Command(
        "print what a study will cost before running it",
        "Print what a study will cost: tokens, FLOPs, hours, disk and memory (docs/plan.md).",
        add_plan_arguments, plan_command,
    ),
}  # fmt: skip


def top_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<9} {command.summary}" for name, command in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="gradproj",
        description="Per-example loss gradients of language models, seeded random projections,\n"
        "influence scores and how rankings change with the projection dimension.",
        epilog=f"commands:\n{listing}\n\n`gradproj COMMAND --help` describes each.",
        formatter_class=FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"gradproj {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="see below")
    return parser


def main(argv=None) -> int:
    """`gradproj COMMAND [OPTIONS]`: the command's parser is built only once it is chosen."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv[:1])  # prints help or version, or the error; exits
    name, rest = _compare_or_original(argv[0], argv[1:])
    return COMMANDS[name].main(rest, prog=f"gradproj {name}")


def _compare_or_original(name: str, argv: list[str]) -> tuple[str, list[str]]:
    """The original's users call `compare_projections.py --original_json ...`."""
    return ("original" if name == "compare" and "--original_json" in argv else name), argv


def extract_main(argv=None) -> int:
    return COMMANDS["extract"].main(argv)


def score_main(argv=None) -> int:
    return COMMANDS["score"].main(argv)


def compare_main(argv=None) -> int:
    name, argv = _compare_or_original("compare", list(sys.argv[1:] if argv is None else argv))
    return COMMANDS[name].main(argv)


def entry_point() -> None:
    """The console script `gradproj`."""
    from gradproj.errors import run_cli

    run_cli(main)


def reference_markdown() -> str:
    """docs/cli.md: the help of `gradproj` and of each command, as the parsers print it."""
    sections = [
        "# Command-line reference\n\n"
        "Generated from the parsers by `python scripts/build_cli_reference.py`; a test fails\n"
        "when this file and the parsers differ. `extract_gradients.py`, `score_influence.py` and\n"
        "`compare_projections.py` take the same arguments as `gradproj extract`, `score` and\n"
        "`compare`.\n",
        f"## gradproj\n\n```\n{top_parser().format_help()}```\n",
    ]
    for name, command in COMMANDS.items():
        help_text = command.parser(f"gradproj {name}").format_help()
        sections.append(f"## gradproj {name}\n\n```\n{help_text}```\n")
    return "\n".join(sections)
