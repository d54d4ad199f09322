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


_CIC_CHUNK = 1 << 17  # particles per chunk of the CIC deposit on CPU: its temporaries stay in cache


def _cic_chunks(batch: int, n: int, device: torch.device):
    """(rows, columns) slices covering (batch, n) in chunks of about _CIC_CHUNK particles (on CPU;
    an accelerator takes much larger chunks: it has no cache to fit and pays per kernel launch)."""
    chunk = _CIC_CHUNK if device.type == "cpu" else _CIC_CHUNK << 6
    if n == 0:
        return
    if n >= chunk:
        for b in range(batch):
            for start in range(0, n, chunk):
                yield slice(b, b + 1), slice(start, min(start + chunk, n))
    else:
        rows = chunk // n
        for b in range(0, batch, rows):
            yield slice(b, min(b + rows, batch)), slice(0, n)


def _cic_cells(x, y, rows: slice, height: int, width: int):
    """Cells of a chunk in the padded grid: flat index of the lower-left corner and the fractions.

    The grid is padded by two cells below and three above each axis, and positions are clamped to
    [-2, W + 1] x [-2, H + 1] (NaN to -2): every particle's four corners fall inside the padded grid,
    and a particle off the screen has all four in the padding, which is cropped away (so it adds
    nothing to the image and gets no gradient). No masks, no out-of-range indices.
    """
    hp, wp = height + 5, width + 5
    x = torch.clamp(x, -2.0, width + 1.0).nan_to_num_(nan=-2.0)
    y = torch.clamp(y, -2.0, height + 1.0).nan_to_num_(nan=-2.0)
    x0, y0 = torch.floor(x), torch.floor(y)
    idx = x0.long().add_(y0.long(), alpha=wp)
    idx += (torch.arange(rows.start, rows.stop, device=x.device) * (hp * wp) + (2 * wp + 2)).unsqueeze(-1)
    return idx, x.sub_(x0), y.sub_(y0)


class _DepositCIC(torch.autograd.Function):
    """Cloud-in-cell deposit with a hand-written backward, both done chunk by chunk.

    Autograd through the elementwise deposit kept a dozen full-size temporaries per particle and
    setting alive and streamed them through memory; here only x, y and the weight are saved and the
    cells are recomputed in the backward. First derivatives only (once_differentiable).
    """

    @staticmethod
    def forward(ctx, x, y, weight, height, width):
        batch, n = x.shape
        hp, wp = height + 5, width + 5
        flat = torch.zeros(batch * hp * wp, dtype=x.dtype, device=x.device)
        for rows, cols in _cic_chunks(batch, n, x.device):
            idx, fx, fy = _cic_cells(x[rows, cols], y[rows, cols], rows, height, width)
            w = weight[cols] if weight.ndim == 1 else weight[rows, cols]
            wy1 = fy * w
            wy0 = w - wy1
            w01 = wy0 * fx
            w11 = wy1 * fx
            idx = idx.reshape(-1)
            flat.scatter_add_(0, idx, (wy0 - w01).reshape(-1))
            flat.scatter_add_(0, idx + 1, w01.reshape(-1))
            flat.scatter_add_(0, idx + wp, (wy1 - w11).reshape(-1))
            flat.scatter_add_(0, idx + (wp + 1), w11.reshape(-1))
        ctx.save_for_backward(x, y, weight)
        ctx.grid = (height, width)
        return flat.reshape(batch, hp, wp)[:, 2:height + 2, 2:width + 2].contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, y, weight = ctx.saved_tensors
        height, width = ctx.grid
        batch, n = x.shape
        wp = width + 5
        g = torch.nn.functional.pad(grad, (2, 3, 2, 3)).reshape(-1)
        need_x, need_y, need_w = ctx.needs_input_grad[:3]
        gx = torch.empty_like(x) if need_x else None
        gy = torch.empty_like(y) if need_y else None
        gw = torch.zeros_like(weight) if need_w else None
        for rows, cols in _cic_chunks(batch, n, x.device):
            idx, fx, fy = _cic_cells(x[rows, cols], y[rows, cols], rows, height, width)
            shape, idx = idx.shape, idx.reshape(-1)
            g00 = g.index_select(0, idx).reshape(shape)
            g01 = g.index_select(0, idx + 1).reshape(shape)
            g10 = g.index_select(0, idx + wp).reshape(shape)
            g11 = g.index_select(0, idx + (wp + 1)).reshape(shape)
            dx0, dx1 = g01 - g00, g11 - g10  # d(image gradient)/d fx along the two rows
            row0, row1 = g00 + fx * dx0, g10 + fx * dx1  # interpolated along the two rows
            w = weight[cols] if weight.ndim == 1 else weight[rows, cols]
            if need_x:
                gx[rows, cols] = (dx0 + fy * (dx1 - dx0)) * w
            if need_y:
                gy[rows, cols] = (row1 - row0) * w
            if need_w:
                value = row0 + fy * (row1 - row0)
                if weight.ndim == 1:
                    gw[cols] += value.sum(0)
                else:
                    gw[rows, cols] = value
        return gx, gy, gw, None, None


def deposit_cic(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Cloud-in-cell deposit of particles at fractional pixel coordinates.

    x, y: (B, N) column and row coordinates in pixels (pixel centres at integers); weight: (N,) or
    (B, N). Returns (B, H, W). Particles (or the parts of their cells) off the grid are dropped.
    Differentiable once in x, y and weight (bilinear in the position within a cell).
    """
    height, width = shape
    weight = torch.as_tensor(weight, dtype=x.dtype, device=x.device)
    if weight.ndim == 2 and weight.shape[0] == 1:
        weight = weight[0]
    if weight.ndim != 1:
        weight = weight.expand_as(x)
    return _DepositCIC.apply(x, y, weight, int(height), int(width))


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
        return self.image_xy(particles[..., 0], particles[..., 2], weight, overrides)

    def image_xy(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                 overrides: dict | None = None) -> torch.Tensor:
        """Image (..., H, W) of particles at transverse positions x, y (..., N) [m] (see `image`)."""
        x, y = torch.broadcast_tensors(x, y)
        lead, n = x.shape[:-1], x.shape[-1]
        x, y = x.reshape(math.prod(lead), n), y.reshape(math.prod(lead), n)
        if weight is None:
            weight = torch.full((n,), 1.0 / max(n, 1), dtype=x.dtype, device=x.device)
        elif weight.ndim > 1:
            weight = weight.expand(*lead, n).reshape(math.prod(lead), n)
        p = self.screen_values(overrides, x)
        width, height = self.resolution
        (dx, dy), (cx, cy), (sx, sy) = p["pixel_size"], p["center"], p["psf_sigma"]
        if self.method == "kde":
            img = self._kde(x, y, weight, p)
        else:
            # column and row in pixels (pixel centres at integers)
            col = (x - (cx - (width - 1) / 2 * dx)) / dx
            row = (y - (cy - (height - 1) / 2 * dy)) / dy
            img = deposit_cic(col, row, weight, (height, width))
            var_x, var_y = sx**2 - dx**2 / 6, sy**2 - dy**2 / 6
            if bool(var_y > 0):
                img = gaussian_blur_matrix(height, dy, var_y.sqrt()) @ img
            if bool(var_x > 0):
                img = img @ gaussian_blur_matrix(width, dx, var_x.sqrt()).transpose(0, 1)
        return img.reshape(*lead, height, width)

    def _kde(self, x, y, weight, p):
        width, height = self.resolution
        (dx, dy), (cx, cy), (sx, sy) = p["pixel_size"], p["center"], p["psf_sigma"]
        xs, ys = _pixel_centres(width, dx, cx), _pixel_centres(height, dy, cy)
        h = p["kde_bandwidth"]
        hx = (h**2 + sx**2).sqrt().clamp(min=dx / 2)
        hy = (h**2 + sy**2).sqrt().clamp(min=dy / 2)
        kx = torch.exp(-0.5 * ((xs - x.unsqueeze(-1)) / hx) ** 2) * (dx / (hx * math.sqrt(2 * math.pi)))
        ky = torch.exp(-0.5 * ((ys - y.unsqueeze(-1)) / hy) ** 2) * (dy / (hy * math.sqrt(2 * math.pi)))
        return (ky * weight.unsqueeze(-1)).transpose(-1, -2) @ kx
