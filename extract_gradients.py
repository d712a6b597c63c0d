#!/usr/bin/env python
"""Extract per-example loss gradients (full or randomly projected) of a Hugging Face model.

The command line of the original study works unchanged, e.g.
  python extract_gradients.py allenai/OLMo-2-1124-7B-SFT daryna3325/sampled-tulu-1000 0 \
      --dataset_split train --paradigm sft --mode store --random_projection --proj_dim 8192
"""

import argparse

from dotenv import load_dotenv

from gradproj.errors import UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
        help="embeddings (d loss / d input embeddings), params (weights of linear layers;\n"
        "projected by default, see the README) or hidden (no gradient: the mean last hidden\n"
        "state, a representation baseline)",
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


def main(argv=None) -> int:
    load_dotenv()
    args = parse_args(argv)
    from gradproj import extract

    if args.verify:
        return extract.verify_run(args.verify)
    if args.merge:
        return extract.merge_run(args.merge)
    if args.model is None or args.dataset is None or args.checkpoint_nr is None:
        raise UserError("model, dataset and checkpoint_nr are required (see --help)")
    options = {k: v for k, v in vars(args).items() if k not in ("verify", "merge")}
    return extract.run_extraction(extract.ExtractConfig(**options))


if __name__ == "__main__":
    run_cli(main)
