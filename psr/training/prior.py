"""A data-derived Gaussian for maximum-entropy fits (`model.prior: auto`).

The images' second moments fix the beam's covariance wherever a scan determines it, whatever the
beam's shape: with the lattice linearized about the reference particle, the screen position of a
particle is u = b_k + A_k X (A_k: the x and y rows of the first-order map to the screen at setting k,
restricted to the fitted coordinates), so an image's centroid and covariance are A_k mu + b_k and
A_k Sigma A_k^T plus the screen's own smoothing (PSF, pixel deposit); a flat background (the mean
of the image's outer frame) is removed first and pixels within 5 of its standard deviations of it
are zeroed (pixel noise over a whole screen would swamp the moments). Every measured image gives
2 + 3 linear equations in mu and Sigma; a least-squares solution (in coordinates normalized by a
rough scale from the data, each equation relative to the image's own size) is closed-form and
takes well under a second. Directions the scan does not fix keep that rough scale (the
least-squares correction is the smallest one). The fitted Gaussian normalizes the flow and, widened
by `width` in every rms size, is the prior of the entropy term.
"""

import copy
import math

import torch
from lightning.pytorch.utilities import rank_zero_info

import sim
from models import GaussianBeam, NormalizingFlowBeam
from models.elements import first_order_maps
from sim.screen import Screen
from psr.training.moments import moments, without_background

COORDINATES = ("x", "px", "y", "py", "z", "pz")
UNITS = ("mm", "mrad", "mm", "mrad", "mm", "x 1e-3")  # of 1e3 times the Bmad coordinate
STEP = 1e-7  # finite-difference step of the linearization [m or 1]
RCOND = 1e-3  # singular values below this fraction of the largest: a direction the scan does not fix
MIN_EIGENVALUE = 1e-2  # smallest eigenvalue of the fitted correlation matrix (|correlation| <= ~0.99)


def smoothing_variance(screen: Screen) -> torch.Tensor:
    """(2,) variance [m^2] a screen adds to an image in x and y (see `sim.Screen`): "cic" deposits
    with d^2/6 and blurs up to the PSF; "kde" draws Gaussians of sqrt(h^2 + psf^2) (at least d/2)."""
    d, psf = screen.pixel_size.double(), screen.psf_sigma.double()
    if screen.method == "kde":
        return torch.maximum(screen.kde_bandwidth.double() ** 2 + psf**2, d**2 / 4)
    return torch.maximum(psf**2, d**2 / 6)


def screen_maps(lattice: sim.Lattice, names: list[str], settings: torch.Tensor, p0c: float, species: str,
                n_dim: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{screen: (b (K, 2), A (K, 2, n_dim))}: screen position of the reference particle [m] and the
    first-order map of the first n_dim coordinates to (x, y) at the screen, by central differences
    (any element, linear or not; space charge off). settings (K, P) with setting `names`."""
    lattice = copy.deepcopy(lattice).to(device="cpu", dtype=torch.float64)
    probes = torch.zeros(1 + 2 * n_dim, 6, dtype=torch.float64)
    for j in range(n_dim):
        probes[1 + 2 * j, j], probes[2 + 2 * j, j] = STEP, -STEP
    k = settings.shape[0]
    maps = {}
    for index, element in enumerate(lattice.elements):
        if not isinstance(element, Screen):
            continue
        upstream = sim.Lattice(list(lattice.elements[:index]))
        before = {e.name for e in upstream.elements}
        values = {n: settings[:, i] for i, n in enumerate(names) if sim.parse_setting_name(n)[0] in before}
        with torch.no_grad(), first_order_maps():  # a bunch's learned map: its section's first-order physics
            out = upstream(sim.ParticleBeam(probes, p0c, species), values).beam.particles
        xy = out[..., [0, 2]].expand(k, *probes.shape[:1], 2)
        jacobian = (xy[:, 1::2] - xy[:, 2::2]) / (2 * STEP)  # (K, n_dim, 2)
        maps[element.name] = (xy[:, 0] - element.center.double(), jacobian.transpose(1, 2))
    return maps


def covariance_pairs(n_dim: int) -> list[tuple[int, int]]:
    """The covariance entries (i, j), i <= j, in the order of `covariance_coefficients`' columns."""
    return [(i, j) for i in range(n_dim) for j in range(i, n_dim)]


def covariance_coefficients(maps: torch.Tensor) -> list[torch.Tensor]:
    """The xx, xy and yy second moments of K images with first-order maps (K, 2, n_dim) as linear functions of
    the beam's covariance entries Sigma_ij (i <= j, `covariance_pairs`): three (K, n_dim (n_dim + 1) / 2)."""
    pairs = covariance_pairs(maps.shape[-1])
    return [torch.stack([maps[:, p, i] * maps[:, q, j] + (maps[:, p, j] * maps[:, q, i] if i != j else 0)
                         for i, j in pairs], -1) for p, q in ((0, 0), (0, 1), (1, 1))]


def image_moments(images: torch.Tensor, screen: Screen) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids (B, 2) relative to the screen centre [m] and covariances (B, 2, 2) [m^2] of unit-sum
    images (B, H, W), without their flat background (`without_background`)."""
    xs, ys = screen.pixel_centres(images.double())
    xs, ys = xs - screen.center[0].double(), ys - screen.center[1].double()
    centroids, (cxx, cyy, cxy) = moments(without_background(images.double()), xs, ys)
    return centroids, torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)


def fit_second_moments(lattice: sim.Lattice, names: list[str], settings: torch.Tensor,
                       images: dict[str, torch.Tensor], measured: dict[str, torch.Tensor], p0c: float,
                       species: str = "electron", n_dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (n_dim,), covariance (n_dim, n_dim)) float64 of the first n_dim Bmad coordinates that
    reproduce the centroids and second moments of the measured images (unit-sum (K, H, W) per
    screen, `measured` (K,) flags) through the lattice at `settings` (K, P)."""
    settings = settings.detach().to("cpu", torch.float64)
    maps = screen_maps(lattice, names, settings, p0c, species, n_dim)
    parts = []  # per screen: b, A, centroids, covariances, smoothing of its measured images
    for name, screen in lattice.screens.items():
        if name not in images:
            continue
        rows = measured[name].to("cpu", torch.bool)
        mean, cov = image_moments(images[name].detach().cpu()[rows], screen)
        b, a = maps[name]
        parts.append((b[rows], a[rows], mean, cov, smoothing_variance(screen).expand(len(mean), 2)))
    b, a, m, c, smoothing = (torch.cat(t) for t in zip(*parts)) if parts else [torch.zeros(0)] * 5
    if not len(m):
        raise ValueError("model.prior: auto needs at least one measured image")
    variance = c.diagonal(dim1=-2, dim2=-1)  # (B, 2): the images' own sizes weight the equations
    c = c - torch.diag_embed(smoothing)
    # rough coordinate scales: the typical image size over the typical lever arm of each coordinate
    scale = variance.mean().sqrt() / a.square().mean((0, 1)).sqrt().clamp(min=1e-30)
    a = a * scale  # maps of normalized coordinates X / scale
    weight = variance.sqrt()
    mean_rows = (a / weight[..., None]).reshape(-1, n_dim)
    mean_target = ((m - b) / weight).reshape(-1)
    mean = torch.linalg.lstsq(mean_rows, mean_target[:, None], rcond=RCOND, driver="gelsd").solution[:, 0]
    pairs = covariance_pairs(n_dim)
    design, target = [], []
    for (p, q, w), coefficients in zip(((0, 0, variance[:, 0]), (0, 1, weight.prod(-1)), (1, 1, variance[:, 1])),
                                       covariance_coefficients(a)):
        design.append(coefficients / w[:, None])
        guess = (a[:, p] * a[:, q]).sum(-1)  # the isotropic normalized guess Sigma = 1
        target.append((c[:, p, q] - guess) / w)
    correction = torch.linalg.lstsq(torch.cat(design), torch.cat(target)[:, None], rcond=RCOND, driver="gelsd").solution[:, 0]
    sigma = torch.eye(n_dim, dtype=torch.float64)
    for (i, j), value in zip(pairs, correction):
        sigma[i, j] += value
        sigma[j, i] = sigma[i, j]
    sigma = _nearest_covariance(sigma)
    return mean * scale, sigma * scale[:, None] * scale[None, :]


def _nearest_covariance(sigma: torch.Tensor) -> torch.Tensor:
    """A positive-definite covariance near `sigma` (normalized units): variances at least 1e-4,
    correlation eigenvalues at least MIN_EIGENVALUE."""
    std = sigma.diagonal().clamp(min=1e-4).sqrt()
    values, vectors = torch.linalg.eigh(sigma / std[:, None] / std[None, :])
    correlation = vectors @ torch.diag(values.clamp(min=MIN_EIGENVALUE)) @ vectors.T
    d = correlation.diagonal().sqrt()
    return (correlation / d[:, None] / d[None, :]) * std[:, None] * std[None, :]


def set_gaussian(beam, mean: torch.Tensor, covariance: torch.Tensor) -> None:
    """Set a `models.GaussianBeam`'s parameters to the given mean and covariance (its scale becomes
    the rms sizes)."""
    lower = torch.linalg.cholesky(covariance)
    scale = covariance.diagonal().sqrt()
    with torch.no_grad():
        beam.mean.copy_(mean)
        beam.scale.copy_(scale)
        beam.log_diagonal.copy_(lower.diagonal().log())
        beam.lower.copy_(torch.tril(lower, -1) / scale[None, :])


def derive_auto_prior(model, datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.prior: auto`: fit (mean, covariance) to the training images of `datamodule`, normalize
    the generator with it (a flow's mean and Cholesky buffers, a Gaussian's parameters) and make the
    prior that Gaussian widened by `model.hparams.prior_width` in every rms size. Prints the sizes."""
    n_dim = model.generator.n_dim
    rows = torch.as_tensor(datamodule.train_index, dtype=torch.long)
    mean, cov = fit_second_moments(
        model.lattice, model.lattice_setting_names(), datamodule.settings[rows],
        {n: img[rows] for n, img in datamodule.images.items()},
        {n: flag[rows] for n, flag in datamodule.measured.items()}, model.p0c, model.species, n_dim)
    width = model.hparams.prior_width
    generator = model.generator
    if isinstance(generator, NormalizingFlowBeam):
        generator.cholesky.copy_(torch.linalg.cholesky(cov).to(generator.cholesky))
        generator.mean.copy_(mean.to(generator.mean))
    elif isinstance(generator, GaussianBeam):
        set_gaussian(generator, mean.to(generator.mean), cov.to(generator.mean))
    set_gaussian(model.prior, mean.to(model.prior.mean), (width**2 * cov).to(model.prior.mean))
    rms = cov.diagonal().sqrt().tolist()
    sizes = ", ".join(f"{COORDINATES[i]} {1e3 * v:.3g} {UNITS[i]}" for i, v in enumerate(rms))
    rank_zero_info(f"model.prior: auto: Gaussian from the second moments of the training images: rms {sizes}; "
                   f"the prior is {width:g} times as wide, and the generator starts at this Gaussian")
    return mean, cov
