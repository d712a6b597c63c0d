"""compare_projections: how much projection changes the ranking of train examples."""

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from gradproj import __version__, fsio, store
from gradproj.analysis.metrics import TOP_KS, agreement_metrics
from gradproj.analysis.original import AblationRow, run_ablation
from gradproj.analysis.retrieval import SOURCE_FIELD, retrieval_table
from gradproj.analysis.scores import align_to, check_provenance
from gradproj.analysis.stats import median_difference_permutation_test, summarize
from gradproj.analysis.theory import norm_products, norm_products_from_scores, predicted_kendall
from gradproj.errors import UserError
from gradproj.options import option, resolve_device
from gradproj.scoredir import ScoreDir, load_score_dir

DENSE_TYPES = ("rademacher", "normal")
GROUP = ["comparison", "candidate", "projection_type", "dim", "function", "metric"]


@dataclass
class CompareConfig:
    """Options of compare_projections.py, checked on construction."""

    reference: Path = option(help="score directory of the reference (usually the full gradients)")
    candidates: list[Path] = option(
        help="score directories of the projections to compare",
        nargs="+",
    )
    output: Path = option(help="directory for metrics.csv, summary.csv, figures and report.md")
    reference_run: Path | None = option(
        None,
        "full-gradient run of the train examples (gradient norms, emulation); default: the "
        "train_run recorded in the reference scores",
    )
    test_run: Path | None = option(
        None,
        "full-gradient run of the test examples; default: from the scores",
    )
    emulate_original: bool = option(
        False,
        "also emulate the original pipeline step by step (ablation table)",
    )
    fp16_runs: tuple[Path, Path] | None = option(
        None,
        "full-gradient runs extracted with --dtype fp16 (the emulation's fp16_model step); "
        "default: the fp32 gradients rounded to fp16",
        nargs=2,
        metavar=("TRAIN_RUN", "TEST_RUN"),
    )
    top_ks: tuple[int, ...] = option(
        TOP_KS,
        "k of top-k overlap and NDCG@k",
        flag="--top_k",
        nargs="+",
        metavar="K",
    )
    n_permutations: int = option(1000, "permutations of the permutation tests")
    n_bootstrap: int = option(2000, "bootstrap resamples of the confidence intervals")
    seed: int = option(0, "seed of the permutation tests, bootstrap and theory simulation")
    flag_margin: float = option(
        0.1,
        "flag a measured median Kendall tau this far below the prediction",
    )
    device: str = option("cpu", "device of the emulated projections")
    retrieval: bool = option(
        False,
        "also rank each test example's known source train example (retrieval.csv): the compared "
        "scores, --retrieval_methods, BM25 and a random ranking",
    )
    retrieval_methods: list[Path] = option(
        help=(
            "more score directories for the retrieval (and --lds) table only (other targets: "
            "params, hidden), over the same examples; implies --retrieval"
        ),
        default_factory=list,
        nargs="+",
        metavar="DIR",
    )
    source_field: str = option(
        SOURCE_FIELD,
        "test set column naming each test example's source train id, or a JSON list of ids (e.g."
        " related_ids: the best-ranked of them counts)",
    )
    lds: Path | None = option(
        None,
        "ground truth of gradproj retrain: adds lds.csv, the linear datamodeling score of every "
        "score directory given (with --retrieval_methods), BM25 and a random ranking",
        metavar="FILE",
    )

    def __post_init__(self):
        self.reference = Path(self.reference)
        self.candidates = [Path(c) for c in self.candidates]
        self.output = Path(self.output)
        self.fp16_runs = tuple(Path(p) for p in self.fp16_runs) if self.fp16_runs else None
        if not self.candidates:
            raise UserError("give at least one --candidates score directory")
        resolved = [p.resolve() for p in [self.reference, *self.candidates]]
        if len(set(resolved)) != len(resolved):
            raise UserError("--reference and --candidates must be distinct directories")
        if self.output.resolve() in resolved:
            raise UserError(f"--output {self.output} is an input directory; choose another")
        fsio.check_output(self.output, "--output", directory=True)
        for name in ("n_permutations", "n_bootstrap"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")
        if not self.top_ks or min(self.top_ks) < 1:
            raise UserError("--top_k values must be positive integers")
        if self.fp16_runs and not self.emulate_original:
            raise UserError("--fp16_runs is only used with --emulate_original")
        if not 0 <= self.flag_margin <= 2:
            raise UserError("--flag_margin must lie in [0, 2] (a Kendall tau difference)")
        self.lds = Path(self.lds) if self.lds else None
        self.retrieval_methods = [Path(p) for p in self.retrieval_methods]
        self.retrieval = self.retrieval or bool(self.retrieval_methods)
        if self.retrieval and not self.source_field:
            raise UserError("--source_field is empty; name the test set's source column")
        self.device = resolve_device(self.device)


@dataclass
class Comparison:
    """Everything the report shows; each table is a DataFrame also written as CSV."""

    reference: ScoreDir
    candidates: list[ScoreDir]
    metrics: pd.DataFrame
    summary: pd.DataFrame
    permutation_tests: pd.DataFrame
    theory: pd.DataFrame
    theory_vs_measured: pd.DataFrame
    dispersion: pd.DataFrame
    ablation: pd.DataFrame | None = None
    retrieval: pd.DataFrame | None = None
    lds: pd.DataFrame | None = None
    lds_pairs: pd.DataFrame | None = None  # the best method against every other
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    explanations: Path | None = None  # explanations.html, when the datasets could be read


def load_inputs(config: CompareConfig) -> tuple[ScoreDir, list[ScoreDir]]:
    reference = load_score_dir(config.reference)
    candidates = []
    for path in config.candidates:
        candidate = load_score_dir(path)
        check_provenance(reference, candidate)
        candidates.append(align_to(reference, candidate))
    return reference, sorted(candidates, key=lambda c: (c.projection_type, c.dim or 0))


def metric_rows(
    comparison: str, label: ScoreDir, function: str, values: dict[str, np.ndarray], test_ids
) -> list[dict]:
    """Long-format metrics.csv rows: one per test example and metric."""
    rows = []
    for metric, per_test in values.items():
        for test_id, value in zip(test_ids, per_test, strict=True):
            rows.append(
                {
                    "comparison": comparison,
                    "candidate": label.label,
                    "projection_type": label.projection_type,
                    "dim": label.dim or 0,
                    "function": function,
                    "metric": metric,
                    "test_id": test_id,
                    "value": float(value),
                    "precondition": label.precondition,
                    "damping": label.damping,
                }
            )
    return rows


def compute_metrics(reference: ScoreDir, candidates: list[ScoreDir], top_ks) -> pd.DataFrame:
    """Candidate vs reference per function, and dot vs cosine within every directory."""
    rows = []
    for cand in candidates:
        for function in reference.scores.keys() & cand.scores.keys():
            values = agreement_metrics(reference.scores[function], cand.scores[function], top_ks)
            rows += metric_rows("reference", cand, function, values, reference.test_ids)
    for score_dir in [reference, *candidates]:
        if {"dot", "cosine"} <= score_dir.scores.keys():
            values = agreement_metrics(score_dir.scores["dot"], score_dir.scores["cosine"], top_ks)
            rows += metric_rows(
                "dot_vs_cosine", score_dir, "dot_vs_cosine", values, reference.test_ids
            )
    return pd.DataFrame(rows)


def summarize_metrics(metrics: pd.DataFrame, n_bootstrap: int, seed: int) -> pd.DataFrame:
    rows = [
        {**dict(zip(GROUP, key, strict=True)), **summarize(group.value, n_bootstrap, seed)}
        for key, group in metrics.groupby(GROUP, sort=False)
    ]
    return pd.DataFrame(rows)


def permutation_tests(metrics: pd.DataFrame, n_permutations: int, seed: int) -> pd.DataFrame:
    """Difference of medians between consecutive dims of one projection type and function."""
    rows = []
    data = metrics[metrics.comparison == "reference"]
    for (proj_type, function, metric), group in data.groupby(
        ["projection_type", "function", "metric"], sort=False
    ):
        dims = sorted(set(group.dim))
        for low, high in zip(dims, dims[1:], strict=False):
            result = median_difference_permutation_test(
                group[group.dim == high].value.to_numpy(),
                group[group.dim == low].value.to_numpy(),
                n_permutations=n_permutations,
                seed=seed,
            )
            rows.append(
                {
                    "projection_type": proj_type,
                    "function": function,
                    "metric": metric,
                    "dim_low": low,
                    "dim_high": high,
                    "median_difference": result.median_difference,
                    "p_value": result.p_value,
                    "n_permutations": result.n_permutations,
                }
            )
    return pd.DataFrame(rows)


def score_dispersion(score_dirs: list[ScoreDir]) -> pd.DataFrame:
    """Mean over test examples of the std of the train scores (the original study's table)."""
    rows = []
    for score_dir in score_dirs:
        for function, matrix in score_dir.scores.items():
            rows.append(
                {
                    "candidate": score_dir.label,
                    "projection_type": score_dir.projection_type,
                    "dim": score_dir.dim or 0,
                    "function": function,
                    "mean_std_of_scores": float(np.mean(np.std(matrix.astype(np.float64), axis=1))),
                }
            )
    return pd.DataFrame(rows)


def theory_dims(candidate_dims: list[int]) -> list[int]:
    """The candidates' dims plus a geometric grid around them, for a smooth predicted curve."""
    low, high = min(candidate_dims) / 2, max(candidate_dims) * 2
    grid = np.geomspace(low, high, 8).round().astype(int).tolist()
    return sorted(set(candidate_dims) | {max(1, d) for d in grid})


def norm_product_matrix(
    reference: ScoreDir, config: CompareConfig, notes: list[str]
) -> np.ndarray | None:
    """||a_i|| ||b_j|| from the runs' manifests, else recovered from full dot and cosine."""
    if config.reference_run and config.test_run:
        from gradproj.analysis.runs import grad_norms, open_full_run

        train = grad_norms(open_full_run(config.reference_run), reference.train_ids)
        test = grad_norms(open_full_run(config.test_run), reference.test_ids)
        notes.append("Gradient norms for the dot-product prediction: the runs' manifests.")
        return norm_products(test, train)
    if {"dot", "cosine"} <= reference.scores.keys():
        notes.append(
            "Gradient norms for the dot-product prediction: recovered as dot / cosine "
            "of the reference scores."
        )
        return norm_products_from_scores(reference.scores["dot"], reference.scores["cosine"])
    notes.append("No gradient norms (no runs, no cosine scores): dot-product prediction skipped.")
    return None


THEORY_COLUMNS = ["function", "dim", "predicted_median"]


def jl_theory(
    reference: ScoreDir, candidates: list[ScoreDir], config: CompareConfig, notes: list[str]
) -> pd.DataFrame:
    """Median predicted Kendall tau per function and dim (empty when the reference is not full)."""
    if reference.dim is not None:
        notes.append("The reference is itself projected: no JL prediction against it.")
        return pd.DataFrame(columns=THEORY_COLUMNS)
    dims = sorted({c.dim for c in candidates if c.dim})
    if not dims:
        return pd.DataFrame(columns=THEORY_COLUMNS)
    norm_product = (
        norm_product_matrix(reference, config, notes) if "dot" in reference.scores else None
    )
    rows = []
    for function, scores in reference.scores.items():
        if function == "dot" and norm_product is None:
            continue
        for dim in theory_dims(dims):
            taus = predicted_kendall(
                function, scores.astype(np.float64), dim, norm_product, seed=config.seed
            )
            rows.append(
                {"function": function, "dim": dim, "predicted_median": float(np.nanmedian(taus))}
            )
    return pd.DataFrame(rows, columns=THEORY_COLUMNS)  # no row: dot alone, without norms


def compare_with_theory(
    summary: pd.DataFrame, theory: pd.DataFrame, flag_margin: float
) -> pd.DataFrame:
    """Measured median Kendall beside the prediction; flag measured far below predicted."""
    measured = summary[(summary.comparison == "reference") & (summary.metric == "kendall_tau")]
    merged = measured.merge(theory, on=["function", "dim"], how="inner")
    shortfall = merged.predicted_median - merged["median"]
    # The prediction is for dense projections; sjlt and kronecker have other variances.
    dense = merged.projection_type.isin(DENSE_TYPES)
    merged["flagged"] = (
        dense & (shortfall > flag_margin) & (merged.ci_high < merged.predicted_median)
    )
    columns = [
        "candidate",
        "projection_type",
        "dim",
        "function",
        "median",
        "ci_low",
        "ci_high",
        "predicted_median",
        "flagged",
    ]
    return merged[columns]


def make_projection_fn(projection: dict, dims: list[int], shape: tuple[int, int], device: str):
    """project(list of [len, hidden]) -> {k: [B, k]} by the run's own projection type."""
    from gradproj.projection import make_projection

    projector = make_projection(
        projection["type"], dims, int(projection["seed"]), shape, device=device
    )

    # One call for all examples: the projector bounds its own memory, and each random block it
    # generates then serves every example.
    return projector.project_batch


def resolve_runs(config: CompareConfig, reference: ScoreDir) -> tuple[Path | None, Path | None]:
    """--reference_run / --test_run, else the runs recorded in the reference scores' metadata."""
    train = config.reference_run or reference.metadata.get("train_run")
    test = config.test_run or reference.metadata.get("test_run")
    return (Path(train) if train else None), (Path(test) if test else None)


def ablation_table(
    reference: ScoreDir, candidates: list[ScoreDir], config: CompareConfig
) -> pd.DataFrame:
    """The emulated original pipeline, step by step, per projection type, dim and function."""
    from gradproj.analysis.runs import load_fp16_gradient_pair, load_gradient_pair

    train_run, test_run = resolve_runs(config, reference)
    if not (train_run and test_run):
        raise UserError(
            "--emulate_original needs the full gradients: pass --reference_run "
            "(train) and --test_run"
        )
    ids = (reference.train_ids, reference.test_ids)
    gradients = load_gradient_pair(train_run, test_run, *ids)
    fp16 = load_fp16_gradient_pair(*config.fp16_runs, *ids) if config.fp16_runs else None
    hidden = gradients.train_rows[0].shape[1]
    rows: list[AblationRow] = []
    for (proj_type, seed), dims in projection_groups(candidates).items():
        project = make_projection_fn(
            {"type": proj_type, "seed": seed},
            dims,
            (gradients.max_seq_length, hidden),
            config.device,
        )
        rows += run_ablation(gradients, project, proj_type, tuple(reference.scores), None, fp16)
    table = pd.DataFrame([ablation_record(r, config) for r in rows])
    table["fp16_model_gradients"] = "fp16 runs" if fp16 else "fp32 rounded to fp16"
    return table


# Beside ablation.csv: what it was computed from. A comparison into the same --output with the
# same inputs reads ablation.csv back instead of emulating again (minutes for the demo).
ABLATION_TABLE, ABLATION_INPUTS = "ablation.csv", "ablation_inputs.json"


def ablation_inputs(reference: ScoreDir, candidates: list[ScoreDir], config: CompareConfig):
    """Everything the ablation table depends on: the full runs' and fp16 runs' manifests (whose
    checksums cover every shard), the ids, functions, projections and the statistics' options."""
    runs = [*resolve_runs(config, reference), *(config.fp16_runs or ())]
    ids = json.dumps([reference.train_ids, reference.test_ids]).encode()
    return {
        "gradproj": __version__,
        "runs": [str(Path(r).resolve()) for r in runs if r],
        "manifests": [_manifest_sha256(r) for r in runs if r],
        "ids_sha256": hashlib.sha256(ids).hexdigest(),
        "functions": list(reference.scores),
        "projections": [[*key, dims] for key, dims in projection_groups(candidates).items()],
        "n_bootstrap": config.n_bootstrap,
        "seed": config.seed,
        "device": config.device,
    }


def _manifest_sha256(run: Path) -> str | None:
    manifest = Path(run) / store.MANIFEST
    return fsio.file_sha256(manifest) if manifest.is_file() else None


def cached_ablation(
    reference: ScoreDir, candidates: list[ScoreDir], config: CompareConfig, inputs: dict
) -> pd.DataFrame:
    """The ablation table, read back from --output when it was computed from these inputs."""
    table, stamp = config.output / ABLATION_TABLE, config.output / ABLATION_INPUTS
    try:
        if json.loads(stamp.read_text()) == inputs:
            return pd.read_csv(table)
    except (OSError, ValueError):
        pass
    return ablation_table(reference, candidates, config)


def projection_groups(candidates: list[ScoreDir]) -> dict[tuple[str, int], list[int]]:
    groups: dict[tuple[str, int], list[int]] = {}
    for cand in candidates:
        if cand.projection:
            key = (cand.projection_type, int(cand.projection.get("seed", 0)))
            groups.setdefault(key, []).append(cand.dim)
    return {key: sorted(set(dims)) for key, dims in groups.items()}


def ablation_record(row: AblationRow, config: CompareConfig) -> dict:
    stats = summarize(row.kendall, config.n_bootstrap, config.seed)
    return {
        "variant": row.variant,
        "function": row.function,
        "projection_type": row.projection_type,
        "dim": row.dim,
        "kendall_median": stats["median"],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
        "nan_scores": row.nan_scores,
        "mean_std_of_scores": row.candidate_score_std,
    }


def source_retrieval(
    reference: ScoreDir, candidates: list[ScoreDir], config: CompareConfig
) -> pd.DataFrame:
    """Ground-truth retrieval table: the compared directories, --retrieval_methods, baselines."""
    others = [load_score_dir(path) for path in config.retrieval_methods]
    return retrieval_table(
        [reference, *candidates, *others], config.source_field, config.n_bootstrap, config.seed
    )


def linear_datamodeling(
    reference: ScoreDir, candidates: list[ScoreDir], config: CompareConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """lds.csv and lds_pairs.csv: every score directory given (with --retrieval_methods), BM25
    and random, against the ground truth of --lds."""
    from gradproj.analysis.lds import lds_methods, tables_of
    from gradproj.truth import load_ground_truth

    truth = load_ground_truth(config.lds)
    others = [load_score_dir(path) for path in config.retrieval_methods]
    methods = lds_methods(truth, [reference, *candidates, *others], config.seed)
    return tables_of(truth, methods, config.n_bootstrap, config.seed)


def compare_projections(config: CompareConfig) -> Comparison:
    """Compute every table and figure and write them, with report.md, under config.output;
    a progress line on stderr names the step that runs."""
    from gradproj.analysis.report import write_outputs

    notes: list[str] = []
    steps = 7 + config.emulate_original + config.retrieval + (config.lds is not None)
    with tqdm(total=steps, desc="compare", unit="step", file=sys.stderr) as bar:

        def step(name: str, compute, *args):
            bar.set_postfix_str(name)
            result = compute(*args)
            bar.update()
            return result

        reference, candidates = step("loading scores", load_inputs, config)
        # First: it reads the datasets, and a bad source id should stop the run before the rest.
        retrieval = None
        if config.retrieval:
            retrieval = step("source retrieval", source_retrieval, reference, candidates, config)
        lds, lds_pairs = None, None
        if config.lds is not None:
            lds, lds_pairs = step(
                "linear datamodeling score", linear_datamodeling, reference, candidates, config
            )
        if reference.manifest.get("kind") != "full":
            notes.append(f"The reference {reference.path} is not a full-gradient score directory.")
        metrics = step("agreement metrics", compute_metrics, reference, candidates, config.top_ks)
        summary = step("bootstrap CIs", summarize_metrics, metrics, config.n_bootstrap, config.seed)
        tests = step(
            "permutation tests", permutation_tests, metrics, config.n_permutations, config.seed
        )
        theory = step("JL prediction", jl_theory, reference, candidates, config, notes)
        dispersion = step("score dispersion", score_dispersion, [reference, *candidates])
        ablation, inputs = None, None
        if config.emulate_original:
            inputs = ablation_inputs(reference, candidates, config)
            ablation = step(
                "emulating the original", cached_ablation, reference, candidates, config, inputs
            )
        comparison = Comparison(
            reference=reference,
            candidates=candidates,
            metrics=metrics,
            summary=summary,
            permutation_tests=tests,
            theory=theory,
            theory_vs_measured=compare_with_theory(summary, theory, config.flag_margin),
            dispersion=dispersion,
            ablation=ablation,
            retrieval=retrieval,
            lds=lds,
            lds_pairs=lds_pairs,
            notes=notes,
        )
        # the stamp goes before ablation.csv is rewritten and comes back after: it never vouches
        # for a table another process left half-written or that other inputs wrote
        (config.output / ABLATION_INPUTS).unlink(missing_ok=True)
        step("tables, figures, report", write_outputs, comparison, config.output)
        if inputs is not None:
            fsio.atomic_write_json(config.output / ABLATION_INPUTS, inputs)
    comparison.explanations = explanations_page(comparison, config)
    return comparison


def explanations_page(comparison: Comparison, config: CompareConfig) -> Path | None:
    """explanations.html beside the report; datasets that cannot be read cost only the page."""
    from gradproj.analysis.explanations import PAGE, write_explanations

    paths = [comparison.reference.path, *(c.path for c in comparison.candidates)]
    try:
        return write_explanations(
            config.output, [*paths, *config.retrieval_methods], comparison.metrics,
            config.source_field, comparison.lds,
        )  # fmt: skip
    except UserError as err:
        print(f"warning: {PAGE} not written: {err}", file=sys.stderr)
        return None
