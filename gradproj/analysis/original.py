"""The original study's pipeline, emulated step by step from full-precision gradients.

Each numerical habit of the original is one switch in `OriginalSteps`, so that its effect on the
ranking agreement can be measured alone and in combination (the ablation):

- `fp16_projection_input`: gradients rounded to fp16 before projection (TRAK's CUDA kernel).
- `unscaled_projection`: projections not divided by sqrt(k) (TRAK's kernel); this changes no
  ranking by itself but lets fp16 storage and fp16 products overflow at large k.
- `fp16_storage`: vectors (full and projected) stored in fp16 (the original's torch.save files).
- `fp16_scores`: scores computed in fp16: cosine as
  `F.normalize(a.half()) @ F.normalize(b.half()).T` and dot as `a.half() @ b.half().T` (torch's
  half matmul on the tensors' device). In fp16 the eps of F.normalize underflows to 0, so an
  all-zero gradient gives NaN scores.
- `zero_gradient_stored`: the train set holds one all-zero gradient, as the original's did (an
  example whose assistant turn was truncated away, stored as zeros instead of skipped), placed
  in the middle of the file order. Its cosine is NaN (exact division or fp16 F.normalize).
- `nan_sort`: each test example's scores sorted with Python's `list.sort(key=score, reverse=True)`
  in file order (a NaN key makes the result only piecewise sorted), the NaN items dropped
  afterwards and the position in the list read as the rank.

Without `nan_sort`, items with a NaN score are dropped and the rest ranked by score.
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


@dataclass(frozen=True)
class OriginalSteps:
    """Which of the original pipeline's steps to apply (all off = this project's pipeline)."""

    fp16_projection_input: bool = False
    unscaled_projection: bool = False
    fp16_storage: bool = False
    fp16_scores: bool = False
    zero_gradient_stored: bool = False
    nan_sort: bool = False

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def all(cls) -> "OriginalSteps":
        return cls(**{name: True for name in cls.names()})

    def for_full_gradients(self) -> "OriginalSteps":
        """The steps that also touched the original's full-gradient side (no projection there)."""
        return replace(self, fp16_projection_input=False, unscaled_projection=False)


def ablation_variants() -> dict[str, tuple[OriginalSteps, OriginalSteps]]:
    """(reference steps, candidate steps) per ablation row.

    Single steps are applied wherever the original applied them (both sides); `all_candidate_only`
    measures the damage to the projected side against clean full scores; `exact_original` is the
    original comparison, defective on both sides.
    """
    variants = {"none": (OriginalSteps(), OriginalSteps())}
    for name in OriginalSteps.names():
        steps = OriginalSteps(**{name: True})
        variants[name] = (steps.for_full_gradients(), steps)
    variants["all_candidate_only"] = (OriginalSteps(), OriginalSteps.all())
    variants["exact_original"] = (OriginalSteps.all().for_full_gradients(), OriginalSteps.all())
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
    """Projected vectors per dim, with TRAK's fp16 input rounding and missing 1/sqrt(k) if asked."""
    if steps.fp16_projection_input:
        grads = [round_fp16(g) for g in grads]
    projected = project(grads)
    return unscale(projected) if steps.unscaled_projection else projected


def original_scores(
    test: torch.Tensor, train: torch.Tensor, function: str, steps: OriginalSteps
) -> np.ndarray:
    """`[n_test, n_train]` scores as the original computed them (in fp64 when `steps` are off)."""
    if steps.fp16_storage:
        test, train = round_fp16(test), round_fp16(train)
    if steps.fp16_scores:
        return _fp16_scores(test, train, function).numpy().astype(np.float64)
    return _exact_scores(test, train, function)


def _fp16_scores(test: torch.Tensor, train: torch.Tensor, function: str) -> torch.Tensor:
    test, train = test.half(), train.half()
    if function == "cosine":
        test, train = F.normalize(test, dim=1), F.normalize(train, dim=1)
    return (test @ train.T).float().cpu()


def _exact_scores(test: torch.Tensor, train: torch.Tensor, function: str) -> np.ndarray:
    test, train = test.double().cpu(), train.double().cpu()
    if function == "cosine":
        # Zero vectors give NaN, as they would with an exact division.
        test = test / test.norm(dim=1, keepdim=True)
        train = train / train.norm(dim=1, keepdim=True)
    return (test @ train.T).numpy()


def original_file_order(scores: np.ndarray) -> list[int]:
    """Train indices as the original wrote them: list.sort(reverse=True) on scores, NaN dropped.

    A NaN key compares False against everything, so the sort leaves the list only piecewise
    sorted; the NaN items are dropped after sorting.
    """
    keys = [float(s) for s in scores]
    order = list(range(len(keys)))
    order.sort(key=lambda j: keys[j], reverse=True)
    return [j for j in order if not math.isnan(keys[j])]


def file_order_ranks(scores: np.ndarray) -> np.ndarray:
    """Per row: the position of each train example in the original's file order (NaN: dropped)."""
    ranks = np.full(scores.shape, np.nan)
    for i, row in enumerate(scores):
        order = original_file_order(row)
        ranks[i, order] = np.arange(len(order))
    return ranks


def score_ranks(scores: np.ndarray) -> np.ndarray:
    """Per row: descending rank by score among the finite scores (NaN: dropped)."""
    ranks = np.full(scores.shape, np.nan)
    for i, row in enumerate(scores):
        keep = ~np.isnan(row)
        ranks[i, keep] = descending_ranks(row[keep][None, :])[0]
    return ranks


def ranks_like_original(scores: np.ndarray, steps: OriginalSteps) -> np.ndarray:
    return file_order_ranks(scores) if steps.nan_sort else score_ranks(scores)


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
    return n_train // 2


def with_zero_gradient(train: torch.Tensor) -> torch.Tensor:
    """`[n, d]` -> `[n + 1, d]` with an all-zero row in the middle of the file order."""
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


@dataclass
class AblationRow:
    variant: str
    function: str
    projection_type: str
    dim: int
    kendall: np.ndarray  # per test example
    dropped: int  # train examples with a NaN score, summed over test examples
    candidate_score_std: float  # mean over test examples of the std of train scores


def run_ablation(
    gradients: GradientPair,
    project: ProjectFn,
    projection_type: str,
    functions: tuple[str, ...] = ("dot", "cosine"),
    variants: dict[str, tuple[OriginalSteps, OriginalSteps]] | None = None,
) -> list[AblationRow]:
    """Kendall tau of every variant's candidate ranking against its reference ranking."""
    variants = variants or ablation_variants()
    full_train, full_test = (
        gradients.dense(gradients.train_rows),
        gradients.dense(gradients.test_rows),
    )
    # Projecting is the expensive part: once per input rounding; the missing scale is a factor.
    projections = {}  # fp16_input -> (test {k: vecs}, train {k: vecs}), scaled
    rows = []
    for name, (ref_steps, cand_steps) in variants.items():
        key = cand_steps.fp16_projection_input
        if key not in projections:
            scaled = replace(cand_steps, unscaled_projection=False)
            projections[key] = (
                project_like_original(project, gradients.test_rows, scaled),
                project_like_original(project, gradients.train_rows, scaled),
            )
        test_proj, train_proj = (
            unscale(p) if cand_steps.unscaled_projection else p for p in projections[key]
        )
        zero = cand_steps.zero_gradient_stored
        for function in functions:
            ref_train = with_zero_gradient(full_train) if zero else full_train
            ref_scores = original_scores(full_test, ref_train, function, ref_steps)
            if zero and not ref_steps.zero_gradient_stored:  # a clean reference skips it
                ref_scores[:, zero_gradient_position(len(full_train))] = np.nan
            ref_ranks = ranks_like_original(ref_scores, ref_steps)
            for dim in sorted(test_proj):
                train_vectors = with_zero_gradient(train_proj[dim]) if zero else train_proj[dim]
                cand = original_scores(test_proj[dim], train_vectors, function, cand_steps)
                cand_ranks = ranks_like_original(cand, cand_steps)
                rows.append(
                    AblationRow(
                        variant=name,
                        function=function,
                        projection_type=projection_type,
                        dim=dim,
                        kendall=rank_kendall(ref_ranks, cand_ranks),
                        dropped=int(np.isnan(cand).sum() + np.isnan(ref_scores).sum()),
                        candidate_score_std=float(np.nanmean(np.nanstd(cand, axis=1))),
                    )
                )
    return rows
