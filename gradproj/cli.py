"""The command-line front ends: parsers and mains of extraction, scoring and comparison."""

import argparse
import sys
import time
from pathlib import Path

from dotenv import load_dotenv

from gradproj.errors import UserError

EXTRACT_DOC = """\
Extract per-example loss gradients (full or randomly projected) of a Hugging Face model.

The command line of the original study works unchanged, e.g.
  python extract_gradients.py allenai/OLMo-2-1124-7B-SFT daryna3325/sampled-tulu-1000 0 \
      --dataset_split train --paradigm sft --mode store --random_projection --proj_dim 8192
"""


def extract_parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=EXTRACT_DOC, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("model", nargs="?", help="hub id, local directory, or bundled:<name>")
    p.add_argument("dataset", nargs="?", help="hub id, .json/.jsonl/.parquet, or save_to_disk dir")
    p.add_argument("checkpoint_nr", nargs="?", type=int, help="index into the model's checkpoints")
    p.add_argument("--dataset_split", default="train", help="split or slice, e.g. train[0:100]")
    p.add_argument("--paradigm", default="sft", help="sft, pre or mlm")
    p.add_argument("--mode", default="store", help="store (each gradient) or store_mean")
    p.add_argument("--random_projection", action="store_true", help="project the gradients")
    p.add_argument(
        "--proj_dim",
        default=None,
        help="dims, comma-separated; 'full' adds the full gradient (default 16384;\n"
        "with --target params and kronecker: per layer, e.g. 16x16, the default)",
    )
    p.add_argument(
        "--proj_type",
        default=None,
        help="rademacher, normal, sjlt, kronecker (default rademacher; kronecker for params)",
    )
    p.add_argument("--proj_seed", type=int, default=42)
    p.add_argument("--proj_memory_gb", type=float, default=None, help="projection memory budget")
    p.add_argument("--gradients_per_file", type=int, default=1000)
    p.add_argument("--gradients_output_path", default="./gradients")
    p.add_argument("--skip_if_gradient_folder_exists", action="store_true")
    p.add_argument("--max_seq_length", type=int, default=4096)
    p.add_argument(
        "--dtype", default="auto", help="model dtype: auto (fp32 CPU, bf16 CUDA), fp32, bf16, fp16"
    )
    p.add_argument("--save_dtype", default="fp32", help="full gradients on disk: fp32 or bf16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument(
        "--batch_tokens",
        type=int,
        default=None,
        help="token budget per batch (1024 on CPU, 8192 on CUDA)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--start", type=int, default=None, help="first example of this task's range")
    p.add_argument("--end", type=int, default=None, help="end (exclusive) of this task's range")
    p.add_argument(
        "--target",
        default="embeddings",
        help="embeddings (d loss / d input embeddings) or params (weights of linear layers;\n"
        "projected by default, see the README)",
    )
    p.add_argument(
        "--modules",
        default=None,
        metavar="GLOB[,GLOB...]",
        help="params: linear layers by name, e.g. '*.mlp.*' (default: all but the LM head)",
    )
    p.add_argument("--include_lm_head", action="store_true", help="params: add the LM head")
    p.add_argument(
        "--full",
        action="store_true",
        help="add the exact gradient; with --target params and no --random_projection, only it",
    )
    p.add_argument("--verify", metavar="RUN_DIR", help="check a run's shards and exit")
    p.add_argument("--merge", metavar="RUN_DIR", help="rebuild a run's manifest.json and exit")
    return p.parse_args(argv)


def extract_main(argv=None) -> int:
    load_dotenv()
    args = extract_parse_args(argv)
    from gradproj import extract

    if args.verify:
        return extract.verify_run(args.verify)
    if args.merge:
        return extract.merge_run(args.merge)
    if args.model is None or args.dataset is None or args.checkpoint_nr is None:
        raise UserError("model, dataset and checkpoint_nr are required (see --help)")
    options = {k: v for k, v in vars(args).items() if k not in ("verify", "merge")}
    return extract.run_extraction(extract.ExtractConfig(**options))


SCORE_DOC = """Score every train example against every test example (dot product and/or cosine).

  python score_influence.py --train gradients/rademacher_8192/M/tulu/train/0 \
      --test gradients/rademacher_8192/M/ultrachat/train/0 --func both --mapped

Writes scores.safetensors ([n_test, n_train] fp32 per function), topk.jsonl and summary.json
(and mapped/<test row>.json with --mapped) to --output, by default
./explainability/<dim or full>/<train dataset>__<test dataset>/<func>/.
"""


def score_parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=SCORE_DOC, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--train", required=True, help="train run directory (extract_gradients.py)")
    p.add_argument("--test", required=True, help="test run directory")
    p.add_argument("--func", default="both", choices=["dot", "cosine", "both"])
    p.add_argument("--output", default=None, help="score directory (default: see above)")
    p.add_argument(
        "--where",
        default=None,
        help="replaces <train dataset>__<test dataset> in the default output",
    )
    p.add_argument(
        "--mapped",
        action="store_true",
        help="also write mapped/<test row>.json, sorted, with the train samples' fields",
    )
    p.add_argument(
        "--top_k", type=int, default=100, help="top and bottom k per test example in topk.jsonl"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument(
        "--dataset", default=None, help="dataset for --mapped (default: the train run's)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp64"],
        help="stored scores: fp32 (fp64 arithmetic, rounded once) or fp64",
    )
    p.add_argument(
        "--memory_gb",
        type=float,
        default=None,
        help="working memory budget (default: half the free memory)",
    )
    return p.parse_args(argv)


def score_main(argv=None) -> int:
    args = score_parse_args(argv)
    from gradproj import influence

    began = time.time()
    out = influence.score_influence(influence.ScoreConfig(**vars(args)))
    print(f"scores written to {out} in {time.time() - began:.1f} s", file=sys.stderr)
    return 0


COMPARE_DOC = """\
Compare projected influence scores with a reference (usually full-gradient) score directory.

Example:
    python compare_projections.py --reference scores/full --candidates scores/rademacher_* \
        --output results/comparison
"""


def compare_parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=COMPARE_DOC.splitlines()[0])
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="score directory of the reference (usually the full gradients)",
    )
    parser.add_argument(
        "--candidates",
        type=Path,
        nargs="+",
        required=True,
        help="score directories of the projections to compare",
    )
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="directory for metrics.csv, summary.csv, figures and report.md",
    )
    parser.add_argument(
        "--reference_run",
        type=Path,
        default=None,
        help="full-gradient run of the train examples (gradient norms, emulation);"
        " default: the train_run recorded in the reference scores",
    )
    parser.add_argument(
        "--test_run",
        type=Path,
        default=None,
        help="full-gradient run of the test examples; default: from the scores",
    )
    parser.add_argument(
        "--emulate_original",
        action="store_true",
        help="also emulate the original pipeline step by step (ablation table)",
    )
    parser.add_argument(
        "--top_k",
        type=int,
        nargs="+",
        default=[10, 50, 100],
        help="k of top-k overlap and NDCG@k (default: 10 50 100)",
    )
    parser.add_argument("--n_permutations", type=int, default=1000)
    parser.add_argument("--n_bootstrap", type=int, default=2000)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the permutation tests, bootstrap and theory simulation",
    )
    parser.add_argument(
        "--flag_margin",
        type=float,
        default=0.1,
        help="flag a measured median Kendall tau this far below the prediction",
    )
    parser.add_argument("--device", default="cpu", help="device of the emulated projections")
    return parser.parse_args(argv)


def compare_main(argv=None) -> int:
    args = compare_parse_args(argv)
    from gradproj.analysis import CompareConfig, compare_projections

    config = CompareConfig(
        reference=args.reference,
        candidates=args.candidates,
        output=args.output,
        reference_run=args.reference_run,
        test_run=args.test_run,
        emulate_original=args.emulate_original,
        top_ks=tuple(args.top_k),
        n_permutations=args.n_permutations,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        flag_margin=args.flag_margin,
        device=args.device,
    )
    compare_projections(config)
    print(f"wrote {config.output / 'report.md'}")
    return 0
