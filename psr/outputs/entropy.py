"""Entropy of a particle beam from its samples alone (for generators without a log-density)."""

import math

import torch
from scipy.spatial import cKDTree


def knn_entropy(particles: torch.Tensor, k: int = 5) -> float:
    """Kozachenko-Leonenko k-nearest-neighbour estimate of the differential entropy [nats] of the
    distribution behind `particles` (N, d), in their units (Bmad: m and 1).

    H = psi(N) - psi(k) + log V_d + d mean(log eps_i), eps_i the distance from particle i to its k-th
    neighbour and V_d the volume of the unit d-ball. The particles are whitened first (x = L u with
    L L^T their covariance; H adds log det L), so the distances are taken in units of the beam size.
    Neighbours from a k-d tree: O(N log N) in 2-6 dimensions (10k particles in 6D: ~0.1 s).
    """
    x = torch.as_tensor(particles, dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] <= k:
        raise ValueError(f"particles must be (N, d) with N > k = {k}, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("particles contain NaN or infinite coordinates")
    n, d = x.shape
    centred = x - x.mean(0)
    try:
        cholesky = torch.linalg.cholesky(torch.cov(centred.T).reshape(d, d))
    except RuntimeError:
        raise ValueError("the particles' covariance is singular (a coordinate is constant?)") from None
    u = torch.linalg.solve_triangular(cholesky, centred.T, upper=False).T
    points = u.detach().cpu().numpy()
    distances, _ = cKDTree(points).query(points, k=k + 1)  # the first neighbour is the particle itself
    log_eps = torch.log(torch.as_tensor(distances[:, -1]))
    log_unit_ball = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    digamma = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    h_white = (digamma[0] - digamma[1]).item() + log_unit_ball + d * log_eps.mean().item()
    return h_white + torch.log(torch.diagonal(cholesky)).sum().item()
