"""extract_gradients.py end to end on a tiny model: layout, manifest, resume, errors."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from gradproj import data, store
from gradproj.cli import extract_main as main
from tests.conftest import REPO, conversations, user_error_line, write_jsonl

MAX_LEN = 40


def extract(model, dataset, out, *extra, checkpoint="0"):
    argv = [str(model), str(dataset), checkpoint, "--gradients_output_path", str(out),
            "--max_seq_length", str(MAX_LEN), "--gradients_per_file", "4", *extra]  # fmt: skip
    assert main(argv) == 0


def test_layout_and_manifest(tiny_llama, sft_file, tmp_path):
    extract(tiny_llama, sft_file, tmp_path, "--random_projection", "--proj_dim", "full,16,32",
            "--proj_type", "rademacher,normal")  # fmt: skip
    for variant in ("full", "rademacher_16", "rademacher_32", "normal_16", "normal_32"):
        run = store.Run(tmp_path / variant / tiny_llama.name / "sft" / "train" / "0")
        m = run.manifest
        assert m.complete and run.verify().ok
        assert [s["file"] for s in m.shards] == [
            "0_4.safetensors", "4_8.safetensors", "8_12.safetensors", "12_13.safetensors"
        ]  # fmt: skip
        assert {"options", "versions", "identity", "examples", "skipped"} <= set(m.as_dict())
        assert all({"id", "tokens", "label_tokens", "grad_norm"} <= set(e) for e in m.examples)
        assert len(m.examples) + len(m.skipped) == 13


def test_shards_round_trip_with_ids(tiny_llama, sft_file, tmp_path):
    extract(tiny_llama, sft_file, tmp_path, "--random_projection", "--proj_dim", "full,16")
    base = tmp_path / "{}" / tiny_llama.name / "sft" / "train" / "0"
    full = store.Run(str(base).format("full"))
    proj = store.Run(str(base).format("rademacher_16"))
    ids, matrix = proj.load_matrix()
    assert ids == full.ids == [e["id"] for e in full.manifest.examples]
    assert matrix.shape == (len(ids), 16)
    for i, entry in enumerate(full.manifest.examples):
        dense = full.dense_vector(i)
        assert dense.shape == (MAX_LEN * 32,)
        assert dense.double().norm().item() == pytest.approx(entry["grad_norm"], rel=1e-6)
        assert dense.view(MAX_LEN, 32)[entry["tokens"] :].abs().sum() == 0


def test_all_masked_example_is_reported_not_stored(tiny_llama, sft_file, tmp_path, capsys):
    extract(tiny_llama, sft_file, tmp_path)
    run = store.Run(tmp_path / "full" / tiny_llama.name / "sft" / "train" / "0")
    skipped = {s["id"]: s["reason"] for s in run.skipped}
    # conftest makes every 5th conversation's user turn longer than MAX_LEN tokens
    assert set(skipped) == {"ex_004", "ex_009"}
    assert all("max_seq_length=40" in r for r in skipped.values())
    assert not set(skipped) & set(run.ids)
    captured = capsys.readouterr()
    assert "2 skipped" in captured.out
    assert "warning: skipped example 'ex_004': no label token" in captured.err


def test_resume_recomputes_only_the_missing_shard(tiny_llama, sft_file, tmp_path):
    extract(tiny_llama, sft_file, tmp_path, "--random_projection", "--proj_dim", "full,16")
    runs = [
        tmp_path / v / tiny_llama.name / "sft" / "train" / "0" for v in ("full", "rademacher_16")
    ]
    before = {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for r in runs for p in r.glob("*.safetensors")
    }
    (runs[1] / "4_8.safetensors").unlink()
    extract(tiny_llama, sft_file, tmp_path, "--random_projection", "--proj_dim", "full,16")
    for path, (content, mtime) in before.items():
        assert path.read_bytes() == content
        rewritten = path.name == "4_8.safetensors"
        assert (path.stat().st_mtime_ns != mtime) == rewritten
    assert all(store.Run(r).verify().ok for r in runs)


def test_corrupt_shard_is_detected_and_recomputed(tiny_llama, sft_file, tmp_path):
    extract(tiny_llama, sft_file, tmp_path)
    run_path = tmp_path / "full" / tiny_llama.name / "sft" / "train" / "0"
    shard = run_path / "8_12.safetensors"
    good = shard.read_bytes()
    corrupted = bytearray(good)
    corrupted[-5] ^= 0xFF
    shard.write_bytes(bytes(corrupted))
    report = store.Run(run_path).verify()
    assert list(report.corrupt) == ["8_12.safetensors"] and not report.ok
    assert main(["--verify", str(run_path)]) == 1
    extract(tiny_llama, sft_file, tmp_path)
    assert shard.read_bytes() == good


def test_verify_says_what_part_of_the_split_a_run_covers(tiny_llama, sft_file, tmp_path, capsys):
    extract(tiny_llama, sft_file, tmp_path / "part", "--limit", "5")
    extract(tiny_llama, sft_file, tmp_path / "whole")
    capsys.readouterr()
    for name, expected in (
        (
            "part",
            "covers examples 0-4 of 13 of split 'train' (--limit 5): the other 8 were never read",
        ),
        ("whole", "covers examples 0-12 of 13 of split 'train'"),
    ):
        assert main(["--verify", str(tmp_path / name)]) == 0
        assert capsys.readouterr().out.rstrip().endswith(expected), name


def test_store_mean_equals_mean_of_stored_vectors(tiny_llama, sft_file, tmp_path):
    args = ("--random_projection", "--proj_dim", "full,16")
    extract(tiny_llama, sft_file, tmp_path, *args)
    extract(tiny_llama, sft_file, tmp_path, *args, "--mode", "store_mean")
    base = tmp_path / "{}" / tiny_llama.name / "sft" / "train" / "0"
    _, matrix = store.Run(str(base).format("rademacher_16")).load_matrix()
    _, mean = store.Run(str(base).format("rademacher_16_mean")).load_matrix()
    torch.testing.assert_close(mean[0], matrix.double().mean(0).float())
    full = store.Run(str(base).format("full"))
    dense = torch.stack([full.dense_vector(i) for i in range(len(full.ids))]).double()
    full_mean = store.Run(str(base).format("full_mean")).dense_vector(0)
    torch.testing.assert_close(full_mean.double(), dense.mean(0), rtol=1e-6, atol=1e-9)


def test_split_slice_and_limit(tiny_llama, sft_file, tmp_path):
    extract(tiny_llama, sft_file, tmp_path, "--dataset_split", "train[2:9]", "--limit", "5")
    run = store.Run(tmp_path / "full" / tiny_llama.name / "sft" / "train_2_9" / "0")
    assert run.manifest.n_examples == 5
    assert run.ids == ["ex_002", "ex_003", "ex_005", "ex_006"]  # ex_004 is too long
    # indices are rows of the split, as the original's dataset[i], not positions in the slice
    assert [e["index"] for e in run.manifest.examples] == [2, 3, 5, 6]
    assert [s["index"] for s in run.skipped] == [4]
    index = torch.cat([shard.index for shard in run.iter_shards()])
    assert index.tolist() == [2, 3, 5, 6]


def test_sft_masks_all_but_assistant_turns(tiny_llama_chatml, tiny_llama):
    for model in (tiny_llama_chatml, tiny_llama):
        tokenizer = AutoTokenizer.from_pretrained(model)
        data.ensure_chat_template(tokenizer)
        row = conversations(1)[0]  # two exchanges
        ex = data.tokenize_sft(tokenizer, row, 0, 4096)
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == ex.input_ids
        spans = list(zip(enc["offset_mapping"], ex.labels, strict=True))
        labelled = [text[a:b] for (a, b), lab in spans if lab != -100]
        end = "<|im_end|>\n" if model == tiny_llama_chatml else "</s>\n"
        answers = [m["content"] + end for m in row["messages"] if m["role"] == "assistant"]
        assert "".join(labelled) == "".join(answers)
        # the labels are contiguous runs exactly covering each answer, nothing else
        runs, current = [], ""
        for (a, b), lab in spans:
            if lab != -100:
                current += text[a:b]
            elif current:
                runs.append(current)
                current = ""
        assert runs + ([current] if current else []) == answers


def test_pre_and_mlm_paradigms_run(tiny_llama, tiny_bert, text_file, tmp_path):
    extract(tiny_llama, text_file, tmp_path, "--paradigm", "pre")
    extract(tiny_bert, text_file, tmp_path, "--paradigm", "mlm")
    for model in (tiny_llama, tiny_bert):
        run = store.Run(tmp_path / "full" / model.name / "text" / "train" / "0")
        assert run.manifest.complete and len(run.ids) == 9


def test_mlm_masking_is_deterministic_per_document_and_checkpoint(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    row = {"id": "doc", "text": " ".join(["the quick brown fox jumps over the lazy dog"] * 6)}
    a = data.tokenize_mlm(tokenizer, row, 0, 512, "0")
    b = data.tokenize_mlm(tokenizer, row, 7, 512, "0")  # another position in another dataset
    c = data.tokenize_mlm(tokenizer, row, 0, 512, "1")
    assert a.labels == b.labels and a.labels != c.labels
    assert 0.05 < a.label_tokens / a.length < 0.3


def bad(argv, capsys) -> str:
    return user_error_line(main, argv, capsys)


def test_bad_inputs_get_one_line_and_exit_2(tiny_llama, sft_file, text_file, tmp_path, capsys):
    import datasets

    m, d, out = str(tiny_llama), str(sft_file), ["--gradients_output_path", str(tmp_path)]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(conversations(2))}).save_to_disk(dd)
    cases = {
        "HF_HUB_OFFLINE": ["no-such-org/no-such-model", d, "0", *out],
        "neither a local path": [m, "no-such-org/no-such-dataset", "0", *out],
        "split 'validation' not in": [m, str(dd), "0", "--dataset_split", "validation", *out],
        "not valid": [m, d, "0", "--dataset_split", "train[a:b]", *out],
        "'messages'": [m, str(text_file), "0", *out],
        "unknown paradigm": [m, d, "0", "--paradigm", "rlhf", *out],
        ">= 1": [m, d, "0", "--random_projection", "--proj_dim", "0", *out],
        "out of range": [m, d, "3", *out],
    }
    for needle, argv in cases.items():
        assert needle in bad(argv, capsys), needle
    extract(tiny_llama, sft_file, tmp_path, "--limit", "3")
    assert "different options" in bad([m, d, "0", "--max_seq_length", "20", *out], capsys)


def test_cli_error_has_no_traceback(tmp_path):
    missing_model, missing_data = str(tmp_path / "nope"), str(tmp_path / "x.jsonl")
    proc = subprocess.run(
        [sys.executable, "extract_gradients.py", missing_model, missing_data, "0"],
        cwd=REPO, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: ")


def test_local_checkpoints_are_indexed_in_order(tiny_llama, sft_file, tmp_path):
    root = tmp_path / "model"
    for step in (100, 20):  # numeric order, not string order
        (root / f"checkpoint-{step}").mkdir(parents=True)
        for f in tiny_llama.iterdir():
            (root / f"checkpoint-{step}" / f.name).write_bytes(f.read_bytes())
    extract(root, sft_file, tmp_path / "out", "--limit", "2", checkpoint="1")
    manifest = json.loads(
        (tmp_path / "out" / "full" / "model" / "sft" / "train" / "1" / "manifest.json").read_text()
    )
    assert manifest["checkpoint"] == "checkpoint-100"


def test_model_loads_without_network_or_token(tiny_llama, sft_file, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    extract(tiny_llama, sft_file, tmp_path, "--limit", "2")


def test_no_token_is_written_anywhere(tiny_llama, sft_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    extract(tiny_llama, sft_file, tmp_path, "--limit", "2")
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != sft_file:
            assert b"hf_secret_value_123" not in path.read_bytes()


def test_dataset_from_save_to_disk_directory(tiny_llama, tmp_path):
    import datasets

    rows = conversations(3)
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
    extract(tiny_llama, tmp_path / "dd", tmp_path / "out", "--dataset_split", "test")
    assert store.Run(tmp_path / "out" / "full" / tiny_llama.name / "dd" / "test" / "0").ids == [
        r["id"] for r in rows
    ]


def test_ultrachat_nested_messages(tiny_llama, tmp_path):
    rows = [
        {"prompt": "hi", "prompt_id": f"p{i}", "messages": [r["messages"]]}
        for i, r in enumerate(conversations(3))
    ]
    path = write_jsonl(tmp_path / "uc.jsonl", rows)
    extract(tiny_llama, path, tmp_path / "out", "--dataset_split", "test_sft")
    assert store.Run(tmp_path / "out" / "full" / tiny_llama.name / "uc" / "test_sft" / "0").ids == [
        "p0", "p1", "p2"
    ]  # fmt: skip


def shard_bytes(run_dir) -> dict:
    """Each shard of a run: its tensors' bytes and its metadata (examples, skipped, checksum)."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.glob("*.safetensors"))}


def test_several_targets_in_one_pass_write_what_separate_passes_write(
    tiny_llama, sft_file, tmp_path
):
    """One pass for embeddings (full and projected), params (kronecker) and hidden states gives
    byte-identical shards, and the same manifests apart from the options given, as a pass per
    target."""
    projections = ("--random_projection", "--proj_dim", "full,16", "--proj_type", "rademacher")
    extract(tiny_llama, sft_file, tmp_path / "one", "--target", "embeddings,params,hidden",
            *projections)  # fmt: skip
    extract(tiny_llama, sft_file, tmp_path / "apart", *projections)
    extract(tiny_llama, sft_file, tmp_path / "apart", "--target", "params")
    extract(tiny_llama, sft_file, tmp_path / "apart", "--target", "hidden")
    variants = ("full", "rademacher_16", "params_kronecker_16x16", "hidden")
    for variant in variants:
        one, apart = (tmp_path / side / variant / tiny_llama.name / "sft" / "train" / "0"
                      for side in ("one", "apart"))  # fmt: skip
        assert shard_bytes(one) == shard_bytes(apart) != {}, variant
        manifests = [store.Run(run).manifest.as_dict() for run in (one, apart)]
        for manifest in manifests:
            manifest.pop("options")
        assert manifests[0] == manifests[1], variant


def test_target_list_is_checked(tiny_llama, sft_file, tmp_path, capsys):
    line = bad([str(tiny_llama), str(sft_file), "0", "--target", "embeddings,embeddings"], capsys)
    assert "each once" in line
    line = bad([str(tiny_llama), str(sft_file), "0", "--target", "params,grads"], capsys)
    assert "--target 'params,grads'" in line
