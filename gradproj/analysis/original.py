"""The original study's pipeline, emulated step by step from this project's full gradients.

Each habit of the original is one switch in `OriginalSteps`, applied only on the side where the
original had it, so that its effect on the ranking agreement can be measured alone and together
(the ablation). The full side is the reference, the projected side the candidate.

- `fp16_model` (both sides): gradients of the model run in fp16 (`torch_dtype=torch.float16`),
  from full runs extracted with `--dtype fp16`; without them, fp32 gradients rounded to fp16.
- `fp16_projection_input` (projected side): TRAK's CUDA kernel rounds its input to fp16.
- `unscaled_projection` (projected side): TRAK's kernel leaves out 1/sqrt(k).
- `fp32_projected_scores` (projected side): TRAK writes fp32 and `explain.py` scored the stored
  fp32 vectors elementwise on CPU (see `explain_scores`); an all-zero vector has cosine 0 there.
- `fp16_full_storage` (full side): full gradients `.half()`-ed into the files.
- `fp16_full_scores` (full side): `explain.py`'s elementwise scores in fp16 on the fp16 files
  (implies the storage): each product rounded to fp16, and `F.normalize` turns an all-zero
  gradient into NaN because its eps underflows.
- `zero_gradient` (both sides): the train set holds one all-zero gradient (the original's
  `open_orca_t0.1598436`, whose assistant turn was truncated away) at the original's relative
  position in the file order, row 570 of 1,000.
- `list_sort_ranks` (both sides): per test example a list in dataset order sorted with
  `list.sort(key=score, reverse=True)` (a NaN key leaves it only piecewise sorted); the notebook
  then drops the zero gradient's id and reads the list position as the rank.

Without `list_sort_ranks`, ranks come from the scores and the zero gradient is excluded, as this
project excludes it; without the fp16 and fp32 scoring steps, scores are exact (fp64).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from gradproj.analysis.metrics import descending_ranks, kendall_tau_b

# project(list of [len, hidden] fp32 tensors) -> {k: fp32 [B, k]}, scaled so E<Pa,Pb> = <a,b>.
ProjectFn = Callable[[list[torch.Tensor]], dict[int, torch.Tensor]]

# The original's train set: the all-zero gradient's id and its row in the 1,000-row file.
ZERO_GRADIENT_ID = "open_orca_t0.1598436"
ZERO_GRADIENT_ROW, ORIGINAL_TRAIN_ROWS = 570, 1000


@dataclass(frozen=True)
class OriginalSteps:
    """Which of the original pipeline's steps to apply (all off = this project's pipeline)."""

    fp16_model: bool = False
    fp16_projection_input: bool = False
    unscaled_projection: bool = False
    fp32_projected_scores: bool = False
    fp16_full_storage: bool = False
    fp16_full_scores: bool = False
    zero_gradient: bool = False
    list_sort_ranks: bool = False

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def all(cls) -> "OriginalSteps":
        return cls(**{name: True for name in cls.names()})


# The NaN's path alone: the zero gradient, fp16 full cosine, and the lists sorted with it.
NAN_MECHANISM = OriginalSteps(zero_gradient=True, fp16_full_scores=True, list_sort_ranks=True)


def ablation_variants() -> dict[str, OriginalSteps]:
    """`none`, each step alone, the NaN's path alone, `exact_original`, and `exact_original`
    without each step (which steps it cannot do without)."""
    variants = {"none": OriginalSteps()}
    variants |= {name: OriginalSteps(**{name: True}) for name in OriginalSteps.names()}
    variants["nan_mechanism"] = NAN_MECHANISM
    variants["exact_original"] = OriginalSteps.all()
    variants |= {
        f"exact_original_without_{name}": replace(OriginalSteps.all(), **{name: False})
        for name in OriginalSteps.names()
    }
    return variants


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 and back to fp32 (small values flush to 0, large ones become inf)."""
    return x.to(torch.float16).to(torch.float32)


def unscale(projected: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """TRAK's kernel leaves out the 1/sqrt(k) of this project's projections."""
    return {k: v * math.sqrt(k) for k, v in projected.items()}


def project_like_original(
    project: ProjectFn, grads: list[torch.Tensor], steps: OriginalSteps
) -> dict[int, torch.Tensor]:
    """Projected fp32 vectors per dim, with TRAK's fp16 input rounding and missing 1/sqrt(k)."""
    if steps.fp16_projection_input:
        grads = [round_fp16(g) for g in grads]
    projected = project(grads)
    return unscale(projected) if steps.unscaled_projection else projected


def explain_scores(test: torch.Tensor, train: torch.Tensor, function: str) -> np.ndarray:
    """`[n_test, n_train]` scores exactly as `explain.py` computed them, in the inputs' dtype.

    On CPU, per test example: `torch.sum(train * test_row, dim=-1)` for dot, the same on
    `F.normalize(., p=2, dim=-1)` for cosine. Elementwise, not a matmul: in fp16 every product is
    rounded to fp16 before the sum, and F.normalize's eps (1e-12) underflows, so an all-zero
    vector gives NaN; in fp32 it gives zeros.
    """
    test, train = test.cpu(), train.cpu()
    if function == "cosine":
        train = F.normalize(train, p=2, dim=-1)
    rows = []
    for row in test:
        if function == "cosine":
            row = F.normalize(row, p=2, dim=-1)
        rows.append(torch.sum(train * row, dim=-1))
    return torch.stack(rows).double().numpy()


def exact_scores(test: torch.Tensor, train: torch.Tensor, function: str) -> np.ndarray:
    """fp64 scores; a zero vector's cosine is 0 (F.normalize's eps), never NaN."""
    test, train = test.double().cpu(), train.double().cpu()
    if function == "cosine":
        test, train = F.normalize(test, dim=1), F.normalize(train, dim=1)
    return (test @ train.T).numpy()


def full_scores(test: torch.Tensor, train: torch.Tensor, function: str, steps: OriginalSteps):
    """The reference's scores: fp16 files scored elementwise in fp16, or exactly."""
    if steps.fp16_full_scores:
        return explain_scores(test.half(), train.half(), function)
    if steps.fp16_full_storage:
        test, train = round_fp16(test), round_fp16(train)
    return exact_scores(test, train, function)


def projected_scores(test: torch.Tensor, train: torch.Tensor, function: str, steps: OriginalSteps):
    """The candidate's scores: the fp32 files scored elementwise in fp32, or exactly."""
    if steps.fp32_projected_scores:
        return explain_scores(test.float(), train.float(), function)
    return exact_scores(test, train, function)


def original_file_order(scores: np.ndarray) -> list[int]:
    """Train rows in the order of the original's JSON list: `list.sort(key=score, reverse=True)`
    on a list in dataset order. A NaN key compares False against everything, so above 64 items,
    where the sort merges runs, it leaves the list only piecewise sorted."""
    keys = [float(s) for s in scores]
    order = list(range(len(keys)))
    order.sort(key=lambda j: keys[j], reverse=True)
    return order


def file_order_ranks(scores: np.ndarray, drop: int | None = None) -> np.ndarray:
    """Per row: each train row's position in the sorted list once row `drop` is removed from it
    (the notebook's id filter); the dropped row's rank is NaN."""
    ranks = np.full(scores.shape, np.nan)
    for i, row in enumerate(scores):
        order = [j for j in original_file_order(row) if j != drop]
        ranks[i, order] = np.arange(len(order))
    return ranks


def score_ranks(scores: np.ndarray, drop: int | None = None) -> np.ndarray:
    """Per row: descending rank by score among the finite scores, row `drop` excluded (NaN)."""
    ranks = np.full(scores.shape, np.nan)
    for i, row in enumerate(scores):
        keep = np.isfinite(row)
        if drop is not None:
            keep[drop] = False
        ranks[i, keep] = descending_ranks(row[keep][None, :])[0]
    return ranks


def ranks_like_original(scores: np.ndarray, steps: OriginalSteps, drop: int | None) -> np.ndarray:
    return file_order_ranks(scores, drop) if steps.list_sort_ranks else score_ranks(scores, drop)


def rank_kendall(reference_ranks: np.ndarray, candidate_ranks: np.ndarray) -> np.ndarray:
    """Kendall tau-b per row over the train examples ranked (not dropped) on both sides."""
    taus = np.full(reference_ranks.shape[0], np.nan)
    for i, (ref, cand) in enumerate(zip(reference_ranks, candidate_ranks, strict=True)):
        keep = ~np.isnan(ref) & ~np.isnan(cand)
        if keep.sum() >= 2:
            # Ranks ascend with influence falling; negate both so larger = more influential.
            taus[i] = kendall_tau_b(-ref[keep][None, :], -cand[keep][None, :])[0]
    return taus


def zero_gradient_position(n_train: int) -> int:
    """Row of the zero gradient among n_train + 1 rows, at the original's relative position."""
    return round(ZERO_GRADIENT_ROW * (n_train + 1) / ORIGINAL_TRAIN_ROWS)


def with_zero_gradient(train: torch.Tensor) -> torch.Tensor:
    """`[n, d]` -> `[n + 1, d]` with an all-zero row at `zero_gradient_position(n)`."""
    at = zero_gradient_position(len(train))
    return torch.cat([train[:at], train.new_zeros(1, train.shape[1]), train[at:]])


@dataclass
class GradientPair:
    """Full gradients of the train and test examples: ragged `[len, hidden]` rows per example."""

    train_ids: list[str]
    train_rows: list[torch.Tensor]
    test_ids: list[str]
    test_rows: list[torch.Tensor]
    max_seq_length: int

    def dense(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """`[n, max_seq_length * hidden]` fp32 zero-padded flattened gradients."""
        hidden = rows[0].shape[1]
        out = torch.zeros(len(rows), self.max_seq_length * hidden)
        for i, r in enumerate(rows):
            out[i, : r.numel()] = r.float().flatten()
        return out

    def rounded_to_fp16(self) -> "GradientPair":
        """Stand-in for an fp16 model's gradients: these gradients rounded to fp16."""
        return replace(
            self,
            train_rows=[round_fp16(r) for r in self.train_rows],
            test_rows=[round_fp16(r) for r in self.test_rows],
        )


@dataclass
class AblationRow:
    variant: str
    function: str
    projection_type: str
    dim: int
    kendall: np.ndarray  # per test example
    nan_scores: int  # NaN scores on either side, summed over test examples
    candidate_score_std: float  # mean over test examples of the std of train scores


class Emulation:
    """Both sides of every variant, each computed once and shared by the variants needing it.

    `fp16_gradients`: the gradients of an fp16 model (runs extracted with `--dtype fp16`);
    None = the fp32 gradients rounded to fp16.
    """

    def __init__(self, gradients: GradientPair, project: ProjectFn, fp16_gradients=None):
        self.sources = {False: gradients, True: fp16_gradients or gradients.rounded_to_fp16()}
        self.fp16_is_rounded = fp16_gradients is None
        self.project = project
        self._cache: dict = {}

    def _cached(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _dense(self, fp16_model: bool, split: str) -> torch.Tensor:
        pair = self.sources[fp16_model]
        rows = pair.train_rows if split == "train" else pair.test_rows
        return self._cached(("dense", fp16_model, split), lambda: pair.dense(rows))

    @staticmethod
    def _rounded_input(steps: OriginalSteps) -> bool:
        return steps.fp16_projection_input and not steps.fp16_model  # fp16 input: a no-op

    def _projections(self, steps: OriginalSteps, split: str) -> dict[int, torch.Tensor]:
        scaled = self._all_projections()[(steps.fp16_model, self._rounded_input(steps), split)]
        return unscale(scaled) if steps.unscaled_projection else scaled  # a factor: no reprojecting

    def _all_projections(self) -> dict[tuple[bool, bool, str], dict[int, torch.Tensor]]:
        """{(fp16 model, fp16-rounded input, split): projected vectors per dim}, every input the
        variants project, in ONE call to `project`: generating the random matrix, not the
        product, is the projection's cost (five sixths of the emulation's time when each input
        was projected alone), and one call generates it once for all of them."""

        def compute():
            inputs = {}
            for fp16_model, pair in self.sources.items():
                for split in ("train", "test"):
                    rows = pair.train_rows if split == "train" else pair.test_rows
                    inputs[(fp16_model, False, split)] = rows
                    if not fp16_model and not self.fp16_is_rounded:
                        inputs[(False, True, split)] = [round_fp16(r) for r in rows]
            flat = [row for rows in inputs.values() for row in rows]
            projected = self.project(flat)
            out, start = {}, 0
            for key, rows in inputs.items():
                out[key] = {k: v[start : start + len(rows)] for k, v in projected.items()}
                start += len(rows)
            if self.fp16_is_rounded:  # the fp16 stand-in IS the fp32 gradients rounded to fp16
                for split in ("train", "test"):
                    out[(False, True, split)] = out[(True, False, split)]
            return out

        return self._cached("projected", compute)

    def reference_scores(self, steps: OriginalSteps, function: str) -> np.ndarray:
        def compute():
            train = self._dense(steps.fp16_model, "train")
            train = with_zero_gradient(train) if steps.zero_gradient else train
            return full_scores(self._dense(steps.fp16_model, "test"), train, function, steps)

        fp16_files = steps.fp16_full_storage or steps.fp16_full_scores  # fp16 scores: fp16 files
        key = ("full", function, steps.fp16_model, steps.zero_gradient, fp16_files)
        return self._cached((*key, steps.fp16_full_scores), compute)

    def candidate_scores(self, steps: OriginalSteps, function: str) -> dict[int, np.ndarray]:
        def compute():
            test, train = self._projections(steps, "test"), self._projections(steps, "train")
            scores = {}
            for dim in sorted(test):
                vectors = with_zero_gradient(train[dim]) if steps.zero_gradient else train[dim]
                scores[dim] = projected_scores(test[dim], vectors, function, steps)
            return scores

        # the steps the candidate side reads; variants differing elsewhere share its scores
        # (the elementwise fp32 scoring is the emulation's slowest part after the fp16 one)
        key = ("candidate", function, steps.fp16_model, self._rounded_input(steps))
        key += (steps.unscaled_projection, steps.zero_gradient, steps.fp32_projected_scores)
        return self._cached(key, compute)


def run_ablation(
    gradients: GradientPair,
    project: ProjectFn,
    projection_type: str,
    functions: tuple[str, ...] = ("dot", "cosine"),
    variants: dict[str, OriginalSteps] | None = None,
    fp16_gradients: GradientPair | None = None,
) -> list[AblationRow]:
    """Kendall tau of every variant's projected ranking against its full-gradient ranking."""
    variants = variants or ablation_variants()
    emulation = Emulation(gradients, project, fp16_gradients)
    drop_at = zero_gradient_position(len(gradients.train_ids))
    rows = []
    for name, steps in variants.items():
        drop = drop_at if steps.zero_gradient else None
        for function in functions:
            ref_scores = emulation.reference_scores(steps, function)
            ref_ranks = ranks_like_original(ref_scores, steps, drop)
            for dim, cand in emulation.candidate_scores(steps, function).items():
                rows.append(
                    AblationRow(
                        variant=name,
                        function=function,
                        projection_type=projection_type,
                        dim=dim,
                        kendall=rank_kendall(ref_ranks, ranks_like_original(cand, steps, drop)),
                        nan_scores=int(np.isnan(cand).sum() + np.isnan(ref_scores).sum()),
                        candidate_score_std=float(np.nanmean(np.nanstd(cand, axis=1))),
                    )
                )
    return rows
