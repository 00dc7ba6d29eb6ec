"""Maximum-likelihood Dirichlet fit and normality score of Deep GEO (``shared/METHODS.md`` §6), with
:mod:`scipy.special`.

Minka's fixed point ("Estimating a Dirichlet distribution", 2000), as the official code runs it: from the sufficient
statistics of N probability vectors p_i (K classes) — their mean f and the mean of their logs, log p̂ — start at
α = f · s with s = (K - 1)(-ψ(1)) / (Σ_k f_k ln f_k - Σ_k f_k log p̂_k) (Minka's closed-form guess of the
precision), then iterate α ← ψ⁻¹(ψ(Σ α) + log p̂) until the step is shorter than ``tol`` (Euclidean) or ``max_iter``
iterations ran; ψ⁻¹ by Newton's method (5 steps) from Minka's initial guess (exp(y) + 1/2 for y >= -2.22, else
-1 / (y - ψ(1))). Normality of one probability vector p: Σ_k (α_k - 1) ln(p_k + 1e-6).
"""

from __future__ import annotations

import numpy as np
from scipy.special import polygamma, psi


def inverse_digamma(y: np.ndarray, steps: int = 5) -> np.ndarray:
    """x with ψ(x) = y, elementwise (float64), by ``steps`` Newton steps from Minka's initial guess."""
    y = np.asarray(y, dtype=np.float64)
    x = np.where(y >= -2.22, np.exp(y) + 0.5, -1.0 / (y - psi(1.0)))
    for _ in range(steps):
        x = x - (psi(x) - y) / polygamma(1, x)
    return x


def initial_alpha(mean: np.ndarray, mean_log: np.ndarray) -> np.ndarray:
    """Minka's starting point f · s from the mean ``mean`` (K,) and mean log ``mean_log`` (K,) of the observations."""
    k = len(mean)
    precision = (k - 1) * -psi(1.0) / (np.sum(mean * np.log(mean)) - np.sum(mean * mean_log))
    return mean * precision


def fit_dirichlet(mean: np.ndarray, mean_log: np.ndarray, max_iter: int = 1000, tol: float = 1e-9) -> np.ndarray:
    """(K,) float64 maximum-likelihood α of a Dirichlet from the observations' mean ``mean`` (K,) and mean log
    ``mean_log`` (K,) (module docstring)."""
    mean = np.asarray(mean, dtype=np.float64)
    mean_log = np.asarray(mean_log, dtype=np.float64)
    alpha = initial_alpha(mean, mean_log)
    for _ in range(max_iter):
        new = inverse_digamma(psi(alpha.sum()) + mean_log)
        done = np.sqrt(np.sum((new - alpha) ** 2)) < tol
        alpha = new
        if done:
            break
    return alpha


def dirichlet_log_likelihood(alpha: np.ndarray, mean_log: np.ndarray) -> float:
    """Mean log-density of the observations under Dirichlet(``alpha``), from their mean log ``mean_log``."""
    from scipy.special import gammaln

    return float(gammaln(alpha.sum()) - gammaln(alpha).sum() + np.sum((alpha - 1.0) * mean_log))
