"""Fit error = E + A·x^(−α) with a Huber loss in log space, and bootstrap it over seeds.

The fit follows the Chinchilla refits (Hoffmann et al. 2022; Besiroglu et al. 2024):
minimise Σ Huber_δ(log ŷ − log y) with ŷ = exp(e) + exp(a − α·log x), by L-BFGS from a grid
of starts, since a single start stops in a poor local minimum often enough to matter. Their δ = 10⁻³
suits language-model losses, whose seed noise in log space is ~10⁻³; the errors of vision runs vary by
5-10% between seeds, where δ = 10⁻³ turns the fit into an L1 (median) fit that is less efficient and that
L-BFGS crawls through. δ = 0.1 keeps seed noise in the quadratic part and still clips a diverged seed. The axis is
divided by its geometric mean before fitting (ranks, parameter counts and FLOPs span very different
magnitudes; a centred log axis keeps ``a`` of order one), and ``A`` is returned in the axis' own units.

:func:`bootstrap_fit` resamples whole seeds within each level of the axis (each run is one seed at one
level), refits, and returns percentile 95% intervals of E, A and α, and of the fitted curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 0.1  # log space: seed noise (5-10% of the error) stays quadratic, a diverged seed is clipped
ALPHA_BOUNDS = (0.0, 10.0)  # an exponent at either bound is not a fit: flat data, or a step
MAX_ITER = 1000  # per start; a start that needs more is in a flat valley another start does better in
MIN_LEVELS = 4  # three parameters: fewer levels leave nothing to check the curve against
CONFIDENCE = 0.95
N_BOOT = 1000


@dataclass
class PowerLawFit:
    """E, A, α of error = E + A·x^(−α); ``converged`` False with ``reason`` when no fit is trusted."""

    E: float
    A: float
    alpha: float
    loss: float
    converged: bool
    reason: str = ""
    x_scale: float = 1.0  # the geometric mean the axis was divided by while fitting
    starts: int = 0

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** (-self.alpha)


@dataclass
class BootstrapFit:
    """Percentile intervals from refits on seed resamples; ``curve`` holds the band on ``grid``."""

    fit: PowerLawFit
    intervals: dict[str, tuple[float, float]]
    n_boot: int
    failed: int
    grid: np.ndarray = field(default_factory=lambda: np.empty(0))
    curve_low: np.ndarray = field(default_factory=lambda: np.empty(0))
    curve_high: np.ndarray = field(default_factory=lambda: np.empty(0))


def huber_loss_and_grad(theta: np.ndarray, lx: np.ndarray, ly: np.ndarray, delta: float = HUBER_DELTA):
    """Σ Huber(r) with r = logaddexp(e, a − α·lx) − ly, and its gradient in (e, a, α)."""
    e, a, alpha = theta
    power = a - alpha * lx
    pred = np.logaddexp(e, power)
    r = pred - ly
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.clip(r, -delta, delta)
    w_e = np.exp(e - pred)  # ∂pred/∂e; 1 − w_e = ∂pred/∂a
    w_a = 1.0 - w_e
    grad = np.array([(dr * w_e).sum(), (dr * w_a).sum(), -(dr * w_a * lx).sum()])
    return float(loss), grad


def fit_power_law(x, y, *, delta: float = HUBER_DELTA, starts=None) -> PowerLawFit:
    """Fit error ``y`` = E + A·x^(−α) over every (x, y) point: multi-start L-BFGS-B, Huber in log space.

    Args:
        x: the axis, one value per run (> 0).
        y: the error per run (> 0): 100 − accuracy, or a loss.
        starts: (e, a, α) start points in the scaled axis; default :func:`start_grid`.

    Returns:
        The best fit over the starts; ``converged`` is False (with ``reason``) when no start converged or the
        exponent sits at a bound.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    scale = float(np.exp(np.mean(np.log(x))))
    lx, ly = np.log(x / scale), np.log(y)
    bounds = _bounds(y)
    best = None
    grid = start_grid(y) if starts is None else starts
    for theta0 in grid:
        res = minimize(
            huber_loss_and_grad,
            theta0,
            args=(lx, ly, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": MAX_ITER},
        )
        if best is None or (res.success, -res.fun) > (best.success, -best.fun):
            best = res
    return _result(best, scale, len(grid))


def start_grid(y: np.ndarray) -> list[np.ndarray]:
    """Starts over the floor E (a share of the smallest error) and α; A puts the curve through the mean."""
    y_min, y_mean = float(np.min(y)), float(np.mean(y))
    out = []
    for share in (0.01, 0.25, 0.5, 0.75, 0.95):
        floor = share * y_min
        for alpha in (0.1, 0.3, 0.6, 1.0, 2.0):
            out.append(np.array([math.log(floor), math.log(max(y_mean - floor, 1e-3 * y_mean)), alpha]))
    return out


def bootstrap_fit(
    x, y, *, n_boot: int = N_BOOT, seed: int = 0, delta: float = HUBER_DELTA, grid_points: int = 60
) -> BootstrapFit:
    """The multi-start fit, and percentile 95% intervals from ``n_boot`` refits on seed resamples.

    Each resample draws, within every level of ``x``, as many runs as the level has, with replacement
    (whole seeds; the levels stay fixed). All resamples are refitted at once by :func:`refit_batch` from
    the full-data fit; the few it leaves unconverged get the multi-start L-BFGS fit. Resamples whose fit
    still fails (or puts α at a bound) are counted in ``failed`` and left out of the intervals.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    fit = fit_power_law(x, y, delta=delta)
    grid = np.geomspace(x.min(), x.max(), grid_points)
    empty = BootstrapFit(fit, {k: (math.nan, math.nan) for k in ("E", "A", "alpha")}, n_boot, 0, grid)
    if not fit.converged or n_boot <= 0:
        return empty
    rng = np.random.default_rng(seed)
    levels = [np.flatnonzero(x == v) for v in np.unique(x)]
    idx = np.concatenate([level[rng.integers(0, len(level), size=(n_boot, len(level)))] for level in levels], axis=1)
    lx, ly = np.log(x[idx] / fit.x_scale), np.log(y[idx])
    start = np.array([math.log(max(fit.E, 1e-300)), math.log(fit.A * fit.x_scale ** (-fit.alpha)), fit.alpha])
    theta, done = refit_batch(lx, ly, start, delta)
    # Stragglers (a flat valley: E -> 0 with α -> 0) get L-BFGS from where they are. A resample has the same
    # x values, hence the same x_scale, so its θ is a start in the refit's own coordinates.
    for i in np.flatnonzero(~done):
        f = fit_power_law(x[idx[i]], y[idx[i]], delta=delta, starts=[theta[i]])
        theta[i] = (math.log(max(f.E, 1e-300)), math.log(f.A * fit.x_scale ** (-f.alpha)), f.alpha)
        done[i] = f.converged
    done &= (theta[:, 2] > ALPHA_BOUNDS[0] + 1e-6) & (theta[:, 2] < ALPHA_BOUNDS[1] - 1e-6)
    failed = int(n_boot - done.sum())
    if not done.any():
        return BootstrapFit(fit, empty.intervals, n_boot, failed, grid)
    e, a, alpha = theta[done].T
    params = np.stack([np.exp(e), np.exp(a) * fit.x_scale**alpha, alpha], axis=1)
    curves = params[:, :1] + params[:, 1:2] * grid[None, :] ** (-params[:, 2:3])
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(params, [tail, 100 - tail], axis=0)
    band = np.percentile(curves, [tail, 100 - tail], axis=0)
    intervals = {k: (float(low[i]), float(high[i])) for i, k in enumerate(("E", "A", "alpha"))}
    return BootstrapFit(fit, intervals, n_boot, failed, grid, band[0], band[1])


def refit_batch(
    lx: np.ndarray, ly: np.ndarray, start: np.ndarray, delta: float = HUBER_DELTA, max_iter: int = 300, tol=1e-9
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise the same Huber objective for every row of ``lx``/``ly`` (B x N) at once.

    Levenberg–Marquardt on the iteratively reweighted least-squares form of the Huber loss (weights
    min(1, δ/|r|)), vectorised over the B resamples, each with its own damping and the bounds of
    :func:`_bounds` (a step is projected into them). A row stops when an accepted step lowers its loss
    by less than ``tol`` relative; the 3x3 solves are batched. Returns (θ as (B, 3) of e, a, α; converged).
    One L-BFGS refit costs ~10 ms in scipy's loop; this does a thousand in a fraction of a second.
    """
    b = lx.shape[0]
    top = ly.max(axis=1)
    low = np.stack([top - 30.0, top - 40.0, np.full(b, ALPHA_BOUNDS[0])], axis=1)
    high = np.stack([top, top + 40.0, np.full(b, ALPHA_BOUNDS[1])], axis=1)
    theta = np.clip(np.broadcast_to(start, (b, 3)).copy(), low, high)
    damping = np.full(b, 1e-3)
    loss, parts = _batch_loss(theta, lx, ly, delta)
    done = np.zeros(b, dtype=bool)
    for _ in range(max_iter):
        active = ~done
        if not active.any():
            break
        r, w_e = parts
        jac = np.stack([w_e, 1.0 - w_e, -(1.0 - w_e) * lx], axis=2)  # (B, N, 3): ∂r/∂θ
        weight = np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
        grad = np.einsum("bn,bnk->bk", weight * r, jac)
        hess = np.einsum("bn,bnk,bnl->bkl", weight, jac, jac)
        diag = np.einsum("bkk->bk", hess)
        ridge = (damping[:, None] * diag + 1e-10)[:, :, None] * np.eye(3)  # never singular
        step = -np.linalg.solve(hess + ridge, grad[..., None])
        trial = np.clip(theta + step[..., 0], low, high)
        trial_loss, trial_parts = _batch_loss(trial, lx, ly, delta)
        better = active & (trial_loss < loss)
        small = better & (loss - trial_loss <= tol * np.maximum(loss, 1e-300))
        stuck = active & ~better & (damping > 1e12)  # no step lowers the loss: a minimum (or its floor)
        theta[better], loss[better] = trial[better], trial_loss[better]
        parts = (
            np.where(better[:, None], trial_parts[0], parts[0]),
            np.where(better[:, None], trial_parts[1], parts[1]),
        )
        damping = np.where(active, np.where(better, np.maximum(damping / 3.0, 1e-9), damping * 4.0), damping)
        done |= small | stuck
    return theta, done


def _batch_loss(theta: np.ndarray, lx: np.ndarray, ly: np.ndarray, delta: float):
    """Per row: the Huber loss, and (residuals, ∂pred/∂e) for the next step."""
    e, a, alpha = (theta[:, k : k + 1] for k in range(3))
    pred = np.logaddexp(e, a - alpha * lx)
    r = pred - ly
    absr = np.abs(r)
    loss = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum(axis=1)
    return loss, (r, np.exp(e - pred))


def _bounds(y: np.ndarray) -> list[tuple[float, float]]:
    """e from a floor ~0 up to the largest error; a wide; α within :data:`ALPHA_BOUNDS`."""
    top = math.log(float(np.max(y)))
    return [(top - 30.0, top), (top - 40.0, top + 40.0), ALPHA_BOUNDS]


def _result(res, scale: float, starts: int) -> PowerLawFit:
    e, a, alpha = (float(v) for v in res.x)
    fit = PowerLawFit(
        E=math.exp(e),
        A=math.exp(a) * scale**alpha,  # A'·(x/s)^−α = (A'·s^α)·x^−α
        alpha=alpha,
        loss=float(res.fun),
        converged=bool(res.success),
        x_scale=scale,
        starts=starts,
    )
    if not res.success:
        fit.reason = f"L-BFGS did not converge from any of {starts} starts ({res.message})"
    elif alpha <= ALPHA_BOUNDS[0] + 1e-6:
        fit.converged, fit.reason = False, "the error does not fall along the axis (the exponent sits at 0)"
    elif alpha >= ALPHA_BOUNDS[1] - 1e-6:
        fit.converged, fit.reason = (
            False,
            f"the exponent runs to its bound {ALPHA_BOUNDS[1]:g} (a step, not a power law)",
        )
    return fit
