"""`gradproj retrain` on a tiny model: the losses of the cached-prefix model against the full
model's, same seed same bytes, a killed run resumes to the same bytes, bad input and hostile
cases (changed data under a resumed run, two processes on one output, diverged training); and
(slow) one subset of the shipped ground truth recomputed on the bundled model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gradproj import data, models, retrain
from gradproj.cli import main
from gradproj.errors import UserError
from gradproj.gradients import pad_batch, per_example_mean_loss
from gradproj.retrain import RetrainConfig, subset_plan
from gradproj.truth import data_difference, examples_record, load_ground_truth
from tests.conftest import REPO, build_tokenizer, conversations, user_error_line, write_jsonl

SHIPPED = REPO / "examples" / "ground_truth.safetensors"
# The far test set's (examples/data/test_far.jsonl): the same command with that test set
SHIPPED_FAR = REPO / "examples" / "ground_truth_far.safetensors"


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    train = write_jsonl(root / "train.jsonl", conversations(16))
    test = write_jsonl(root / "test.jsonl", conversations(5))
    return train, test


# The output of a config whose test only reads: a RetrainConfig needs one.
UNWRITTEN = "unwritten.safetensors"


def config(tiny_llama, toy_data, output, **changes) -> RetrainConfig:
    train, test = toy_data
    options = dict(model=str(tiny_llama), train_dataset=str(train), test_dataset=str(test),
                   output=output, n_subsets=4, train_layers=1, lr=1e-2, batch_size=3,
                   threads=1)  # fmt: skip
    return RetrainConfig(**options | changes)


def cli_args(tiny_llama, train, test, output, *extra) -> list[str]:
    """`gradproj retrain` with the options of `config` (so that both make one run)."""
    return ["retrain", "--model", str(tiny_llama), "--train_dataset", str(train),
            "--test_dataset", str(test), "--output", str(output), "--n_subsets", "4",
            "--train_layers", "1", "--lr", "1e-2", "--batch_size", "3", "--threads", "1",
            *extra]  # fmt: skip


def files(root) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def refused(argv: list[str], capsys, *watched) -> str:
    """The one error line of `gradproj retrain` (exit 2, no traceback); the files under each
    watched folder (the data, a killed run's parts) are as they were."""
    before = [files(folder) for folder in watched]
    line = user_error_line(main, argv, capsys)
    assert [files(folder) for folder in watched] == before
    return line


def kill_on_the_third_subset(cfg: RetrainConfig, monkeypatch) -> None:
    """Run `cfg` and kill it (KeyboardInterrupt) as its third subset trains: two are written."""
    trained = retrain.train_subset
    calls = []

    def dies_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return trained(*args)

    monkeypatch.setattr(retrain, "train_subset", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        retrain.retrain(cfg)
    monkeypatch.undo()


@pytest.fixture
def own_data(toy_data, tmp_path):
    """Copies of the toy train and test files, in `tmp_path/data`, for a test to change."""
    folder = tmp_path / "data"
    folder.mkdir()
    return tuple(write_jsonl(folder / p.name, read_rows(p)) for p in toy_data)


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cached_prefix_losses_equal_the_full_models_losses(tiny_llama, toy_data):
    """The trained layers fed from the cache, with logits at label positions only, give the
    full model's per-example mean loss (gradients.per_example_mean_loss on all logits)."""
    cfg = config(tiny_llama, toy_data, UNWRITTEN)
    checkpoint = models.resolve_checkpoint(cfg.model, 0)
    tokenizer = models.load_tokenizer(checkpoint)
    examples, _ = retrain.read_examples(cfg, tokenizer, cfg.test_dataset, "train")
    model = models.load_model(checkpoint, "sft", torch.float64, "cpu")
    want = []
    for ex in examples:
        ids, mask, labels = pad_batch([ex], 0, "cpu")
        want.append(per_example_mean_loss(model(input_ids=ids).logits, labels, causal=True))
    states = retrain.cache_prefix_states(model, examples, first=1)
    retrain.keep_trained_layers(model, 1)
    with torch.no_grad():
        got = retrain.batch_losses(model, states, examples)  # padded: unequal lengths
    assert torch.allclose(got, torch.cat(want), rtol=1e-6, atol=0)  # both fp32 from fp64 logits


def test_subsets_are_seeded_halves_independent_of_each_other():
    mask, order = subset_plan(seed=3, subset=5, n_train=11, fraction=0.5, epochs=2)
    again, order_again = subset_plan(seed=3, subset=5, n_train=11, fraction=0.5, epochs=2)
    assert mask.sum() == 6 and (mask == again).all()
    assert all((a == b).all() for a, b in zip(order, order_again, strict=True))
    assert all(sorted(o) == np.flatnonzero(mask).tolist() for o in order)
    assert not (subset_plan(3, 6, 11, 0.5, 1)[0] == mask).all()


def test_same_seed_same_bytes_and_the_file_reads_back(tiny_llama, toy_data, tmp_path):
    first = retrain.retrain(config(tiny_llama, toy_data, tmp_path / "a.safetensors"))
    second = retrain.retrain(config(tiny_llama, toy_data, tmp_path / "b.safetensors"))
    assert first.read_bytes() == second.read_bytes()
    assert not (tmp_path / "a.safetensors.parts").exists()
    truth = load_ground_truth(first)
    assert truth.masks.shape == (4, 16) and truth.losses.shape == (4, 5)
    assert (truth.masks.sum(axis=1) == 8).all()
    assert truth.info["settings"]["n_subsets"] == 4 and truth.info["versions"]["torch"]
    assert "last 1 of 2 decoder layers" in truth.info["trained"]
    assert truth.test_ids == [f"ex_{i:03d}" for i in range(5)]
    # fine-tuning moves the losses, and differently for different subsets
    assert np.abs(truth.losses - truth.base_losses).min() > 1e-4
    assert np.ptp(truth.losses, axis=0).min() > 1e-5
    other_seed = retrain.retrain(config(tiny_llama, toy_data, tmp_path / "c.safetensors", seed=1))
    assert not (load_ground_truth(other_seed).masks == truth.masks).all()


def test_killed_run_resumes_to_the_same_bytes(tiny_llama, toy_data, tmp_path, monkeypatch):
    whole = retrain.retrain(config(tiny_llama, toy_data, tmp_path / "whole.safetensors"))
    killed = tmp_path / "killed.safetensors"
    kill_on_the_third_subset(config(tiny_llama, toy_data, killed), monkeypatch)
    parts = sorted(p.name for p in (tmp_path / "killed.safetensors.parts").iterdir())
    assert parts == [".locks", "base.safetensors", "prefix_states.safetensors", "settings.json",
                     "subset_00000.safetensors", "subset_00001.safetensors"]  # fmt: skip
    assert not killed.exists()
    retrain.retrain(config(tiny_llama, toy_data, killed))
    assert killed.read_bytes() == whole.read_bytes()


def test_parts_of_other_settings_and_bad_options_are_refused(
    tiny_llama, toy_data, tmp_path, capsys
):
    out = tmp_path / "gt.safetensors"
    parts = tmp_path / "gt.safetensors.parts"
    parts.mkdir()
    settings = config(tiny_llama, toy_data, out, lr=0.5).settings()
    (parts / "settings.json").write_text(json.dumps({k: v for k, v in settings.items()
                                                     if k != "n_subsets"}))  # fmt: skip
    train, test = toy_data
    argv = ["retrain", "--model", str(tiny_llama), "--train_dataset", str(train),
            "--test_dataset", str(test), "--output", str(out), "--train_layers", "1"]  # fmt: skip
    line = user_error_line(main, argv, capsys)
    assert "other settings (differing in batch_size, lr)" in line
    for bad, words in ((["--fraction", "1"], "--fraction"), (["--n_subsets", "1"], "--n_subsets"),
                       (["--train_layers", "3"], "the model has 2 layers")):  # fmt: skip
        other = str(tmp_path / "x.safetensors")
        line = user_error_line(main, [*argv[:-2], *bad, "--output", other], capsys)
        assert words in line
    line = user_error_line(main, [*argv[:-4], "--output", str(tmp_path / "x.json")], capsys)
    assert ".safetensors" in line
    (tmp_path / "a_file").write_text("")
    under_a_file = str(tmp_path / "a_file" / "x.safetensors")
    line = user_error_line(main, [*argv[:-2], "--output", under_a_file], capsys)
    assert f"{tmp_path / 'a_file'} is not a directory" in line


def test_a_resumed_run_over_changed_train_data_is_refused(
    tiny_llama, own_data, tmp_path, monkeypatch, capsys
):
    """Case 2 of issue 30: the parts record the examples (ids and a hash of each tokenized
    example); an edited answer or reordered rows are refused, naming the first difference, and
    the parts are left as they were. A finished file is checked the same way."""
    train, test = own_data
    out = tmp_path / "out" / "gt.safetensors"
    kill_on_the_third_subset(config(tiny_llama, own_data, out), monkeypatch)
    rows = read_rows(train)
    edited = [dict(r) for r in rows]
    edited[3]["messages"] = [*rows[3]["messages"][:-1], {"role": "assistant", "content": "No."}]
    for changed, words in ((edited, "train example 'ex_003' changed (its tokens or labels)"),
                           ([rows[1], rows[0], *rows[2:]],
                            "the train examples are in another order (position 0 holds "
                            "'ex_001', was 'ex_000')")):  # fmt: skip
        write_jsonl(train, changed)
        line = refused(cli_args(tiny_llama, train, test, out), capsys, train.parent, out.parent)
        assert "holds the parts of a run on other examples" in line and words in line
        assert not out.exists()
    # the prefix states record their examples too (a file copied from another run is refused)
    record = examples_record([], [])
    with pytest.raises(UserError, match="holds the prefix states of other examples"):
        retrain.cached_prefix_states(None, [], [], 1, out.with_name("gt.safetensors.parts"),
                                     record)  # fmt: skip
    write_jsonl(train, rows)  # the data restored, the run resumes to a fresh run's bytes
    assert main(cli_args(tiny_llama, train, test, out)) == 0
    fresh = retrain.retrain(config(tiny_llama, own_data, tmp_path / "fresh.safetensors"))
    assert out.read_bytes() == fresh.read_bytes()
    assert sorted(os.listdir(out.parent)) == [".gt.safetensors.lock", "gt.safetensors"]
    truth = load_ground_truth(out)
    assert (
        truth.info["train_sha256"]
        == examples_record(*tokenized(tiny_llama, own_data))["train_sha256"]
    )
    write_jsonl(train, edited)
    line = refused(cli_args(tiny_llama, train, test, out), capsys, train.parent, out.parent)
    assert "exists and was computed on other examples (train example 'ex_003' changed" in line
    assert out.read_bytes() == fresh.read_bytes()


def tokenized(tiny_llama, data_files):
    cfg = config(tiny_llama, data_files, UNWRITTEN)
    tokenizer = models.load_tokenizer(models.resolve_checkpoint(cfg.model, 0))
    return [retrain.read_examples(cfg, tokenizer, str(path), "train")[0] for path in data_files]


def test_the_shipped_file_of_the_older_format_is_checked_by_its_ids():
    """examples/ground_truth.safetensors (written before the examples' hashes were recorded)
    loads, and a data check compares its ids alone."""
    info = load_ground_truth(SHIPPED).info
    assert "train_sha256" not in info
    record = {f"{side}_{key}": list(info[f"{side}_ids"])
              for side in ("train", "test") for key in ("ids", "sha256")}  # fmt: skip
    assert data_difference(info, record) is None
    record["test_ids"] = record["test_ids"][:-1]
    assert data_difference(info, record) == f"test example {info['test_ids'][-1]!r} is gone"


@pytest.mark.parametrize("change", ["gained", "lost"])
def test_a_resumed_run_over_a_test_set_of_other_rows_is_one_line(
    tiny_llama, own_data, tmp_path, monkeypatch, capsys, change
):
    """Case 12: a test row more or less is refused before any part is read."""
    train, test = own_data
    out = tmp_path / "out" / "gt.safetensors"
    kill_on_the_third_subset(config(tiny_llama, own_data, out), monkeypatch)
    rows = conversations(6) if change == "gained" else conversations(4)
    write_jsonl(test, rows)
    line = refused(cli_args(tiny_llama, train, test, out), capsys, test.parent, out.parent)
    words = "test example 'ex_005' is new" if change == "gained" else "'ex_004' is gone"
    assert words in line


@pytest.mark.slow
def test_two_processes_on_one_output_share_the_work(tiny_llama, toy_data, tmp_path):
    """Case 3: two `gradproj retrain` started together on one --output both succeed, and the
    file is a single process's, byte for byte; only the file and its lock are left."""
    whole = retrain.retrain(config(tiny_llama, toy_data, tmp_path / "whole.safetensors",
                                   n_subsets=6))  # fmt: skip
    out = tmp_path / "out" / "gt.safetensors"
    command = [sys.executable, "-m", "gradproj",
               *cli_args(tiny_llama, *toy_data, out, "--n_subsets", "6")]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]  # fmt: skip
    for run in runs:
        err = run.communicate(timeout=300)[1]
        assert run.returncode == 0 and "Traceback" not in err, err
    assert out.read_bytes() == whole.read_bytes()
    assert sorted(os.listdir(out.parent)) == [".gt.safetensors.lock", "gt.safetensors"]


def test_a_parts_directory_without_settings_is_refused(tiny_llama, toy_data, tmp_path, capsys):
    """Case 3: a parts directory that does not say whose parts it holds (as an older gradproj
    left behind when a second process crashed) is not adopted by a run of another seed."""
    out = tmp_path / "out" / "gt.safetensors"
    parts = out.with_name("gt.safetensors.parts")
    parts.mkdir(parents=True)
    (parts / "subset_00000.safetensors").write_bytes(b"a subset of seed 0")
    argv = cli_args(tiny_llama, *toy_data, out, "--seed", "1")
    line = refused(argv, capsys, toy_data[0].parent, parts)
    assert f"{parts} has no readable settings.json" in line and "remove it and rerun" in line
    assert sorted(os.listdir(out.parent)) == [".gt.safetensors.lock", "gt.safetensors.parts"]


@pytest.mark.parametrize("which", ["train", "test"])
def test_duplicate_ids_are_refused(tiny_llama, own_data, tmp_path, capsys, which):
    """Case 4: ids join every later file; a repeated one is exit 2, as extract and score say."""
    by_side = dict(zip(("train", "test"), own_data, strict=True))
    rows = read_rows(by_side[which])
    write_jsonl(by_side[which], [*rows, rows[1]])
    out = tmp_path / "out" / "gt.safetensors"
    line = refused(cli_args(tiny_llama, *own_data, out), capsys, own_data[0].parent)
    assert "1 duplicate example id(s): 'ex_001' (rows 1, " in line
    assert not out.parent.exists()


@pytest.mark.parametrize("bad", [["--lr", "inf"], ["--lr", "nan"], ["--weight_decay", "inf"],
                                 ["--threads", "0"], ["--seed", "-1"]])  # fmt: skip
def test_options_out_of_range_are_refused_before_any_work(
    tiny_llama, toy_data, tmp_path, capsys, bad
):
    """Cases 5 and 11: refused by RetrainConfig on construction, before the thread count is set or
    anything is written."""
    threads = torch.get_num_threads()
    out = tmp_path / "out" / "gt.safetensors"
    line = refused(cli_args(tiny_llama, *toy_data, out, *bad), capsys, toy_data[0].parent)
    assert line.startswith(f"error: {bad[0]} must be")
    assert torch.get_num_threads() == threads and not out.parent.exists()


def test_a_diverged_training_is_refused_naming_subset_and_example(
    tiny_llama, toy_data, tmp_path, capsys
):
    """Case 5: --lr 1e30 is finite but diverges; no loss that is not finite is written."""
    out = tmp_path / "out" / "gt.safetensors"
    argv = cli_args(tiny_llama, *toy_data, out, "--lr", "1e30")
    line = refused(argv, capsys, toy_data[0].parent)
    assert "after fine-tuning on subset 0, test example 'ex_000' has a loss of nan" in line
    assert "lower --lr (now 1e+30)" in line
    parts = out.with_name("gt.safetensors.parts")
    assert not out.exists() and not list(parts.glob("subset_*"))


def test_a_fraction_that_makes_every_subset_the_whole_train_set_is_refused(
    tiny_llama, own_data, tmp_path, capsys
):
    """Case 6: 0.97 of 8 rounds to 8 (subset_size): every mask would be all ones."""
    train, test = own_data
    write_jsonl(train, read_rows(train)[:8])
    out = tmp_path / "out" / "gt.safetensors"
    argv = cli_args(tiny_llama, train, test, out, "--fraction", "0.97")
    line = refused(argv, capsys, train.parent)
    assert "--fraction 0.97 of 8 train example(s) rounds to all of them" in line
    assert not out.parent.exists()
    assert retrain.subset_size(8, 0.93) == 7  # the largest fraction that is not refused rounds


@pytest.fixture(scope="module")
def tiny_granite(tmp_path_factory):
    """A 2-layer Granite: its base model scales the input embeddings and its head divides the
    logits, outside the layers, as the real Granite models do."""
    from transformers import GraniteConfig, GraniteForCausalLM

    tokenizer = build_tokenizer(None)
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           embedding_multiplier=12.0, logits_scaling=8.0,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_granite")
    GraniteForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_model_that_does_not_fit_the_cached_prefix_is_refused(
    tiny_granite, toy_data, tmp_path, capsys
):
    """The cached-prefix loss of one test example is checked against the whole model's before
    any subset trains."""
    out = tmp_path / "out" / "gt.safetensors"
    line = refused(cli_args(tiny_granite, *toy_data, out), capsys, toy_data[0].parent)
    assert "GraniteForCausalLM does not fit gradproj retrain's cached frozen prefix" in line
    assert "test example 'ex_000' has a loss of" in line
    assert not out.exists()
    assert not list(out.with_name("gt.safetensors.parts").glob("subset_*"))


def test_the_far_sets_ground_truth_has_the_shipped_ones_settings_and_subsets():
    """examples/ground_truth_far.safetensors: the paraphrase set's command with only the test
    set changed, so the same subsets (masks) of the same train examples."""
    far, near = load_ground_truth(SHIPPED_FAR), load_ground_truth(SHIPPED)
    test_keys = {"test_dataset": "examples/data/test_far.jsonl", "test_split": "test_far"}
    assert far.info["settings"] == near.info["settings"] | test_keys
    assert far.train_ids == near.train_ids and (far.masks == near.masks).all()
    assert far.info["threads"] == near.info["threads"] == 1
    assert far.test_ids == [f"far_{i:02d}" for i in range(len(far.test_ids))]


@pytest.mark.slow
@pytest.mark.parametrize("shipped", [SHIPPED, SHIPPED_FAR], ids=["paraphrases", "far"])
def test_one_subset_of_the_shipped_ground_truth_is_recomputed(shipped):
    """Subset 0 of a shipped ground truth (examples/ground_truth.safetensors, and the far test
    set's examples/ground_truth_far.safetensors), recomputed on the bundled model from its
    recorded settings: the frozen prefix only for that subset's members and the test set."""
    truth = load_ground_truth(shipped)
    cfg = RetrainConfig(
        **truth.info["settings"] | {"output": shipped.with_name("unused.safetensors")}
    )
    torch.set_num_threads(truth.info["threads"])
    checkpoint = models.resolve_checkpoint(cfg.model, cfg.checkpoint_nr)
    tokenizer = models.load_tokenizer(checkpoint)
    train, _ = retrain.read_examples(cfg, tokenizer, str(REPO / cfg.train_dataset), cfg.train_split)
    test, _ = retrain.read_examples(cfg, tokenizer, str(REPO / cfg.test_dataset), cfg.test_split)
    assert [ex.id for ex in train] == truth.train_ids and [ex.id for ex in test] == truth.test_ids
    mask, order = subset_plan(cfg.seed, 0, len(train), cfg.fraction, cfg.epochs)
    assert (mask.astype(bool) == truth.masks[0]).all()
    model = models.load_model(checkpoint, cfg.paradigm, torch.float32, "cpu")
    first = len(retrain.decoder_layers(model)) - cfg.train_layers
    members = [train[i] for i in np.flatnonzero(mask)]
    member_states = iter(retrain.cache_prefix_states(model, members, first))
    train_states = [next(member_states) if m else None for m in mask]
    test_states = retrain.cache_prefix_states(model, test, first)
    params = retrain.keep_trained_layers(model, first)
    base = retrain.evaluate(model, test_states, test)
    assert np.allclose(base.numpy(), truth.base_losses, rtol=1e-5, atol=1e-6)
    retrain.train_subset(model, params, train_states, train, order, cfg)
    losses = retrain.evaluate(model, test_states, test)
    assert np.allclose(losses.numpy(), truth.losses[0], rtol=1e-4, atol=1e-5)


def test_retrain_keeps_and_skips_the_examples_the_extraction_does(tiny_llama, tmp_path):
    """One tokenization path: a row whose answer lies past max_seq_length is skipped by both;
    the ground truth records it in its own words (docs/formats.md), the rest are the same
    examples, token for token."""
    dataset = write_jsonl(tmp_path / "long.jsonl", conversations(8, long_every=4))
    cfg = config(tiny_llama, (dataset, dataset), tmp_path / "unused.safetensors", max_seq_length=40)
    tokenizer = models.load_tokenizer(models.resolve_checkpoint(cfg.model, 0))
    kept, skipped = retrain.read_examples(cfg, tokenizer, str(dataset), "train")
    rows, _ = data.load_rows(str(dataset), "train")
    extracted, extraction_skipped = data.Tokenization(tokenizer, "sft", 40, "0", False).examples(
        rows, 0, 0, len(rows)
    )
    assert [(ex.input_ids, ex.labels) for ex in kept] == [
        (ex.input_ids, ex.labels) for ex in extracted
    ]
    assert (
        skipped
        == [
            {"index": s["index"], "id": s["id"], "reason": "no label token"}
            for s in extraction_skipped
        ]
        != []
    )
