"""A run's manifest.json, typed (`Manifest`): read once by `gradproj.store.Run`, built by the
merge (`Manifest.merged`), its one writer.

Every field a reader uses is an attribute. A field may be absent from a manifest that the code
still accepts (None, or empty for the lists): `options` and `versions` from one rebuilt from
its shards, which do not carry them; `identity_sha256` from one of gradproj < 0.2; the target's
fields (`params_dim`, `grad_norm`, `modules`) from every run but a params run's. The JSON is
kept as it was read, so that a manifest's bytes never change by being read and written back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from gradproj.store.shards import DERIVED_FIELDS, MANIFEST, RUN_FORMAT


@dataclass(frozen=True)
class Manifest:
    """A run's manifest.json: its header (the run's options and what its target computed),
    then what the merge derives from the shards present (`DERIVED_FIELDS`)."""

    format: str | None = None
    target: str | None = None  # embeddings, params, hidden
    model: str | None = None
    checkpoint: str | None = None
    checkpoint_nr: int | None = None
    dataset: str | None = None
    split: str | None = None  # the split or slice the extraction read, e.g. train[0:100]
    paradigm: str | None = None
    mode: str | None = None  # store, store_mean
    hidden_size: int | None = None
    max_seq_length: int | None = None
    shard_size: int | None = None  # dataset rows per shard
    identity: dict | None = None  # the options that decide the run's bytes
    options: dict | None = None  # every option of the extraction (`ExtractConfig`)
    versions: dict | None = None
    identity_sha256: str | None = None  # `options_sha256` of identity and the output's name
    # what the target computed (`Target.header`)
    params_dim: int | None = None
    grad_norm: str | None = None  # exact or projected (params)
    kind: str | None = None  # full, projected, params_full, hidden
    projection: dict | None = None  # the projection's `describe()`, None when not projected
    modules: list[dict] = field(default_factory=list)  # a params run's layers, in order
    # derived from the shards on every merge
    n_examples: int = 0  # dataset rows the run stands for, kept or skipped
    complete: bool = False
    shards: list[dict] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # shards present but not accepted
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict) -> Manifest:
        known = {f.name for f in fields(cls)} - {"raw"}
        return cls(**{k: v for k, v in raw.items() if k in known and v is not None}, raw=raw)

    @classmethod
    def read(cls, run_dir: Path) -> Manifest:
        """The manifest.json of `run_dir` (its errors are the caller's: `manifest_problem`)."""
        return cls.from_dict(json.loads((Path(run_dir) / MANIFEST).read_text()))

    @classmethod
    def merged(
        cls, header: dict, n_examples: int, complete: bool, shards, examples, skipped, rejected
    ) -> Manifest:
        """The manifest a merge writes: the header, then what the shards present give
        (`rejected` only when a shard was)."""
        derived = {"n_examples": n_examples, "complete": complete, "shards": shards}
        derived |= {"examples": examples, "skipped": skipped}
        if rejected:
            derived["rejected"] = rejected
        return cls.from_dict({"format": RUN_FORMAT, **header, **derived})

    def as_dict(self) -> dict:
        """The JSON object of manifest.json, keys in the order they were read or built."""
        return dict(self.raw)

    def header(self) -> dict:
        """The fields a merge keeps: every one but those it derives from the shards."""
        return {k: v for k, v in self.raw.items() if k not in DERIVED_FIELDS}

    def lacks(self, keys: tuple[str, ...]) -> list[str]:
        """Which of `keys` the manifest does not hold at all."""
        return [key for key in keys if key not in self.raw]
