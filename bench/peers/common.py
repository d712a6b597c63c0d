"""What every peer runner shares (runs in the peers' venv: torch and transformers only, no
gradproj): the examples gradproj tokenized (prepare.py's data.json), the model in fp32, the
per-example loss, the 210 decoder linear layers, and the result file the adapter reads.

Each runner's command line starts from `runner_args` (OUT, threads and the peer's own options)
and its record from `peer_info`; it runs its peer through `guarded` or `run_guarded`.

A runner writes OUT/<name>/result.npz (`scores`: the peer's matrix as the peer returned it,
`orientation`: "test_train" or "train_test") and OUT/<name>/peer.json (tool, version, method,
settings, train and test ids in the matrix's order, one-off and scoring seconds, peak resident
memory, numbers stored per train example), or OUT/<name>/peer.json with `error` when the peer
could not run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

IGNORE = -100
# --budget_s: the runners that estimate their whole run early give up past it
BUDGET_S = {"type": float, "default": 3600, "help": "seconds the whole run may take"}


def load_work(out: Path) -> dict:
    return json.loads((out / "data.json").read_text())


def runner_args(
    description: str, argv: list[str] | None, **options: dict
) -> tuple[argparse.Namespace, Path, dict]:
    """A runner's command line: --out (prepare.py's folder) and --threads, which every runner
    has, then the peer's own `options` (name -> add_argument's keywords). Sets torch's threads;
    returns the arguments, OUT and the work."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="prepare.py's folder")
    parser.add_argument("--threads", type=int, default=2)
    for name, keywords in options.items():
        parser.add_argument(f"--{name}", **keywords)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    return args, out, load_work(out)


def peer_info(tool: str, method: str, settings: dict) -> dict:
    """The start of a peer's record: its tool (the package it installs as), version, method,
    settings (the same dict: a runner adds to it as it learns them) and the versions around."""
    found = versions(tool)
    return {
        "tool": tool, "version": found[tool], "method": method, "settings": settings,
        "versions": found,
    }  # fmt: skip


class Examples(torch.utils.data.Dataset):
    """The tokenized examples as dicts of 1-d tensors (input_ids, labels)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.long),
            "labels": torch.tensor(row["labels"], dtype=torch.long),
        }


def collate(items: list[dict], pad_token_id: int = 0) -> dict:
    """Right padding: pad tokens get label -100 and attention 0."""
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = it["input_ids"], it["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] mean cross-entropy over each example's label tokens, causal shift (HF's loss of one
    example; gradproj's sft loss)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
        reduction="none",
    ).view(targets.shape)  # fmt: skip
    counts = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return token.sum(dim=1) / counts


def load_model(work: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work["model_dir"], dtype=torch.float32)
    return model.eval()


def decoder_linear_names(model) -> list[str]:
    """The nn.Linear modules inside the decoder layers (210 for SmolLM2-135M: 30 x 7)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    ]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started: dict[str, float] = {}

    def elapsed(self, name: str) -> float:
        """Seconds so far in `name` (inside its block)."""
        return self.seconds.get(name, 0.0) + time.perf_counter() - self.started[name]

    @contextmanager
    def __call__(self, name: str):
        start = self.started[name] = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def versions(*packages: str) -> dict:
    found = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", *packages):
        try:
            found[package] = version(package)
        except Exception:
            found[package] = None
    return found


def write_result(
    folder: Path,
    scores: np.ndarray,
    orientation: str,
    info: dict,
    work: dict,
) -> None:
    """The peer's matrix as it gave it, and what produced it."""
    folder.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scores, dtype=np.float32)
    np.savez(folder / "result.npz", scores=scores, orientation=np.array(orientation))
    info = {
        "train_ids": [r["id"] for r in work["train"]],
        "test_ids": [r["id"] for r in work["test"]],
        "orientation": orientation,
        "shape": list(scores.shape),
        "peak_rss_mib": peak_rss_mib(),
        **info,
    }
    (folder / "peer.json").write_text(json.dumps(info, indent=1))


def write_error(folder: Path, info: dict, err: BaseException) -> None:
    """The peer could not run: its error's last line, and the traceback for the record."""
    folder.mkdir(parents=True, exist_ok=True)
    last = (str(err).strip().splitlines() or [""])[-1][:300]
    info = {**info, "error": f"{type(err).__name__}: {last}", "peak_rss_mib": peak_rss_mib()}
    (folder / "peer.json").write_text(json.dumps(info, indent=1))
    (folder / "traceback.txt").write_text(traceback.format_exc())


def guarded(folder: Path, info: dict, body) -> bool:
    """Run body(); on an exception, write peer.json with the error instead of a result and say
    so on stderr. Whether body() finished."""
    try:
        body()
    except BaseException as err:  # noqa: BLE001 (a peer's failure is a result to report)
        write_error(folder, info, err)
        name = f"{info.get('tool')} {info.get('method')}"
        print(f"{name}: {type(err).__name__}: {err}", file=sys.stderr)
        return False
    return True


def run_guarded(folder: Path, info: dict, body) -> None:
    """`guarded` for a runner with one method: its failure is the process's (exit code 3)."""
    if not guarded(folder, info, body):
        raise SystemExit(3)
