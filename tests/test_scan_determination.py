"""Which emittances a scan can determine (psr.outputs.scan_determination), against closed-form thin-lens maps and
the simulator's thick quadrupole."""

import numpy as np
import torch

import sim
from psr.outputs.scan_determination import covariance_equations, determined_entries, scan_determines


def thin_quad_drift(k1l: np.ndarray, drift: float) -> torch.Tensor:
    """(K, 2, 4) x and y rows of drift(L) . thin quad(k1l) for upright quads: x = (1 - L k1l) x0 + L px0,
    y = (1 + L k1l) y0 + L py0."""
    maps = torch.zeros(len(k1l), 2, 4, dtype=torch.float64)
    maps[:, 0, 0] = torch.as_tensor(1 - drift * k1l)
    maps[:, 0, 1] = drift
    maps[:, 1, 2] = torch.as_tensor(1 + drift * k1l)
    maps[:, 1, 3] = drift
    return maps


def test_a_plane_needs_three_settings_and_a_thin_quadrupole_never_fixes_the_4d_emittance():
    for settings, plane_fixed in ((np.array([-0.5, 0.8]), False), (np.array([-0.5, 0.2, 0.8]), True),
                                  (np.linspace(-1, 1, 16), True)):
        fixed = determined_entries(covariance_equations(thin_quad_drift(settings, 2.0), 4), 4)
        assert bool(fixed[:2, :2].all()) is plane_fixed and bool(fixed[2:, 2:].all()) is plane_fixed, settings
        # <x y> = (1 - L k)(1 + L k) <x y> + ... : 4 coefficients spanned by {1, k, k^2}, so one x-y entry stays open
        assert not fixed[:2, 2:].all()
    # two settings: not even the position variance alone is fixed
    assert not determined_entries(covariance_equations(thin_quad_drift(np.array([-0.5, 0.8]), 2.0), 4), 4)[0, 0]


def test_scan_determines_through_the_simulator_lattice():
    """A thick quadrupole, a drift and a screen: 2 taken settings fix neither plane, 3 both, 16 not the 4D
    emittance (numerically singular: README); images not taken do not count."""
    lattice = sim.Lattice.from_list([
        {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0}, {"type": "Drift", "name": "D1", "length": 2.0},
        {"type": "Screen", "name": "YAG", "resolution": [64, 64], "pixel_size": [1e-4, 1e-4]}])
    settings = torch.linspace(-10, 20, 16, dtype=torch.float64)[:, None]
    for taken_count, plane_fixed in ((2, False), (3, True), (16, True)):
        taken = torch.zeros(16, dtype=torch.bool)
        taken[torch.linspace(0, 15, taken_count).long()] = True
        result = scan_determines(lattice, ["Q1.k1"], settings, {"YAG": taken}, 60e6, "electron", 4)
        assert result["norm_emit_x"] is plane_fixed and result["norm_emit_y_core90"] is plane_fixed, taken_count
        assert result["norm_emit_4d"] is False
    taken = torch.zeros(16, dtype=torch.bool)
    taken[[0, 15]] = True  # the other 14 images exist but were not taken: two settings
    assert scan_determines(lattice, ["Q1.k1"], settings, {"YAG": taken}, 60e6, "electron", 4)["norm_emit_x"] is False
