"""The `gradproj` command and its subcommands; the top-level scripts are shims over it.

Each command's options are derived from its config dataclass (name, default, type), so an option
is declared once: the tables below add only what a dataclass cannot say (help, flag spelling,
choices, nargs). A field without an entry, or an entry without a field, fails the parser build.
Heavy modules (torch, transformers, pandas) are imported only by the command that runs.
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

from gradproj import __version__

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

EXTRACT_OPTIONS = {
    "model": dict(positional=True, help="hub id, local directory, or bundled:<name>"),
    "dataset": dict(positional=True, help="hub id, .json/.jsonl/.parquet, or save_to_disk dir"),
    "checkpoint_nr": dict(positional=True, help="index into the model's checkpoints"),
    "dataset_split": dict(help="split or slice, e.g. train[0:100]"),
    "paradigm": dict(help="sft, pre or mlm"),
    "mode": dict(help="store (each gradient) or store_mean"),
    "random_projection": dict(help="project the gradients"),
    "proj_dim": dict(
        help="dims, comma-separated; 'full' adds the full gradient (default 16384; with "
        "--target params and kronecker: per layer, e.g. 16x16, the default)"
    ),
    "proj_type": dict(
        help="rademacher, normal, sjlt, kronecker (default rademacher; kronecker for params)"
    ),
    "proj_seed": dict(help="seed of the random projection"),
    "proj_memory_gb": dict(help="projection memory budget"),
    "gradients_per_file": dict(help="examples per shard"),
    "gradients_output_path": dict(help="root of the run directories"),
    "skip_if_gradient_folder_exists": dict(help="do nothing when every output directory exists"),
    "max_seq_length": dict(help="truncate each example to this many tokens"),
    "dtype": dict(help="model dtype: auto (fp32 CPU, bf16 CUDA), fp32, bf16, fp16"),
    "save_dtype": dict(help="full gradients on disk: fp32 or bf16"),
    "device": dict(help="cpu, cuda, cuda:N (default: cuda if available)"),
    "batch_tokens": dict(help="token budget per batch (1024 on CPU, 8192 on CUDA)"),
    "limit": dict(help="only the first N examples"),
    "start": dict(help="first example of this task's range"),
    "end": dict(help="end (exclusive) of this task's range"),
    "target": dict(
        metavar="TARGET[,TARGET...]",
        help="embeddings (d loss / d input embeddings), params (weights of linear layers; "
        "projected by default, see docs/projection.md) or hidden (no gradient: the mean last "
        "hidden state, a representation baseline); several, comma-separated, share one pass: "
        "the projection options then apply to the first gradient target listed, and a second "
        "takes its default (params: kronecker 16x16; embeddings: full)",
    ),
    "modules": dict(
        metavar="GLOB[,GLOB...]",
        help="params: linear layers by name, e.g. '*.mlp.*' (default: all but the LM head)",
    ),
    "include_lm_head": dict(help="params: add the LM head"),
    "full": dict(
        help="add the exact gradient; with --target params and no --random_projection, only it"
    ),
    "skip_invalid_rows": dict(
        help="record rows the paradigm cannot use in the manifest's skipped, and go on"
    ),
}

SCORE_OPTIONS = {
    "train": dict(help="train run directory (gradproj extract)"),
    "test": dict(help="test run directory"),
    "func": dict(choices=["dot", "cosine", "both"], help="score function(s)"),
    "output": dict(help="score directory (default: see above)"),
    "where": dict(help="replaces <train dataset>__<test dataset> in the default output"),
    "mapped": dict(
        help="also write mapped/<test row>.json, sorted, with the train samples' fields"
    ),
    "top_k": dict(help="top and bottom k per test example in topk.jsonl"),
    "device": dict(help="cpu, cuda, cuda:N (default: cuda if available)"),
    "dataset": dict(help="dataset for --mapped (default: the train run's)"),
    "precision": dict(
        choices=["fp32", "fp64"], help="stored scores: fp32 (fp64 arithmetic, rounded once) or fp64"
    ),
    "memory_gb": dict(
        help="working memory budget in GiB (default: half the available host memory on CPU, "
        "80%% of the free memory on CUDA)"
    ),
    "precondition": dict(
        choices=["none", "gram", "kfac"],
        help="curvature correction: none (plain dot and cosine), gram (whiten both sides by "
        "(G + lambda I)^-1/2, G the train run's second moment, per module for params kronecker "
        "runs) or kfac (params kronecker runs: per module, the Kronecker product of the "
        "projected input and output-gradient covariances; reads the model once more); see "
        "docs/scoring.md",
    ),
    "damping": dict(
        help="lambda as a multiple of each block's mean eigenvalue of G, from 1e-8 to 1e6"
    ),
    "curvature": dict(
        help="the factorization file: read if it exists (it must be the train run's), else "
        "computed and written there (default: <train run>/curvature/<precondition>.safetensors)"
    ),
}

COMPARE_OPTIONS = {
    "reference": dict(help="score directory of the reference (usually the full gradients)"),
    "candidates": dict(nargs="+", help="score directories of the projections to compare"),
    "output": dict(help="directory for metrics.csv, summary.csv, figures and report.md"),
    "reference_run": dict(
        help="full-gradient run of the train examples (gradient norms, emulation); "
        "default: the train_run recorded in the reference scores"
    ),
    "test_run": dict(help="full-gradient run of the test examples; default: from the scores"),
    "emulate_original": dict(
        help="also emulate the original pipeline step by step (ablation table)"
    ),
    "fp16_runs": dict(
        nargs=2,
        metavar=("TRAIN_RUN", "TEST_RUN"),
        help="full-gradient runs extracted with --dtype fp16 (the emulation's fp16_model step); "
        "default: the fp32 gradients rounded to fp16",
    ),
    "top_ks": dict(
        flag="--top_k",
        nargs="+",
        metavar="K",
        help="k of top-k overlap and NDCG@k",
    ),
    "n_permutations": dict(help="permutations of the permutation tests"),
    "n_bootstrap": dict(help="bootstrap resamples of the confidence intervals"),
    "seed": dict(help="seed of the permutation tests, bootstrap and theory simulation"),
    "flag_margin": dict(help="flag a measured median Kendall tau this far below the prediction"),
    "device": dict(help="device of the emulated projections"),
    "retrieval": dict(
        help="also rank each test example's known source train example (retrieval.csv): the "
        "compared scores, --retrieval_methods, BM25 and a random ranking"
    ),
    "retrieval_methods": dict(
        nargs="+",
        metavar="DIR",
        help="more score directories for the retrieval (and --lds) table only (other targets: "
        "params, hidden), over the same examples; implies --retrieval",
    ),
    "source_field": dict(
        help="test set column naming each test example's source train id, or a JSON list of "
        "ids (e.g. related_ids: the best-ranked of them counts)"
    ),
    "lds": dict(
        metavar="FILE",
        help="ground truth of gradproj retrain: adds lds.csv, the linear datamodeling score of "
        "every score directory given (with --retrieval_methods), BM25 and a random ranking",
    ),
}

RETRAIN_DOC = """\
The counterfactual ground truth of influence (docs/lds.md): fine-tune the model on random
subsets of the train examples and record every test example's loss after each. `gradproj
compare --lds FILE` scores each ranking by it (the linear datamodeling score, LDS).

Example (the shipped examples/ground_truth.safetensors):
    gradproj retrain --model bundled:smollm2-135m-instruct \\
        --train_dataset examples/data/train.jsonl --test_dataset examples/data/test.jsonl \\
        --test_split test --output examples/ground_truth.safetensors
"""

RETRAIN_OPTIONS = {
    "model": dict(help="hub id, local directory, or bundled:<name>"),
    "train_dataset": dict(help="the train examples (.json/.jsonl/.parquet, a directory, a hub id)"),
    "test_dataset": dict(help="the test examples whose losses are recorded"),
    "output": dict(
        help="the ground-truth file to write (.safetensors); a rerun resumes it, and processes "
        "given the same output share the work"
    ),
    "checkpoint_nr": dict(help="index into the model's checkpoints"),
    "train_split": dict(help="split or slice of the train examples"),
    "test_split": dict(help="split or slice of the test examples"),
    "paradigm": dict(choices=["sft", "pre"], help="loss: sft (assistant turns) or pre"),
    "max_seq_length": dict(help="truncate each example to this many tokens"),
    "n_subsets": dict(help="number of random train subsets M"),
    "fraction": dict(help="fraction of the train examples in each subset"),
    "seed": dict(help="seed of the subsets and their training order"),
    "train_layers": dict(help="how many of the last decoder layers are fine-tuned"),
    "epochs": dict(help="epochs over each subset"),
    "lr": dict(help="AdamW learning rate"),
    "weight_decay": dict(help="AdamW weight decay"),
    "batch_size": dict(help="examples per optimizer step"),
    "threads": dict(help="torch CPU threads"),
}

QUERY_OPTIONS = {
    "train": dict(help="train run directory (gradproj extract) to explain against"),
    "messages": dict(
        metavar="FILE",
        help="the answers to explain: JSON lines in the train dataset's format, one "
        "conversation each (- reads stdin)",
    ),
    "prompt": dict(metavar="TEXT", help="the user's message of the one answer to explain"),
    "response": dict(metavar="TEXT", help="the assistant's answer to explain"),
    "top_k": dict(help="proponents (highest scores) and opponents (lowest) to list"),
    "func": dict(choices=["dot", "cosine", "both"], help="rank by which score function(s)"),
    "format": dict(choices=["table", "json"], help="table (text starts) or json (texts in full)"),
    "dataset": dict(help="the train run's dataset, for the texts (default: its manifest's)"),
    "device": dict(help="cpu, cuda, cuda:N (default: cuda if available)"),
    "memory_gb": dict(help="scoring memory budget in GiB (default: as gradproj score)"),
    "precondition": SCORE_OPTIONS["precondition"]
    | dict(
        help="curvature correction, as gradproj score's --precondition (default: gram where "
        "the train run's vectors are projected, the ranking that explains best; none otherwise)"
    ),
    **{name: SCORE_OPTIONS[name] for name in ("damping", "curvature")},
}

ORIGINAL_OPTIONS = {
    "original_json": dict(
        nargs="+",
        metavar="DIR",
        help="folders of the original's JSON lists (explainability/<dim>/<where>/<func>), "
        "the reference first",
    ),
    "output": dict(help="directory for original_json.csv and original_json_summary.csv"),
    "nan_id": dict(help="the id the notebook drops from every list"),
}


def add_config_arguments(parser: argparse.ArgumentParser, config: type, options: dict) -> None:
    """One argument per field of the dataclass `config`, in the order of `options`.

    Name, default and type come from the field; `options[name]` adds help and, where needed,
    flag, choices, nargs, metavar, or positional=True (then optional, default None, so that a
    command can tell a missing positional from a given one)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    if fields.keys() != options.keys():
        raise RuntimeError(
            f"{config.__name__} and its CLI options differ in {sorted(fields.keys() ^ options)}:"
            " give every field an entry in gradproj/cli.py"
        )
    hints = typing.get_type_hints(config)
    for name, spec in options.items():
        spec = dict(spec)
        kind = _scalar_type(hints[name])
        if spec.pop("positional", False):
            parser.add_argument(name, nargs="?", type=kind, **spec)
            continue
        flag = spec.pop("flag", f"--{name}")
        default = _default(fields[name])
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

    add_config_arguments(parser, ExtractConfig, EXTRACT_OPTIONS)
    # Kept for the original command line; `gradproj verify` / `gradproj merge` do the same.
    parser.add_argument("--verify", metavar="RUN_DIR", help="check a run's shards and exit")
    parser.add_argument("--merge", metavar="RUN_DIR", help="rebuild a run's manifest.json and exit")


def run_extract(args: argparse.Namespace) -> int:
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

    add_config_arguments(parser, ScoreConfig, SCORE_OPTIONS)


def run_score(args: argparse.Namespace) -> int:
    from gradproj import influence, scoredir

    began = time.time()
    out, written = influence.score_influence(influence.ScoreConfig(**vars(args)))
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

    add_config_arguments(parser, CompareConfig, COMPARE_OPTIONS)


def run_compare(args: argparse.Namespace) -> int:
    from gradproj.analysis import CompareConfig, compare_projections

    config = CompareConfig(**vars(args) | {"top_ks": tuple(args.top_ks)})
    comparison = compare_projections(config)
    print(f"wrote {config.output / 'report.md'}")
    if comparison.explanations:
        print(f"wrote {comparison.explanations}")
    return 0


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.query import QueryConfig

    add_config_arguments(parser, QueryConfig, QUERY_OPTIONS)


def run_query(args: argparse.Namespace) -> int:
    from dotenv import load_dotenv

    from gradproj import query

    load_dotenv()
    config = query.QueryConfig(**vars(args))
    query.print_results(config, query.run_query(config))
    return 0


def add_original_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.analysis.original_json import OriginalJsonConfig

    add_config_arguments(parser, OriginalJsonConfig, ORIGINAL_OPTIONS)


def run_original(args: argparse.Namespace) -> int:
    from gradproj.analysis.original_json import OriginalJsonConfig, compare_original_json
    from gradproj.analysis.report import markdown_table

    config = OriginalJsonConfig(**vars(args)).validate()
    reference, *candidates = config.original_json
    table = compare_original_json(reference, candidates, config.output, config.nan_id)
    print(markdown_table(table), end="")
    print(f"wrote {config.output / 'original_json_summary.csv'}")
    return 0


def add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.retrain import RetrainConfig

    add_config_arguments(parser, RetrainConfig, RETRAIN_OPTIONS)


def run_retrain(args: argparse.Namespace) -> int:
    from dotenv import load_dotenv

    from gradproj.retrain import RetrainConfig, retrain

    load_dotenv()
    retrain(RetrainConfig(**vars(args)))
    return 0


def add_run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a folder above runs")


def run_verify(args: argparse.Namespace) -> int:
    from gradproj import store

    return store.verify_run(args.run_dir)


def run_merge(args: argparse.Namespace) -> int:
    from gradproj import store

    return store.merge_run(args.run_dir)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from gradproj.plan import PLAN_OPTIONS, PlanConfig

    add_config_arguments(parser, PlanConfig, PLAN_OPTIONS)


def run_plan(args: argparse.Namespace) -> int:
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
        add_extract_arguments, run_extract,
    ),
    "score": Command(
        "score every train example against every test example", SCORE_DOC,
        add_score_arguments, run_score,
    ),
    "compare": Command(
        "compare projected scores with the full-gradient ones", COMPARE_DOC,
        add_compare_arguments, run_compare, extra="analysis",
    ),
    "query": Command(
        "explain new answers: their top train examples, against a train run", QUERY_DOC,
        add_query_arguments, run_query,
    ),
    "original": Command(
        "the original study's JSON lists: agreement as published and corrected", ORIGINAL_DOC,
        add_original_arguments, run_original, extra="analysis",
    ),
    "retrain": Command(
        "fine-tune on random train subsets: the ground truth of influence (LDS)", RETRAIN_DOC,
        add_retrain_arguments, run_retrain,
    ),
    "verify": Command("check a run's shards", VERIFY_DOC, add_run_dir_argument, run_verify),
    "merge": Command("rebuild a run's manifest", MERGE_DOC, add_run_dir_argument, run_merge),
    "plan": Command(
        "print what a study will cost before running it",
        "Print what a study will cost: tokens, FLOPs, hours, disk and memory (docs/plan.md).",
        add_plan_arguments, run_plan,
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
