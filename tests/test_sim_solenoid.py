"""Solenoid: against Cheetah 0.8.4 in float64, symplecticity, rotation sense, ks -> 0 limit."""

import pytest
import torch

import sim

from test_sim_maps import BEAMS, J6, cheetah, cheetah_map_in_bmad, psr_map  # noqa: F401

F64 = torch.float64
CASES = [(0.5, 2.0), (0.3, -7.0), (1.0, 40.0), (0.4, 0.0), (0.4, 1e-9)]  # (length, ks)


@pytest.mark.parametrize("p0c, species", BEAMS)
@pytest.mark.parametrize("length, ks", CASES)
def test_solenoid_matches_cheetah(p0c, species, length, ks):
    ours = psr_map(sim.Solenoid("S", length=length, ks=ks), p0c, species)
    theirs = cheetah_map_in_bmad(
        cheetah.Solenoid(length=torch.tensor(length, dtype=F64), k=torch.tensor(ks / 2, dtype=F64), dtype=F64),
        p0c, species)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("length, ks", CASES)
def test_symplectic_and_rotation_sense(length, ks):
    m = psr_map(sim.Solenoid("S", length=length, ks=ks), 5e7, "electron")
    torch.testing.assert_close(m.T @ J6() @ m, J6(), atol=1e-12, rtol=0)
    if ks > 1e-6:
        assert m[2, 0] < 0  # a particle at +x is turned towards -y


def test_zero_field_is_a_drift_and_broadcasts():
    ks = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    batch = psr_map(sim.Solenoid("S", length=0.5), 5e7, "electron", {"ks": ks})
    assert batch.shape == (3, 6, 6)
    torch.testing.assert_close(batch[0], psr_map(sim.Drift("D", length=0.5), 5e7, "electron"), atol=1e-15, rtol=0)
    torch.testing.assert_close(batch[2], psr_map(sim.Solenoid("S", length=0.5, ks=3.0), 5e7, "electron"),
                               atol=1e-15, rtol=0)
