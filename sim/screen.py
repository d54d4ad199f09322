"""Screens: differentiable images of the transverse beam distribution."""

import math

import torch

from .element import Element

METHODS = ("cic", "kde")


def _pixel_centres(n: int, size: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    return centre + (torch.arange(n, dtype=size.dtype, device=size.device) - (n - 1) / 2) * size


def gaussian_blur_matrix(n: int, size: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(n, n) blur matrix G[i, j] = w(i - j): a discrete kernel of unit sum whose variance is sigma^2.

    For sigma >= 0.7 size the kernel is a sampled Gaussian normalized to unit sum (its variance is
    then sigma^2 to better than 1e-3); below that, the three taps [a, 1 - 2a, a] with
    a = sigma^2 / (2 size^2). Flux blurred past the edges of the grid is lost, as on a real screen.
    """
    offsets = torch.arange(-(n - 1), n, dtype=size.dtype, device=size.device)
    s = sigma / size
    if bool(s >= 0.7):
        weights = torch.exp(-0.5 * (offsets / s) ** 2)
        weights = weights / weights.sum()
    else:
        a = 0.5 * s**2
        weights = torch.where(offsets == 0, 1 - 2 * a, torch.where(offsets.abs() == 1, a, torch.zeros_like(offsets)))
    index = torch.arange(n, device=size.device)
    return weights[(index[:, None] - index[None, :]) + (n - 1)]


def deposit_cic(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Cloud-in-cell deposit of particles at fractional pixel coordinates.

    x, y: (B, N) column and row coordinates in pixels (pixel centres at integers); weight: (N,) or
    (B, N). Returns (B, H, W). Particles (or the parts of their cells) off the grid are dropped.
    """
    height, width = shape
    batch = x.shape[0]
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    weight = weight.expand_as(x)
    base = torch.arange(batch, device=x.device).unsqueeze(-1) * (height * width)
    indices, weights = [], []
    for dx_, wx in ((0, 1 - fx), (1, fx)):
        for dy_, wy in ((0, 1 - fy), (1, fy)):
            col, row = x0 + dx_, y0 + dy_
            inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
            idx = base + row.clamp(0, height - 1) * width + col.clamp(0, width - 1)
            indices.append(idx)
            weights.append(torch.where(inside, wx * wy * weight, torch.zeros_like(wx)))
    flat = torch.zeros(batch * height * width, dtype=x.dtype, device=x.device)
    flat = flat.index_add(0, torch.cat(indices, -1).reshape(-1), torch.cat(weights, -1).reshape(-1))
    return flat.reshape(batch, height, width)


class Screen(Element):
    """A screen that images the transverse distribution without changing the beam.

    resolution (W, H) [pixels]; pixel_size (dx, dy) [m]; center (cx, cy) [m]; psf_sigma (sx, sy) [m],
    the Gaussian point-spread function of the optics. Pixel (i, j) is centred at
    x = cx + (j - (W-1)/2) dx, y = cy + (i - (H-1)/2) dy; row index grows with +y.

    method "cic": cloud-in-cell deposit, then the PSF as a separable blur. The CIC deposit itself
    smooths by a variance of d^2/6 per axis, so the blur uses sigma^2 - d^2/6 (when positive) and
    the total smoothing equals the PSF. method "kde": each particle is a Gaussian of width
    sqrt(kde_bandwidth^2 + psf_sigma^2) sampled at pixel centres (smoother, costs N*(H+W)).
    Images are in fraction of particle weight per pixel (an image of the whole beam sums to ~1).
    """

    parameters_defaults = {"pixel_size": (1e-3, 1e-3), "center": (0.0, 0.0), "psf_sigma": (0.0, 0.0),
                           "kde_bandwidth": 0.0}
    non_negative = ("psf_sigma", "kde_bandwidth")

    def __init__(self, name=None, resolution=(100, 100), method: str = "cic", **values):
        super().__init__(name, **values)
        resolution = tuple(int(r) for r in resolution)
        if len(resolution) != 2 or min(resolution) < 1:
            raise ValueError(f"Screen {self.name}: resolution must be two positive integers (W, H), got {resolution}")
        if method not in METHODS:
            raise ValueError(f"Screen {self.name}: unknown method {method!r}; use one of {METHODS}")
        for key in ("pixel_size", "center", "psf_sigma"):
            if getattr(self, key).shape != (2,):
                raise ValueError(f"Screen {self.name}: {key} must have two values (x, y), got {getattr(self, key).tolist()}")
        if (self.pixel_size <= 0).any():
            raise ValueError(f"Screen {self.name}: pixel_size must be positive, got {self.pixel_size.tolist()}")
        self.resolution = resolution
        self.method = method

    def to_dict(self) -> dict:
        entry = super().to_dict()
        entry["resolution"] = list(self.resolution)
        entry["method"] = self.method
        return entry

    def pixel_centres(self, like: torch.Tensor, overrides: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres of columns (W,) in x and rows (H,) in y [m]."""
        p = self.screen_values(overrides, like)
        width, height = self.resolution
        return (_pixel_centres(width, p["pixel_size"][0], p["center"][0]),
                _pixel_centres(height, p["pixel_size"][1], p["center"][1]))

    def screen_values(self, overrides: dict | None, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter values with `overrides` (lattice settings) applied; a screen's parameters are one
        value for the whole scan, so an override must have the parameter's own shape."""
        p = self.parameter_values(overrides, like)
        for key in overrides or {}:
            if p[key].shape != getattr(self, key).shape:
                raise ValueError(
                    f"Screen {self.name}: setting {key} must have shape {tuple(getattr(self, key).shape)} "
                    f"(screen parameters cannot vary per setting), got {tuple(p[key].shape)}"
                )
            self._check(key, p[key].detach())
            if key == "pixel_size" and (p[key] <= 0).any():
                raise ValueError(f"Screen {self.name}: pixel_size must be positive, got {p[key].tolist()}")
        return p

    def image(self, particles: torch.Tensor, weight: torch.Tensor | None = None,
              overrides: dict | None = None) -> torch.Tensor:
        """Image (..., H, W) of particles (..., N, 6); optional weight (N,) sums to 1 by default.

        overrides: screen parameters given as lattice settings (e.g. {"psf_sigma": ...}).
        """
        lead = particles.shape[:-2]
        n = particles.shape[-2]
        flat = particles.reshape(-1, n, 6)
        if weight is None:
            weight = torch.full((n,), 1.0 / n, dtype=particles.dtype, device=particles.device)
        p = self.screen_values(overrides, particles)
        width, height = self.resolution
        (dx, dy), (cx, cy), (sx, sy) = p["pixel_size"], p["center"], p["psf_sigma"]
        if self.method == "kde":
            img = self._kde(flat, weight, p)
        else:
            col = (flat[..., 0] - cx) / dx + (width - 1) / 2
            row = (flat[..., 2] - cy) / dy + (height - 1) / 2
            img = deposit_cic(col, row, weight, (height, width))
            var_x, var_y = sx**2 - dx**2 / 6, sy**2 - dy**2 / 6
            if bool(var_y > 0):
                img = gaussian_blur_matrix(height, dy, var_y.sqrt()) @ img
            if bool(var_x > 0):
                img = img @ gaussian_blur_matrix(width, dx, var_x.sqrt()).transpose(0, 1)
        return img.reshape(*lead, height, width)

    def _kde(self, flat, weight, p):
        width, height = self.resolution
        (dx, dy), (cx, cy), (sx, sy) = p["pixel_size"], p["center"], p["psf_sigma"]
        xs, ys = _pixel_centres(width, dx, cx), _pixel_centres(height, dy, cy)
        h = p["kde_bandwidth"]
        hx = (h**2 + sx**2).sqrt().clamp(min=dx / 2)
        hy = (h**2 + sy**2).sqrt().clamp(min=dy / 2)
        kx = torch.exp(-0.5 * ((xs - flat[..., 0:1]) / hx) ** 2) * (dx / (hx * math.sqrt(2 * math.pi)))
        ky = torch.exp(-0.5 * ((ys - flat[..., 2:3]) / hy) ** 2) * (dy / (hy * math.sqrt(2 * math.pi)))
        return (ky * weight.unsqueeze(-1)).transpose(-1, -2) @ kx
