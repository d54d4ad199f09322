"""Screen images: orientation and pixel centres per the contract, weight conservation, moments with
the point-spread function, non-negativity, and agreement with Cheetah's cloud-in-cell screen."""

import pytest
import torch

import sim

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


W, H = 13, 9  # W != H and both odd/even mixes catch transposes
DX, DY = 2e-4, 3e-4
CX, CY = 1.1e-3, -0.7e-3


def screen(method="cic", **kw):
    values = dict(resolution=(W, H), pixel_size=(DX, DY), center=(CX, CY), method=method)
    values.update(kw)
    return sim.Screen(name="S", **values)


def at(x, y, dtype=F64):
    """Particles (N, 6) at transverse positions x, y."""
    x, y = torch.as_tensor(x, dtype=dtype).reshape(-1), torch.as_tensor(y, dtype=dtype).reshape(-1)
    p = torch.zeros(len(x), 6, dtype=dtype)
    p[:, 0], p[:, 2] = x, y
    return p


def centre_of(i, j):
    """Contract: pixel (i, j) is centred at x = cx + (j - (W-1)/2) dx, y = cy + (i - (H-1)/2) dy."""
    return CX + (j - (W - 1) / 2) * DX, CY + (i - (H - 1) / 2) * DY


# ------------------------------------------------------------------------------------- orientation


def test_pixel_centres_match_contract():
    xs, ys = screen().pixel_centres(torch.zeros((), dtype=F64))
    assert xs.shape == (W,) and ys.shape == (H,)
    torch.testing.assert_close(xs, torch.tensor([centre_of(0, j)[0] for j in range(W)], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(ys, torch.tensor([centre_of(i, 0)[1] for i in range(H)], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("i,j", [(3, 7), (0, 0), (H - 1, W - 1), (H - 1, 0), (4, 6)])
def test_particle_at_pixel_centre_lands_in_that_pixel(i, j):
    x, y = centre_of(i, j)
    img = screen().image(at(x, y))
    assert img.shape == (H, W)
    expected = torch.zeros(H, W, dtype=F64)
    expected[i, j] = 1.0
    torch.testing.assert_close(img, expected, atol=1e-9, rtol=0)
    # KDE: the brightest pixel is the same one, and the blob is symmetric about it
    kde = screen("kde", kde_bandwidth=DX).image(at(x, y))
    assert divmod(int(kde.argmax()), W) == (i, j)
    if 0 < i < H - 1 and 0 < j < W - 1:
        assert abs(float(kde[i, j - 1] - kde[i, j + 1])) < 1e-12 and abs(float(kde[i - 1, j] - kde[i + 1, j])) < 1e-12


def test_plus_x_is_higher_column_plus_y_is_higher_row():
    x, y = centre_of(4, 6)
    for method in ("cic", "kde"):
        s = screen(method)
        base = divmod(int(s.image(at(x, y)).argmax()), W)
        right = divmod(int(s.image(at(x + 2 * DX, y)).argmax()), W)
        up = divmod(int(s.image(at(x, y + 3 * DY)).argmax()), W)
        assert base == (4, 6)
        assert right == (4, 8), method
        assert up == (7, 6), method


def test_cic_splits_bilinearly_between_neighbours():
    x, y = centre_of(2, 5)
    img = screen().image(at(x + 0.25 * DX, y + 0.6 * DY))
    expected = torch.zeros(H, W, dtype=F64)
    expected[2, 5] = 0.75 * 0.4
    expected[2, 6] = 0.25 * 0.4
    expected[3, 5] = 0.75 * 0.6
    expected[3, 6] = 0.25 * 0.6
    torch.testing.assert_close(img, expected, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------ conservation


def test_cic_conserves_weight_of_on_screen_particles():
    gen = torch.Generator().manual_seed(0)
    # uniformly inside the region where all four CIC neighbours are pixels
    u = torch.rand(1000, 2, generator=gen, dtype=F64)
    x = CX + (u[:, 0] - 0.5) * (W - 1) * DX
    y = CY + (u[:, 1] - 0.5) * (H - 1) * DY
    img = screen().image(at(x, y))
    assert abs(float(img.sum()) - 1.0) < 1e-12
    weight = torch.rand(1000, generator=gen, dtype=F64)
    assert abs(float(screen().image(at(x, y), weight).sum() - weight.sum())) < 1e-10


def test_cic_drops_off_screen_particles():
    s = screen()
    far = [(CX + 100 * W * DX, CY), (CX - 100 * W * DX, CY), (CX, CY + 50 * H * DY), (CX, CY - 50 * H * DY),
           (CX - (W / 2 + 3) * DX, CY - (H / 2 + 3) * DY)]
    # far away: nothing anywhere (in particular no clamping into the edge pixels)
    for x, y in far:
        assert float(s.image(at(x, y)).abs().sum()) == 0.0
    # a mix: 3 of 5 particles on the screen -> 3/5 of the weight
    xc, yc = centre_of(4, 6)
    mixed = at([xc, xc + DX / 3, far[0][0], far[2][0], xc], [yc, yc, far[0][1], far[2][1], yc - DY / 4])
    assert abs(float(s.image(mixed).sum()) - 3 / 5) < 1e-12
    # a fraction f of a cell past an edge pixel centre keeps 1 - f in that pixel; the rest is off the grid
    for (i, j), (sx, sy) in [((4, W - 1), (0.5, 0)), ((4, 0), (-0.3, 0)), ((0, 6), (0, -0.7)), ((H - 1, 6), (0, 0.2)),
                             ((0, 0), (-0.5, -0.5))]:
        x, y = centre_of(i, j)
        img = s.image(at(x + sx * DX, y + sy * DY))
        kept = (1 - abs(sx)) * (1 - abs(sy))
        assert abs(float(img.sum()) - kept) < 1e-12 and abs(float(img[i, j]) - kept) < 1e-12, (i, j)


# ---------------------------------------------------------------------------------------- moments


def image_moments(img, s):
    xs, ys = s.pixel_centres(img)
    total = img.sum(dim=(-1, -2))
    px, py = img.sum(dim=-2) / total, img.sum(dim=-1) / total
    mx, my = (px * xs).sum(-1), (py * ys).sum(-1)
    vx, vy = (px * (xs - mx) ** 2).sum(-1), (py * (ys - my) ** 2).sum(-1)
    return mx, my, vx, vy


def gaussian_particles(n, sx, sy, mx, my, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, 6, generator=gen, dtype=F64) * torch.tensor([sx, 1e-4, sy, 1e-4, 1e-3, 1e-3], dtype=F64)
    p[:, 0] += mx
    p[:, 2] += my
    return p.to(dtype)


BIG = dict(resolution=(96, 80), pixel_size=(1e-4, 1.5e-4), center=(2e-4, -3e-4))


@pytest.mark.parametrize("method,psf,bandwidth,tol", [
    ("cic", (1.5, 2.0), 0.0, 0.02),
    ("cic", (3.0, 1.0), 0.0, 0.02),
    ("kde", (1.5, 2.0), 0.0, 0.02),
    ("kde", (1.0, 1.0), 1.2, 0.02),
])
def test_gaussian_beam_moments_include_psf(method, psf, bandwidth, tol):
    """centroid and rms of the image = particle centroid and sqrt(rms^2 + psf^2 (+ kde_bandwidth^2))."""
    (dx, dy), (cx, cy) = BIG["pixel_size"], BIG["center"]
    s = sim.Screen(name="S", method=method, psf_sigma=(psf[0] * dx, psf[1] * dy), kde_bandwidth=bandwidth * dx, **BIG)
    p = gaussian_particles(40_000, 6 * dx, 5 * dy, cx + 3.3 * dx, cy - 2.6 * dy)
    img = s.image(p)
    assert img.shape == (80, 96) and (img >= 0).all()
    mx, my, vx, vy = image_moments(img, s)
    bx, by = p[:, 0].mean(), p[:, 2].mean()
    bvx, bvy = p[:, 0].var(unbiased=False), p[:, 2].var(unbiased=False)
    extra_x = (psf[0] * dx) ** 2 + (bandwidth * dx) ** 2
    extra_y = (psf[1] * dy) ** 2 + (bandwidth * dx) ** 2
    assert abs(float(mx - bx)) < 0.01 * dx and abs(float(my - by)) < 0.01 * dy
    assert abs(float(vx / (bvx + extra_x)) - 1) < tol
    assert abs(float(vy / (bvy + extra_y)) - 1) < tol
    assert abs(float(img.sum()) - 1) < 1e-3  # nothing lost: the beam is well inside


@pytest.mark.parametrize("psf", [0.5, 1.0])
def test_small_beam_variance_is_exact_for_cic(psf):
    """A beam of 1.5 pixels rms: the image variance is beam variance + psf^2 to 0.5%, so neither the
    intrinsic CIC smoothing (d^2/6) nor a sub-pixel PSF (three-tap kernel) is lost or double counted."""
    dx = dy = 1e-4
    s = sim.Screen(name="S", resolution=(40, 40), pixel_size=(dx, dy), psf_sigma=(psf * dx, psf * dy))
    p = gaussian_particles(40_000, 1.5 * dx, 1.5 * dy, 0.3 * dx, -0.2 * dy, seed=3)
    mx, my, vx, vy = image_moments(s.image(p), s)
    assert abs(float(mx - p[:, 0].mean())) < 1e-3 * dx
    assert abs(float(vx / (p[:, 0].var(unbiased=False) + (psf * dx) ** 2)) - 1) < 0.005
    assert abs(float(vy / (p[:, 2].var(unbiased=False) + (psf * dy) ** 2)) - 1) < 0.005


def test_cic_without_psf_adds_only_cell_smoothing():
    """psf 0: the CIC image variance is the beam's plus the cloud-in-cell d^2/6 (no blur applied)."""
    dx = 1e-4
    s = sim.Screen(name="S", resolution=(40, 40), pixel_size=(dx, dx))
    p = gaussian_particles(40_000, 1.5 * dx, 1.5 * dx, 0.0, 0.0, seed=4)
    _, _, vx, _ = image_moments(s.image(p), s)
    assert abs(float(vx / (p[:, 0].var(unbiased=False) + dx**2 / 6)) - 1) < 0.005


@pytest.mark.parametrize("method", ["cic", "kde"])
@pytest.mark.parametrize("psf", [(0.0, 0.0), (0.3e-4, 0.5e-4), (2e-4, 3e-4)])
def test_images_non_negative(method, psf):
    p = gaussian_particles(2000, 4e-4, 6e-4, 2e-4, 0.0, seed=7)  # partly off the screen
    img = screen(method, psf_sigma=psf).image(p)
    assert (img >= 0).all() and img.sum() > 0


@pytest.mark.parametrize("method,psf", [("cic", (2e-4, 4.5e-4)), ("cic", (0.9e-4, 1.5e-4)), ("kde", (2e-4, 4.5e-4))])
def test_gradcheck_psf_sigma(method, psf):
    """The image is differentiable in the PSF width (a screen parameter fitted as a lattice setting),
    for the sampled-Gaussian blur, the sub-pixel three-tap blur and the KDE."""
    lattice = sim.Lattice([sim.Drift(name="D", length=0.3), screen(method)])
    beam = sim.ParticleBeam(gaussian_particles(200, 4e-4, 6e-4, CX, CY, seed=2), p0c=10e6)

    def image(psf_sigma):
        return lattice(beam, settings={"S.psf_sigma": psf_sigma}).images["S"]

    psf = torch.tensor(psf, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(image, (psf,), eps=1e-9, atol=1e-6, rtol=1e-4)
    (grad,) = torch.autograd.grad((image(psf) ** 2).sum(), psf)
    assert (grad < 0).all()  # more blur, flatter image, smaller sum of squares


# ------------------------------------------------------------------------- the chunked CIC deposit


def reference_cic(x, y, weight, shape):
    """Plain autograd cloud-in-cell: each particle's four corners, masked when off the grid."""
    height, width = shape
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    img = torch.zeros(x.shape[0], height * width, dtype=x.dtype)
    for dc, wx in ((0, 1 - fx), (1, fx)):
        for dr, wy in ((0, 1 - fy), (1, fy)):
            col, row = x0 + dc, y0 + dr
            inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
            index = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1)).long()
            img = img.scatter_add(1, index, torch.where(inside, wx * wy * weight, 0.0))
    return img.reshape(-1, height, width)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 17])
@pytest.mark.parametrize("weight_shape", ["shared", "per_setting"])
def test_cic_deposit_matches_reference(monkeypatch, chunk, weight_shape):
    """The chunked deposit with its hand-written backward equals plain autograd CIC: images and the
    gradients in x, y and weight, for chunks that split rows, group rows, or take everything at once,
    with particles on, off and straddling every edge."""
    monkeypatch.setattr(sim.screen, "_CIC_CHUNK", chunk)
    gen = torch.Generator().manual_seed(1)
    batch, n, shape = 3, 40, (6, 9)
    x = torch.rand(batch, n, generator=gen, dtype=F64) * 13 - 2.5  # columns -2.5 .. 10.5 (W = 9)
    y = torch.rand(batch, n, generator=gen, dtype=F64) * 10 - 2.0  # rows -2 .. 8 (H = 6)
    x[0, :6] = torch.tensor([-1.0, -0.5, 8.0, 8.5, 9.0, 1e6])
    y[1, :4] = torch.tensor([-1.0, -0.25, 5.5, -1e6])
    w = torch.rand(n if weight_shape == "shared" else (batch, n), generator=gen, dtype=F64)
    target = torch.rand(batch, *shape, generator=gen, dtype=F64)
    results = []
    for deposit in (sim.screen.deposit_cic, reference_cic):
        xs, ys, ws = (t.clone().requires_grad_(True) for t in (x, y, w))
        img = deposit(xs, ys, ws, shape)
        ((img - target) ** 2).sum().backward()
        results.append((img.detach(), xs.grad, ys.grad, ws.grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-13, rtol=1e-12)
    total = float(w.sum()) * (batch if weight_shape == "shared" else 1)
    assert 0.2 * total < float(results[0][0].sum()) < 0.9 * total  # some weight on the grid, some off it


def test_cic_deposit_gradcheck_and_bad_values(monkeypatch):
    monkeypatch.setattr(sim.screen, "_CIC_CHUNK", 5)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 12, generator=gen, dtype=F64) * 6 - 0.5
    y = torch.rand(2, 12, generator=gen, dtype=F64) * 4 - 0.5
    x = x.floor() + 0.1 + 0.8 * (x - x.floor())  # away from cell edges, where CIC has kinks
    y = y.floor() + 0.1 + 0.8 * (y - y.floor())
    w = torch.rand(12, generator=gen, dtype=F64)
    inputs = tuple(t.requires_grad_(True) for t in (x, y, w))
    assert torch.autograd.gradcheck(lambda a, b, c: sim.screen.deposit_cic(a, b, c, (4, 6)), inputs)
    # NaN and infinite positions are dropped (no error, no NaN in the image)
    bad = torch.tensor([[float("nan"), float("inf"), -float("inf"), 2.0]], dtype=F64)
    img = sim.screen.deposit_cic(bad, torch.full_like(bad, 1.0), torch.ones(4, dtype=F64), (4, 6))
    assert torch.isfinite(img).all() and float(img.sum()) == 1.0 and float(img[0, 1, 2]) == 1.0


# ------------------------------------------------------------------------------- shapes and dtypes


def test_batched_image_shapes_and_dtype():
    s = screen("cic", psf_sigma=(3e-4, 3e-4))
    p = gaussian_particles(500, 4e-4, 6e-4, CX, CY).to(torch.float32)
    batch = torch.stack([p, p * 1.3, p * 0.7]).reshape(3, 1, 500, 6).expand(3, 2, 500, 6)
    img = s.image(batch)
    assert img.shape == (3, 2, H, W) and img.dtype == torch.float32
    torch.testing.assert_close(img[1, 0], s.image(p * 1.3), atol=1e-6, rtol=1e-5)


def test_screen_settings_are_applied_not_ignored():
    """A screen parameter passed as a lattice setting changes the image like the stored value does."""
    items = [{"type": "Drift", "name": "D", "length": 0.5},
             {"type": "Screen", "name": "S", "resolution": [W, H], "pixel_size": [DX, DY], "center": [CX, CY]}]
    lattice = sim.Lattice.from_list(items)
    beam = sim.ParticleBeam(gaussian_particles(500, 4e-4, 6e-4, CX, CY), p0c=10e6)
    via_setting = lattice(beam, settings={"S.psf_sigma": torch.tensor([3e-4, 4e-4], dtype=F64)}).images["S"]
    items[1]["psf_sigma"] = [3e-4, 4e-4]
    stored = sim.Lattice.from_list(items)(beam).images["S"]
    torch.testing.assert_close(via_setting, stored)
    assert (via_setting - lattice(beam).images["S"]).abs().max() > 1e-3
    # the kde path and the centre too
    items[1].update(method="kde", psf_sigma=[0.0, 0.0])
    kde = sim.Lattice.from_list(items)
    shifted = kde(beam, settings={"S.center": torch.tensor([CX + 2 * DX, CY], dtype=F64)}).images["S"]
    moved_beam = beam.with_particles(beam.particles - torch.tensor([2 * DX, 0, 0, 0, 0, 0], dtype=F64))
    torch.testing.assert_close(shifted, kde(moved_beam).images["S"], atol=1e-12, rtol=1e-9)
    # one screen value per scan: a per-setting screen parameter is refused, as is a bad value
    with pytest.raises(ValueError, match="psf_sigma must have shape"):
        lattice(beam, settings={"S.psf_sigma": torch.full((3, 2), 1e-4, dtype=F64)})
    with pytest.raises(ValueError, match="psf_sigma must be >= 0"):
        lattice(beam, settings={"S.psf_sigma": torch.tensor([-1e-4, 1e-4], dtype=F64)})
    with pytest.raises(ValueError, match="pixel_size must be positive"):
        lattice(beam, settings={"S.pixel_size": torch.tensor([0.0, 1e-4], dtype=F64)})


# ------------------------------------------------------------------------------------------ Cheetah


def test_cic_image_matches_cheetah():
    """Same particles, same pixels: our CIC image equals Cheetah's cloud-in-cell reading (normalised),
    and both put +x in higher columns and +y in higher rows."""
    cheetah = pytest.importorskip("cheetah")
    res, size = (40, 30), (1e-4, 1.5e-4)
    p = gaussian_particles(5000, 3e-4, 4e-4, 6e-4, -3e-4, seed=9)
    ours = sim.Screen(name="S", resolution=res, pixel_size=size).image(p)
    cs = cheetah.Screen(resolution=res, pixel_size=torch.tensor(size, dtype=F64), method="cloud-in-cell",
                        is_active=True, dtype=F64)
    seven = torch.cat([p, torch.ones(len(p), 1, dtype=F64)], dim=-1)
    cs.track(cheetah.ParticleBeam(seven, energy=torch.tensor(10e6, dtype=F64), dtype=F64))
    theirs = cs.reading
    assert theirs.shape == ours.shape == (30, 40)
    torch.testing.assert_close(ours, theirs / theirs.sum(), atol=1e-12, rtol=1e-9)
    xs, ys = sim.Screen(name="S", resolution=res, pixel_size=size).pixel_centres(p)
    mx = (ours.sum(0) * xs).sum()
    my = (ours.sum(1) * ys).sum()
    assert mx > 4e-4 and my < -2e-4
