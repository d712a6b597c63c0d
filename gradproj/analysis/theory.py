"""Agreement expected from Johnson-Lindenstrauss theory, to set beside the measured one.

For a dense random projection P (k x D, i.i.d. entries of mean 0 and variance 1/k: Gaussian, or
Rademacher +-1/sqrt(k)), <Pa, Pb> is an unbiased estimate of <a, b> with

    Var <Pa, Pb> = (||a||^2 ||b||^2 + <a, b>^2) / k      (exact for Gaussian; Rademacher subtracts
                                                           2 sum_i a_i^2 b_i^2 / k, negligible for
                                                           spread-out vectors)

and the projected cosine has, to first order in 1/k, standard deviation (1 - cos^2) / sqrt(k).
The predicted Kendall tau adds independent normal noise of that size to each full score and ranks
again (the noise of one test example's scores is in truth correlated through the shared test
vector, so this is an approximation, checked against simulation in the tests).
"""

import numpy as np

from gradproj.analysis.metrics import kendall_tau_b


def jl_dot_std(norm_product: np.ndarray, dot: np.ndarray, k: int) -> np.ndarray:
    """Predicted std of a projected dot product: sqrt((||a||^2 ||b||^2 + <a,b>^2) / k)."""
    return np.sqrt((np.square(norm_product) + np.square(dot)) / k)


def jl_cosine_std(cosine: np.ndarray, k: int) -> np.ndarray:
    """Predicted std of a projected cosine similarity: (1 - cos^2) / sqrt(k)."""
    return (1.0 - np.square(np.clip(cosine, -1.0, 1.0))) / np.sqrt(k)


def norm_products(test_norms: np.ndarray, train_norms: np.ndarray) -> np.ndarray:
    """||a_i|| ||b_j|| as an `[n_test, n_train]` matrix from per-example gradient norms."""
    return np.outer(np.asarray(test_norms, float), np.asarray(train_norms, float))


def norm_products_from_scores(dot: np.ndarray, cosine: np.ndarray, iters: int = 5) -> np.ndarray:
    """||a_i|| ||b_j|| recovered from full dot and cosine scores (dot = cos * ||a|| ||b||).

    The ratio is undefined where the cosine is ~0, so fit log(dot / cos) = u_i + v_j on the
    entries where it is defined (alternating means, exact for exact data) and fill in the rest.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(np.abs(dot / cosine))
    log_ratio[(np.abs(cosine) < 1e-4) | ~np.isfinite(log_ratio)] = np.nan
    if np.isnan(log_ratio).all():
        return np.full(dot.shape, np.nan)
    col = np.zeros(dot.shape[1])
    for _ in range(iters):
        row = np.nanmean(log_ratio - col[None, :], axis=1)
        col = np.nanmean(log_ratio - row[:, None], axis=0)
    return np.exp(np.nan_to_num(row)[:, None] + np.nan_to_num(col)[None, :])


def simulated_kendall(
    scores: np.ndarray, noise_std: np.ndarray, seed: int = 0, repeats: int = 1
) -> np.ndarray:
    """Kendall tau per test example between the scores and the scores plus N(0, noise_std^2)."""
    rng = np.random.default_rng(seed)
    taus = [
        kendall_tau_b(scores, scores + rng.standard_normal(scores.shape) * noise_std)
        for _ in range(repeats)
    ]
    return np.mean(taus, axis=0)


def predicted_kendall(
    function: str,
    reference: np.ndarray,
    k: int,
    norm_product: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Predicted Kendall tau per test example of a k-dim projection against the full scores.

    `reference`: the full scores of `function` ("dot" or "cosine"); dot needs `norm_product`.
    """
    if function == "cosine":
        noise = jl_cosine_std(reference, k)
    elif function == "dot":
        if norm_product is None:
            raise ValueError("the dot-product prediction needs the gradient norms")
        noise = jl_dot_std(norm_product, reference, k)
    else:
        raise ValueError(f"unknown score function {function!r}")
    return simulated_kendall(reference, noise, seed=seed)
