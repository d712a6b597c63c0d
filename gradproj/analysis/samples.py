"""How the train and test samples are drawn, and what extraction will do with each example.

Everything here runs before extraction (tokenizer only, no model), so that examples that will be
truncated or carry no loss token at a given `max_seq_length` are known in advance.
"""

from pathlib import Path

import datasets
import pandas as pd

from gradproj.data import example_id, label_positions, tokenize

UNTRUNCATED = 10**9  # a max_seq_length no example reaches: gives the full token count


def random_sample(ds: datasets.Dataset, n: int, seed: int = 42) -> datasets.Dataset:
    """n examples drawn at random with `seed` (the original's train sample: shuffle, take n)."""
    return ds.shuffle(seed=seed).select(range(min(n, len(ds))))


def first_n(ds: datasets.Dataset, n: int) -> datasets.Dataset:
    """The first n examples (the original's test sample)."""
    return ds.select(range(min(n, len(ds))))


def length_table(
    tokenizer, ds: datasets.Dataset, max_seq_length: int, paradigm: str = "sft"
) -> pd.DataFrame:
    """Per example: token count, tokens kept, loss tokens kept, and whether it will be truncated
    or give an all-zero gradient (no loss token survives truncation) at `max_seq_length`."""
    rows = []
    for index, row in enumerate(ds):
        whole = tokenize(tokenizer, row, index, paradigm, UNTRUNCATED)
        kept = tokenize(tokenizer, row, index, paradigm, max_seq_length)
        loss_tokens = label_positions(kept, paradigm)
        rows.append(
            {
                "id": example_id(row, index),
                "tokens": whole.length,
                "tokens_kept": kept.length,
                "loss_tokens_kept": loss_tokens,
                "truncated": whole.length > max_seq_length,
                "zero_gradient": loss_tokens == 0,
            }
        )
    return pd.DataFrame(rows)


def length_histogram(tables: dict[str, pd.DataFrame], max_seq_length: int, path: Path | None):
    """Histogram of token counts per sample, with max_seq_length marked; saved if `path`."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    for name, table in tables.items():
        ax.hist(table.tokens, bins=30, alpha=0.6, label=f"{name} (n={len(table)})")
    ax.axvline(max_seq_length, color="k", linestyle="--", label=f"max_seq_length={max_seq_length}")
    ax.set_xlabel("tokens per example (chat template applied)")
    ax.set_ylabel("examples")
    ax.legend(fontsize="small")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
