"""The far test set (examples/data/test_far.jsonl): new questions, not paraphrases, each naming
the train examples that teach the same skill, fact or answer format (`related_ids`), and sharing
few words with any train conversation: no far conversation's BM25 score against a train
conversation reaches the lowest score of a paraphrase (examples/data/test.jsonl) against its
source, unless its row documents why in an `exception` field."""

import json
from pathlib import Path

import numpy as np
import pytest

from gradproj.analysis.retrieval import bm25_scores
from gradproj.data import conversation_text

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sets():
    return rows("train.jsonl"), rows("test.jsonl"), rows("test_far.jsonl")


def test_far_rows_have_the_test_sets_shape_and_name_existing_train_examples(sets):
    train, paraphrases, far = sets
    train_ids = {r["id"] for r in train}
    assert len(far) >= 60
    assert [r["prompt_id"] for r in far] == [f"far_{i:02d}" for i in range(len(far))]
    for row in far:
        assert row["prompt"] == row["messages"][0]["content"]
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, row["prompt_id"]
        related = row["related_ids"]
        assert isinstance(related, list) and related, row["prompt_id"]
        assert len(set(related)) == len(related) and set(related) <= train_ids, row["prompt_id"]
    asked = {r["messages"][0]["content"].strip().lower() for r in train + paraphrases}
    assert not {r["prompt"].strip().lower() for r in far} & asked


def test_no_far_conversation_is_as_close_to_a_train_one_as_a_paraphrase_to_its_source(sets):
    train, paraphrases, far = sets
    column = {r["id"]: j for j, r in enumerate(train)}
    corpus = [conversation_text(r) for r in train]
    to_source = bm25_scores(corpus, [conversation_text(r) for r in paraphrases])
    floor = min(to_source[i, column[r["source_id"]]] for i, r in enumerate(paraphrases))
    closest = bm25_scores(corpus, [conversation_text(r) for r in far]).max(axis=1)
    too_close = {
        r["prompt_id"]: round(float(s), 1)
        for r, s in zip(far, closest, strict=True)
        if s >= floor and not r.get("exception")
    }
    assert not too_close, f"BM25 at or above {floor:.1f} (a paraphrase's) without an exception"
    assert np.isfinite(closest).all()
