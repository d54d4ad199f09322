"""Which emittances a scan's images can determine at all, from the lattice alone.

Linearized about the reference particle, an image's covariance at setting k is A_k Sigma A_k^T (A_k: the x and
y rows of the first-order map to the screen, `psr.training.prior.screen_maps`). Every image so gives three
linear equations (xx, xy, yy) in the n(n+1)/2 entries of the beam's covariance Sigma. A plane's rms emittance
needs that plane's three entries (4D: every entry of the 4x4 block); where they are not in the row space of
the equations, beams that differ there give the same second moments on every image (and, for Gaussian beams,
the same images), so no fit can determine that emittance from this scan, however closely its members agree.
Two settings of a quadrupole scan leave each plane one equation short; a single upright quadrupole leaves one
x-y coupling, and with it the 4D emittance, undetermined (README "Hard beams").
"""

import torch

from psr.training.prior import RCOND, covariance_coefficients, covariance_pairs, screen_maps

PLANE_COORDINATES = {"x": (0, 1), "y": (2, 3), "z": (4, 5)}
# RCOND (as the auto prior's): singular values below this fraction of the largest are directions the equations do
# not fix. A thick quadrupole's 4D emittance is fixed in exact arithmetic only: the shipped example's 16 settings
# give it a singular value 1.3e-6 of the largest (every other above 0.19; its 8 training settings 1.1e-6), far
# below what image moments resolve.
TOLERANCE = 1e-4  # an entry whose unit vector leaves more than this outside the row space is not fixed


def covariance_equations(maps: torch.Tensor, n_dim: int) -> torch.Tensor:
    """(3 K, n_dim (n_dim + 1) / 2) coefficients of the covariance entries Sigma_ij (i <= j) in the xx, xy and yy
    second moments of K images with first-order maps (K, 2, n_dim), each row of unit length."""
    rows = torch.cat(covariance_coefficients(maps))
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def determined_entries(equations: torch.Tensor, n_dim: int) -> torch.Tensor:
    """(n_dim, n_dim) bool: which covariance entries the equations (R, n_dim (n_dim + 1) / 2) fix."""
    fixed = torch.zeros(n_dim, n_dim, dtype=torch.bool)
    if not len(equations):
        return fixed
    _, singular, vh = torch.linalg.svd(equations, full_matrices=False)
    basis = vh[singular > RCOND * singular.max()]  # the row space
    pairs = covariance_pairs(n_dim)
    for index, (i, j) in enumerate(pairs):
        unit = torch.zeros(len(pairs), dtype=equations.dtype)
        unit[index] = 1.0
        outside = (unit - basis.T @ (basis @ unit)).norm()
        fixed[i, j] = fixed[j, i] = bool(outside < TOLERANCE)
    return fixed


def scan_determines(lattice, setting_names: list[str], settings: torch.Tensor, taken: dict[str, torch.Tensor],
                    p0c: float, species: str, n_dim: int) -> dict[str, bool]:
    """{emittance key: whether the images taken at `settings` (K, P) can determine it}, keys as
    `psr.data.emittances.emittance_table`'s (a plane's core with its rms). taken: {screen: (K,) bool}, the
    images a fit used. Coordinates the fit does not reconstruct (n_dim 4: z, pz) are taken as known."""
    settings = settings.detach().to("cpu", torch.float64)
    maps = screen_maps(lattice, setting_names, settings, p0c, species, n_dim)
    used = [a[taken[name].to("cpu", torch.bool)] for name, (_, a) in maps.items() if name in taken]
    used = torch.cat(used) if used else torch.zeros(0, 2, n_dim, dtype=torch.float64)
    # coordinates in comparable units (a diagonal change of coordinates, which fixes the same entries): each
    # scaled to the rms of its lever arms
    used = used / used.square().mean((0, 1)).sqrt().clamp_min(1e-300) if len(used) else used
    fixed = determined_entries(covariance_equations(used, n_dim), n_dim)
    result = {}
    for plane, (u, v) in PLANE_COORDINATES.items():
        if v >= n_dim:
            continue
        result[f"norm_emit_{plane}"] = result[f"norm_emit_{plane}_core90"] = bool(fixed[u:v + 1, u:v + 1].all())
    result["norm_emit_4d"] = bool(fixed[:4, :4].all())
    if n_dim == 6:
        result["norm_emit_6d"] = bool(fixed.all())
    return result
