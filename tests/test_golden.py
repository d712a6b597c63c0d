"""Golden bytes: extractions and scorings written by an earlier version are reproduced exactly.

`tests/golden/` holds a tiny model, two small splits and the files the commands below wrote
(`expected/`). A change that alters a single byte of a shard, a score matrix, a ranked list or
a manifest field fails here. Only what legitimately differs between two machines is set aside:
package versions, and the absolute paths of the inputs and outputs, which are written as
placeholders before comparing. Regenerate after an intended format change, and say so in the
commit: `python -m tests.test_golden`.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

from gradproj.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden"
INPUTS = GOLDEN / "inputs"
EXPECTED = GOLDEN / "expected"
MODEL = INPUTS / "model"


def commands(out: Path) -> list[list[str]]:
    """Every kind of output: embedding gradients full and projected by each type, parameter
    gradients (kronecker, dense, full), hidden states, a mean, bf16 storage, and scorings."""
    grads = out / "gradients"

    def extract(split: str, *options: str) -> list[str]:
        return ["extract", str(MODEL), str(INPUTS / f"{split}.jsonl"), "0", "--dataset_split",
                split, "--gradients_output_path", str(grads), "--max_seq_length", "48",
                "--gradients_per_file", "4", "--device", "cpu", *options]  # fmt: skip

    def run(variant: str, split: str) -> str:
        return str(grads / variant / "model" / split / split / "0")

    def score(variant: str, name: str, *options: str) -> list[str]:
        return ["score", "--train", run(variant, "train"), "--test", run(variant, "test"),
                "--func", "both", "--top_k", "3", "--output", str(out / "scores" / name),
                *options]  # fmt: skip

    embeddings = ("--random_projection", "--proj_dim", "full,16,64",
                  "--proj_type", "rademacher,normal,sjlt,kronecker")  # fmt: skip
    params = ("--target", "params", "--modules", "model.layers.0.self_attn.*",
              "--random_projection", "--proj_dim", "4x8,16x16", "--full")  # fmt: skip
    dense = ("--target", "params", "--modules", "model.layers.1.*", "--random_projection",
             "--proj_type", "rademacher,sjlt", "--proj_dim", "32")  # fmt: skip
    return [
        *(extract(split, *embeddings) for split in ("train", "test")),
        *(extract(split, *params) for split in ("train", "test")),
        *(extract(split, *dense) for split in ("train", "test")),
        *(extract(split, "--target", "hidden") for split in ("train", "test")),
        extract(
            "train",
            "--mode",
            "store_mean",
            "--random_projection",
            "--proj_dim",
            "full,16",
            "--save_dtype",
            "bf16",
        ),  # fmt: skip
        score("full", "full", "--mapped"),
        score("rademacher_64", "rademacher_64"),
        score("sjlt_16", "sjlt_16", "--precision", "fp32"),
        score("kronecker_64", "kronecker_64"),
        score("params_kronecker_4x8", "params_kronecker_4x8"),
        score("params_full", "params_full"),
        score("params_rademacher_32", "params_rademacher_32"),
        score("hidden", "hidden"),
    ]


def produce(out: Path) -> None:
    for argv in commands(out):
        assert main(argv) == 0, argv


def files(root: Path) -> list[Path]:
    """Every file a user sees (lock files and the like are not results)."""
    return sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def normalised_text(text: str, out: Path) -> str:
    text = text.replace(str(INPUTS), "<inputs>").replace(str(out), "<out>")
    # the expected files hold the paths of the checkout that wrote them, wherever it was
    return re.sub(r'/[^"\s]*/tests/golden/(inputs|expected)', _placeholder, text)


def _placeholder(match: re.Match) -> str:
    return "<inputs>" if match[1] == "inputs" else "<out>"


def comparable(path: Path, out: Path):
    """What must be identical: a safetensors file's data bytes and its header (with paths as
    placeholders); a JSON file's content without what differs between machines (package
    versions, the memory budget, checksums of what holds paths: manifests, identities, shard
    files); any other file's
    bytes."""
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        metadata = header.pop("__metadata__", {})
        metadata = {k: json.loads(normalised_text(v, out)) for k, v in metadata.items()}
        # the run's identity holds the checkout's paths, so its hash differs by checkout
        metadata.get("gradproj", {}).get("run", {}).pop("identity_sha256", None)
        return header, metadata, raw[8 + size :]
    if path.suffix == ".json":
        content = json.loads(normalised_text(raw.decode(), out))
        if isinstance(content, dict):
            content.pop("versions", None)
            content.get("blocks", {}).pop("memory_budget_bytes", None)
            for role in ("train_manifest", "test_manifest"):
                content.get(role, {}).pop("manifest_sha256", None)
            # hashes of what holds the checkout's paths: the identity and the shard files
            content.pop("identity_sha256", None)
            for shard in content.get("shards", []):
                shard.pop("sha256", None)
        return content
    return normalised_text(raw.decode(), out)


def test_outputs_match_the_golden_files_byte_for_byte(tmp_path):
    out = tmp_path / "out"
    produce(out)
    assert files(out) == files(EXPECTED)
    for name in files(EXPECTED):
        assert comparable(out / name, out) == comparable(EXPECTED / name, EXPECTED), name


def test_comparison_sees_a_changed_byte(tmp_path):
    """The comparison itself: one flipped bit in a shard's data is a difference."""
    shard = next(p for p in files(EXPECTED) if p.suffix == ".safetensors")
    copy = tmp_path / shard.name
    raw = bytearray((EXPECTED / shard).read_bytes())
    raw[-1] ^= 1
    copy.write_bytes(bytes(raw))
    assert comparable(copy, tmp_path) != comparable(EXPECTED / shard, EXPECTED)


def regenerate() -> None:
    """Write the inputs (once) and the expected outputs."""
    from tests.conftest import build_llama, build_tokenizer, conversations, write_jsonl

    INPUTS.mkdir(parents=True, exist_ok=True)
    if not MODEL.exists():
        build_llama(build_tokenizer(None), MODEL)
        write_jsonl(INPUTS / "train.jsonl", conversations(11, long_every=5))
        write_jsonl(INPUTS / "test.jsonl", conversations(17)[11:])
    shutil.rmtree(EXPECTED, ignore_errors=True)
    produce(EXPECTED)
    for lock in [*EXPECTED.rglob(".lock"), *EXPECTED.rglob(".locks"), *EXPECTED.rglob(".*.lock")]:
        shutil.rmtree(lock) if lock.is_dir() else lock.unlink()


if __name__ == "__main__":
    if "--yes" not in sys.argv:
        sys.exit("regenerating the golden files changes what the test checks: add --yes")
    regenerate()
    pytest.main([__file__, "-q"])
