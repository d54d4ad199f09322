"""Transfer maps of Drift and Quadrupole: against Cheetah 0.8.4, closed forms, symplecticity,
the k1 -> 0 limit, broadcasting over settings, and autograd through a whole lattice to the images."""

import math

import pytest
import torch

import sim

cheetah = pytest.importorskip("cheetah")

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")

ZERO64 = torch.zeros((), dtype=F64)

# (p0c [eV], species): a relativistic electron, a slow electron (R56 matters, beta0 != 1) and a proton
BEAMS = [(5e6, "electron"), (0.3e6, "electron"), (1.5e9, "proton")]

QUAD_CASES = [  # (length, k1, tilt)
    (0.2, 5.0, 0.0),  # focusing, |k1 L^2| < 1 (series branch)
    (0.2, 60.0, 0.0),  # focusing, |k1 L^2| > 1 (closed-form branch)
    (0.2, -5.0, 0.0),  # defocusing, series branch
    (0.3, -40.0, 0.0),  # defocusing, closed form
    (0.2, 0.0, 0.0),  # exactly zero: a drift
    (0.2, 1e-9, 0.0),  # tiny
    (0.2, -1e-9, 0.0),
    (0.25, 12.0, 0.3),  # tilted
    (0.25, -30.0, math.pi / 4),  # skew quadrupole
    (0.1, 7.0, -1.1),
]


def cheetah_species(species: str):
    """A Cheetah species with exactly psr's mass and charge (Cheetah's electron mass is CODATA 2022,
    1e-9 off psr's; a custom species keeps the comparison at the 1e-12 level)."""
    s = sim.get_species(species)
    return cheetah.Species(f"psr_{s.name}", num_elementary_charges=torch.tensor(float(s.charge_e), dtype=F64),
                           mass_eV=torch.tensor(s.mass_eV, dtype=F64), dtype=F64)


def total_energy(p0c: float, species: str) -> torch.Tensor:
    return torch.tensor(math.sqrt(p0c**2 + sim.get_species(species).mass_eV ** 2), dtype=F64)


def coord_change(p0c: float, species: str) -> torch.Tensor:
    """C with (x, px, y, py, tau, delta) = C (x, px, y, py, z, pz) to first order."""
    _, beta = sim.relativistic_factors(p0c, species)
    return torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0 / beta, beta], dtype=F64))


def cheetah_map_in_bmad(element, p0c, species):
    c = coord_change(p0c, species)
    m7 = element.first_order_transfer_map(total_energy(p0c, species), cheetah_species(species))
    # the 7th (constant) row and column must be trivial for these elements
    assert (m7[..., :6, 6].detach() == 0).all() and (m7[..., 6, 6].detach() == 1).all()
    return torch.linalg.inv(c) @ m7[..., :6, :6] @ c


def psr_map(element, p0c, species, overrides=None):
    return element.transfer_map(p0c, species, torch.zeros((), dtype=F64), overrides)


def J6(dtype=F64):
    j = torch.zeros(6, 6, dtype=dtype)
    for a in (0, 2, 4):
        j[a, a + 1], j[a + 1, a] = 1.0, -1.0
    return j


# ----------------------------------------------------------------------------------------- Cheetah


@pytest.mark.parametrize("p0c,species", BEAMS)
@pytest.mark.parametrize("length", [0.0, 0.37, 2.5])
def test_drift_matches_cheetah(p0c, species, length):
    ours = psr_map(sim.Drift(length=length), p0c, species)
    theirs = cheetah_map_in_bmad(cheetah.Drift(length=torch.tensor(length, dtype=F64), dtype=F64), p0c, species)
    assert ours.dtype == F64 and ours.shape == (6, 6)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("p0c,species", BEAMS)
@pytest.mark.parametrize("length,k1,tilt", QUAD_CASES)
def test_quadrupole_matches_cheetah(p0c, species, length, k1, tilt):
    ours = psr_map(sim.Quadrupole(length=length, k1=k1, tilt=tilt), p0c, species)
    quad = cheetah.Quadrupole(length=torch.tensor(length, dtype=F64), k1=torch.tensor(k1, dtype=F64),
                              tilt=torch.tensor(tilt, dtype=F64), dtype=F64)
    theirs = cheetah_map_in_bmad(quad, p0c, species)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


def test_vectorised_quadrupole_matches_cheetah():
    """k1 and tilt as (K,) tensors in both codes (Cheetah's vectorisation) give the same K maps."""
    k1 = torch.tensor([-55.0, -3.0, 0.0, 1e-9, 4.0, 70.0], dtype=F64)
    tilt = torch.tensor([0.0, 0.3, math.pi / 4, 0.0, -0.2, 1.0], dtype=F64)
    ours = psr_map(sim.Quadrupole(length=0.15), 5e6, "electron", {"k1": k1, "tilt": tilt})
    quad = cheetah.Quadrupole(length=torch.tensor(0.15, dtype=F64), k1=k1, tilt=tilt, dtype=F64)
    theirs = cheetah_map_in_bmad(quad, 5e6, "electron")
    assert ours.shape == theirs.shape == (6, 6, 6)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


LINE = [  # a line with focusing, defocusing and tilted quadrupoles and drifts
    ("Quadrupole", "Q1", dict(length=0.1, k1=8.0)),
    ("Drift", "D1", dict(length=0.7)),
    ("Quadrupole", "Q2", dict(length=0.2, k1=-12.0, tilt=0.3)),
    ("Drift", "D2", dict(length=1.3)),
    ("Quadrupole", "Q3", dict(length=0.1, k1=25.0, tilt=math.pi / 4)),
    ("Drift", "D3", dict(length=2.0)),
]


def random_particles(n, generator, dtype=F64, scale=(1e-3, 1e-4, 2e-3, 2e-4, 1e-3, 1e-3)):
    return torch.randn(n, 6, generator=generator, dtype=dtype) * torch.tensor(scale, dtype=dtype)


def cheetah_line(dtype=F64, k1_q1=None):
    elements = []
    for kind, name, params in LINE:
        params = {k: torch.tensor(v, dtype=dtype) for k, v in params.items()}
        if name == "Q1" and k1_q1 is not None:
            params["k1"] = k1_q1
        elements.append(getattr(cheetah, kind)(name=name, dtype=dtype, **params))
    return cheetah.Segment(elements)


@pytest.mark.parametrize("p0c,species", BEAMS[:2])
def test_tracking_matches_cheetah_segment(p0c, species):
    """Particles tracked through a Cheetah Segment and through our Lattice agree to 1e-10 relative,
    also with the first quadrupole scanned over K values (Cheetah's vectorisation vs our settings)."""
    gen = torch.Generator().manual_seed(1)
    particles = random_particles(500, gen)
    lattice = sim.Lattice([getattr(sim, kind)(name=name, **params) for kind, name, params in LINE])
    c = coord_change(p0c, species)
    k1 = torch.tensor([-20.0, 0.0, 8.0, 31.0], dtype=F64)

    ch_particles = torch.cat([particles @ c.T, torch.ones(500, 1, dtype=F64)], dim=-1)
    ch_beam = cheetah.ParticleBeam(ch_particles, energy=total_energy(p0c, species),
                                   species=cheetah_species(species), dtype=F64)
    beam = sim.ParticleBeam(particles, p0c=p0c, species=species)
    scale = particles.std(dim=0)
    for settings, k1_q1 in (({}, None), ({"Q1.k1": k1}, k1)):
        out = lattice(beam, settings=settings).beam.particles
        theirs = cheetah_line(k1_q1=k1_q1).track(ch_beam).particles
        assert theirs.shape[:-1] == out.shape[:-1]
        back = theirs[..., :6] @ torch.linalg.inv(c).T
        # relative to the beam size in each coordinate (the coordinates cross zero)
        err = ((out - back).abs() / out.abs().amax(dim=-2, keepdim=True)).max()
        assert err < 1e-10, float(err)
        assert (out.std(dim=-2) > 0.05 * scale).all()  # the beam really went somewhere


# ------------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("p0c,species", BEAMS)
def test_drift_closed_form(p0c, species):
    length = 1.7
    m = psr_map(sim.Drift(length=length), p0c, species)
    gamma = math.sqrt(p0c**2 + sim.get_species(species).mass_eV ** 2) / sim.get_species(species).mass_eV
    expected = torch.eye(6, dtype=F64)
    expected[0, 1] = expected[2, 3] = length
    expected[4, 5] = length / gamma**2
    torch.testing.assert_close(m, expected, atol=1e-14, rtol=1e-14)


def _plane(k1: float, length: float) -> list[list[float]]:
    if k1 > 0:
        k = math.sqrt(k1)
        return [[math.cos(k * length), math.sin(k * length) / k], [-k * math.sin(k * length), math.cos(k * length)]]
    k = math.sqrt(-k1)
    return [[math.cosh(k * length), math.sinh(k * length) / k], [k * math.sinh(k * length), math.cosh(k * length)]]


@pytest.mark.parametrize("k1", [0.5, 5.0, 24.9, 25.1, 80.0, -0.5, -5.0, -24.9, -25.1, -80.0])
def test_quadrupole_closed_form(k1):
    """x-plane cos/sin with k = sqrt(k1), y-plane cosh/sinh (and the reverse for k1 < 0), R56 = L/gamma^2.

    L = 0.2 puts |k1| = 25 on the switch between the series and the closed form.
    """
    length, p0c = 0.2, 3e6
    m = psr_map(sim.Quadrupole(length=length, k1=k1), p0c, "electron")
    gamma, _ = sim.relativistic_factors(p0c, "electron")
    expected = torch.eye(6, dtype=F64)
    expected[0:2, 0:2] = torch.tensor(_plane(k1, length), dtype=F64)
    expected[2:4, 2:4] = torch.tensor(_plane(-k1, length), dtype=F64)
    expected[4, 5] = length / gamma**2
    torch.testing.assert_close(m, expected, atol=1e-13, rtol=1e-13)
    if k1 > 0:  # focusing in x for the reference species
        assert m[1, 0] < 0 and m[3, 2] > 0


@pytest.mark.parametrize("kind,params", [
    ("Drift", dict(length=3.0)),
    ("Quadrupole", dict(length=0.2, k1=7.0)),
    ("Quadrupole", dict(length=0.5, k1=-90.0)),
    ("Quadrupole", dict(length=0.2, k1=0.0)),
    ("Quadrupole", dict(length=0.3, k1=15.0, tilt=0.3)),
    ("Quadrupole", dict(length=0.3, k1=-4.0, tilt=math.pi / 4)),
])
def test_det_one_and_symplectic(kind, params):
    m = psr_map(getattr(sim, kind)(**params), 0.8e6, "electron")
    # float64 rounding of products of entries up to |m|max (544 for the strong defocusing quadrupole)
    tol = max(1e-12, 8 * torch.finfo(F64).eps * float(m.abs().max()) ** 2)
    assert abs(float(torch.linalg.det(m)) - 1.0) < tol
    torch.testing.assert_close(m.T @ J6() @ m, J6(), atol=tol, rtol=0)


def test_whole_lattice_map_symplectic():
    lattice = sim.Lattice([getattr(sim, kind)(name=name, **params) for kind, name, params in LINE])
    m = torch.eye(6, dtype=F64)
    for element in lattice.elements:
        m = psr_map(element, 2e6, "electron") @ m
    torch.testing.assert_close(m.T @ J6() @ m, J6(), atol=1e-12, rtol=0)
    assert abs(float(torch.linalg.det(m)) - 1.0) < 1e-12


def _dm_dk1_at_zero(length: float) -> torch.Tensor:
    """Exact dM/dk1 at k1 = 0: x-plane [[-L^2/2, -L^3/6], [-L, -L^2/2]], y-plane its negative."""
    d = torch.zeros(6, 6, dtype=F64)
    block = torch.tensor([[-(length**2) / 2, -(length**3) / 6], [-length, -(length**2) / 2]], dtype=F64)
    d[0:2, 0:2] = block
    d[2:4, 2:4] = -block
    return d


@pytest.mark.parametrize("k1", [1e-8, -1e-8, 1e-12])
def test_k1_to_zero_is_continuous(k1):
    """M(k1) - M_drift = k1 dM/dk1(0) + O(k1^2): tiny, and pointing the right way."""
    length = 0.4
    quad = psr_map(sim.Quadrupole(length=length, k1=k1), 5e6, "electron")
    drift = psr_map(sim.Drift(length=length), 5e6, "electron")
    assert (quad - drift).abs().max() < 1e-7
    torch.testing.assert_close(quad - drift, k1 * _dm_dk1_at_zero(length), atol=1e-15 + 1e-6 * abs(k1), rtol=0)


@pytest.mark.parametrize("tilt", [0.0, 0.4])
def test_dm_dk1_finite_at_zero(tilt):
    """Autograd d M / d k1 at k1 = 0 exactly: finite, equal to the analytic limit and to finite differences."""
    length = 0.4
    quad = sim.Quadrupole(length=length, tilt=tilt)

    def m_of(k1):
        return psr_map(quad, 5e6, "electron", {"k1": k1})

    k0 = torch.zeros((), dtype=F64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(m_of, k0)
    assert torch.isfinite(jac).all()
    h = 1e-5
    fd = (m_of(torch.tensor(h, dtype=F64)) - m_of(torch.tensor(-h, dtype=F64))) / (2 * h)
    torch.testing.assert_close(jac, fd, atol=1e-9, rtol=0)
    if tilt == 0.0:
        torch.testing.assert_close(jac, _dm_dk1_at_zero(length), atol=1e-14, rtol=0)
    else:
        rot = sim.magnets.rotation_xy(torch.tensor(tilt, dtype=F64), ZERO64)
        torch.testing.assert_close(jac, rot.T @ _dm_dk1_at_zero(length) @ rot, atol=1e-14, rtol=0)


@pytest.mark.parametrize("u0", [1.0, -1.0])
def test_series_branch_switch_is_smooth(u0):
    """At |k1 L^2| = 1 the map switches from the power series to cos/cosh: values and gradients agree."""
    length = 0.5
    k_switch = u0 / length**2
    quad = sim.Quadrupole(length=length)

    def m_of(k1):
        return psr_map(quad, 5e6, "electron", {"k1": k1})

    below = torch.tensor(k_switch * (1 - 1e-12), dtype=F64)
    above = torch.tensor(k_switch * (1 + 1e-12), dtype=F64)
    torch.testing.assert_close(m_of(below), m_of(above), atol=1e-11, rtol=0)
    jb = torch.autograd.functional.jacobian(m_of, below)
    ja = torch.autograd.functional.jacobian(m_of, above)
    torch.testing.assert_close(jb, ja, atol=1e-9, rtol=0)


def test_quadrupole_gradient_matches_cheetah():
    """d(map)/d(k1, tilt, length) through our Quadrupole equals the gradient through Cheetah's."""
    k1 = torch.tensor([-30.0, -2.0, 3.0, 45.0], dtype=F64)
    tilt = torch.tensor([0.0, 0.3, -0.7, math.pi / 4], dtype=F64)
    length = torch.tensor(0.2, dtype=F64)
    weights = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(0), dtype=F64)

    def grads(ours: bool):
        params = [t.clone().requires_grad_(True) for t in (k1, tilt, length)]
        if ours:
            m = psr_map(sim.Quadrupole(length=params[2]), 1e6, "electron", {"k1": params[0], "tilt": params[1]})
        else:
            quad = cheetah.Quadrupole(length=params[2], k1=params[0], tilt=params[1], dtype=F64)
            m = cheetah_map_in_bmad(quad, 1e6, "electron")
        return torch.autograd.grad((m * weights).sum(), params)

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------------------------ broadcasting

SCREEN = dict(type="Screen", name="S", resolution=[24, 20], pixel_size=[2e-4, 3e-4], psf_sigma=[1e-4, 2e-4])


def scan_lattice(method="cic", screen=SCREEN):
    return sim.Lattice.from_list([
        {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 3.0},
        {"type": "Drift", "name": "D1", "length": 0.5},
        {"type": "Quadrupole", "name": "Q2", "length": 0.1, "k1": -3.0},
        {"type": "Drift", "name": "D2", "length": 1.0},
        {**screen, "method": method},
    ])


def small_beam(n=400, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    particles = random_particles(n, gen, F64, scale=(6e-4, 3e-4, 6e-4, 3e-4, 1e-3, 1e-3))
    return sim.ParticleBeam(particles.to(dtype), p0c=20e6)


@pytest.mark.parametrize("method", ["cic", "kde"])
def test_settings_of_shape_k_broadcast(method):
    lattice, beam = scan_lattice(method), small_beam()
    k1 = torch.tensor([-8.0, -1.0, 0.0, 2.5, 9.0], dtype=F64)
    out = lattice(beam, settings={"Q1.k1": k1})
    assert out.beam.particles.shape == (5, 400, 6)
    assert out.images["S"].shape == (5, 20, 24)
    for k in range(5):
        single = lattice(beam, settings={"Q1.k1": k1[k]})
        assert single.beam.particles.shape == (400, 6) and single.images["S"].shape == (20, 24)
        torch.testing.assert_close(out.beam.particles[k], single.beam.particles, atol=1e-15, rtol=1e-13)
        torch.testing.assert_close(out.images["S"][k], single.images["S"], atol=1e-13, rtol=1e-12)
    # different settings really give different images
    assert (out.images["S"][0] - out.images["S"][-1]).abs().max() > 1e-3


def test_two_parameters_broadcast_to_a_grid():
    lattice, beam = scan_lattice(), small_beam()
    k1 = torch.tensor([-6.0, 0.0, 4.0], dtype=F64).reshape(3, 1)
    k2 = torch.tensor([-5.0, 5.0], dtype=F64).reshape(1, 2)
    length = torch.tensor([0.3, 0.9], dtype=F64).reshape(1, 2)
    out = lattice(beam, settings={"Q1.k1": k1, "Q2.k1": k2})
    assert out.beam.particles.shape == (3, 2, 400, 6)
    assert out.images["S"].shape == (3, 2, 20, 24)
    same_element = lattice(beam, settings={"Q1.k1": k1, "D1.length": length, "Q2.tilt": k2 / 20})
    assert same_element.images["S"].shape == (3, 2, 20, 24)
    for i in range(3):
        for j in range(2):
            single = lattice(beam, settings={"Q1.k1": k1[i, 0], "Q2.k1": k2[0, j]})
            torch.testing.assert_close(out.beam.particles[i, j], single.beam.particles, atol=1e-15, rtol=1e-13)
            torch.testing.assert_close(out.images["S"][i, j], single.images["S"], atol=1e-13, rtol=1e-12)
            single = lattice(beam, settings={"Q1.k1": k1[i, 0], "D1.length": length[0, j], "Q2.tilt": k2[0, j] / 20})
            torch.testing.assert_close(same_element.images["S"][i, j], single.images["S"], atol=1e-13, rtol=1e-12)


def test_same_element_k1_and_tilt_broadcast():
    quad = sim.Quadrupole(length=0.2)
    k1 = torch.tensor([-5.0, 1.0, 30.0], dtype=F64).reshape(3, 1)
    tilt = torch.tensor([0.0, 0.5], dtype=F64).reshape(1, 2)
    m = psr_map(quad, 5e6, "electron", {"k1": k1, "tilt": tilt})
    assert m.shape == (3, 2, 6, 6)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(m[i, j], psr_map(quad, 5e6, "electron", {"k1": k1[i, 0], "tilt": tilt[0, j]}))


def test_float32_follows_input():
    lattice, beam = scan_lattice(), small_beam(dtype=torch.float32)
    out = lattice(beam, settings={"Q1.k1": torch.tensor([1.0, 2.0])})
    assert out.beam.particles.dtype == torch.float32 and out.images["S"].dtype == torch.float32
    ref = scan_lattice()(small_beam(), settings={"Q1.k1": torch.tensor([1.0, 2.0], dtype=F64)})
    torch.testing.assert_close(out.images["S"].double(), ref.images["S"], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------- gradcheck


def _particles_off_cell_edges(lattice, k1, n, seed, margin=0.05):
    """Particles whose screen positions (in pixel units) stay `margin` away from integer CIC cell
    edges for every setting, so that the piecewise-bilinear deposit is differentiable there."""
    gen = torch.Generator().manual_seed(seed)
    screen = lattice["S"]
    chosen = []
    while sum(len(c) for c in chosen) < n:
        p = random_particles(4 * n, gen, F64, scale=(6e-4, 3e-4, 6e-4, 3e-4, 1e-3, 1e-3))
        at_screen = lattice(sim.ParticleBeam(p, p0c=20e6), settings={"Q1.k1": k1}).beam.particles
        (dx, dy), (cx, cy) = screen.pixel_size, screen.center
        col = (at_screen[..., 0] - cx) / dx + (screen.resolution[0] - 1) / 2
        row = (at_screen[..., 2] - cy) / dy + (screen.resolution[1] - 1) / 2
        frac = torch.stack([col - col.floor(), row - row.floor()])
        ok = ((frac > margin) & (frac < 1 - margin)).all(dim=0).all(dim=0)
        ok &= (col > 1).all(0) & (col < screen.resolution[0] - 2).all(0) & (row > 1).all(0)
        ok &= (row < screen.resolution[1] - 2).all(0)
        chosen.append(p[ok])
    return torch.cat(chosen)[:n]


# a coarse screen keeps the number of outputs (and so gradcheck's backward passes) small
SMALL_SCREEN = dict(type="Screen", name="S", resolution=[9, 7], pixel_size=[3e-4, 4e-4], psf_sigma=[2e-4, 3e-4])


@pytest.mark.parametrize("method", ["cic", "kde"])
def test_gradcheck_through_lattice_to_images(method):
    lattice = scan_lattice(method, SMALL_SCREEN)
    k1 = torch.tensor([-4.0, 3.0], dtype=F64)
    particles = _particles_off_cell_edges(lattice, k1, n=12, seed=5)

    def images(k1_values, x):
        return lattice(sim.ParticleBeam(x, p0c=20e6), settings={"Q1.k1": k1_values, "Q2.k1": -k1_values / 2}).images["S"]

    k1 = k1.clone().requires_grad_(True)
    particles = particles.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(images, (k1, particles), eps=1e-7, atol=1e-6, rtol=1e-4)
    # and the gradient is not trivially zero
    g_k1, g_x = torch.autograd.grad((images(k1, particles) ** 2).sum(), (k1, particles))
    assert g_k1.abs().min() > 0 and g_x.abs().max() > 0


def test_gradients_reach_element_parameters():
    """Element parameters given as tensors that require grad (lengths here) get correct gradients through
    tracking and the image; an nn.Parameter stays trainable (listed by lattice.parameters())."""
    beam = small_beam(n=30, seed=2)

    def build(q_length, d_length):
        return sim.Lattice([
            sim.Quadrupole(name="Q1", length=q_length, k1=2.0),
            sim.Drift(name="D1", length=d_length),
            sim.Screen(name="S", resolution=(9, 7), pixel_size=(3e-4, 4e-4), psf_sigma=(1e-4, 2e-4),
                       method="kde", kde_bandwidth=1e-4),
        ])

    def images(q_length, d_length):
        return build(q_length, d_length)(beam, settings={"Q1.tilt": torch.tensor(0.2, dtype=F64)}).images["S"]

    lengths = (torch.tensor(0.1, dtype=F64, requires_grad=True), torch.tensor(0.8, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(images, lengths, eps=1e-7, atol=1e-6, rtol=1e-4)

    lattice = build(torch.nn.Parameter(torch.tensor(0.1, dtype=F64)), torch.nn.Parameter(torch.tensor(0.8, dtype=F64)))
    assert len(list(lattice.parameters())) == 2
    (lattice(beam).images["S"] ** 2).sum().backward()
    assert lattice["Q1"].length.grad is not None and lattice["D1"].length.grad.abs() > 0
