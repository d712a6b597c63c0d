"""`gradproj retrain` on a tiny model: the losses of the cached-prefix model against the full
model's, same seed same bytes, a killed run resumes to the same bytes, bad input; and (slow) one
subset of the shipped ground truth recomputed on the bundled model."""

import json

import numpy as np
import pytest
import torch

from gradproj import models, retrain
from gradproj.cli import main
from gradproj.gradients import pad_batch, per_example_mean_loss
from gradproj.retrain import RetrainConfig, load_ground_truth, subset_plan
from tests.conftest import REPO, conversations, user_error_line, write_jsonl

SHIPPED = REPO / "examples" / "ground_truth.safetensors"


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    train = write_jsonl(root / "train.jsonl", conversations(16))
    test = write_jsonl(root / "test.jsonl", conversations(5))
    return train, test


def config(tiny_llama, toy_data, output, **changes) -> RetrainConfig:
    train, test = toy_data
    options = dict(model=str(tiny_llama), train_dataset=str(train), test_dataset=str(test),
                   output=output, n_subsets=4, train_layers=1, lr=1e-2, batch_size=3,
                   threads=1)  # fmt: skip
    return RetrainConfig(**options | changes)


def test_cached_prefix_losses_equal_the_full_models_losses(tiny_llama, toy_data):
    """The trained layers fed from the cache, with logits at label positions only, give the
    full model's per-example mean loss (gradients.per_example_mean_loss on all logits)."""
    cfg = config(tiny_llama, toy_data, None)
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
    trained = retrain.train_subset
    calls = []

    def dies_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return trained(*args)

    monkeypatch.setattr(retrain, "train_subset", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        retrain.retrain(config(tiny_llama, toy_data, killed))
    monkeypatch.undo()
    parts = sorted(p.name for p in (tmp_path / "killed.safetensors.parts").iterdir())
    assert parts == ["base.safetensors", "prefix_states.safetensors", "settings.json",
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


@pytest.mark.slow
def test_one_subset_of_the_shipped_ground_truth_is_recomputed():
    """Subset 0 of examples/ground_truth.safetensors, recomputed on the bundled model from its
    recorded settings: the frozen prefix only for that subset's members and the test set."""
    truth = load_ground_truth(SHIPPED)
    cfg = RetrainConfig(
        **truth.info["settings"] | {"output": SHIPPED.with_name("unused.safetensors")}
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
