"""Space charge with recomputation (`SpaceCharge(checkpoint=True)`, the default): the same gradients as
plain autograd, and memory kept for the backward pass that grows by only positions and a field grid per kick."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sim
from space_charge_analytic import sample_uniform_ellipsoid

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_space_charge_memory.py"
ITEMS = [{"type": "Quadrupole", "name": "Q", "length": 0.1}, {"type": "Drift", "name": "D", "length": 0.5}]


def gradients(checkpoint: bool, extent):
    """Final particles and d(loss)/d(particles, Q.k1, D.length) through a quadrupole scan (2 settings:
    two bunch sizes, two sets of Green's functions) and a drift with 5 kicks, float64."""
    particles = torch.as_tensor(sample_uniform_ellipsoid(2000, [1e-3, 0.6e-3, 1.5e-3], seed=2))
    particles[:, 1] += 2e-4 * particles[:, 0] / 1e-3  # a little correlation, so no gradient vanishes by symmetry
    space_charge = sim.SpaceCharge((8, 8, 8), 0.1, extent=extent, checkpoint=checkpoint)
    lattice = sim.Lattice.from_list(ITEMS, space_charge=space_charge)
    coords = particles.clone().requires_grad_(True)
    k1 = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
    length = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = lattice(sim.ParticleBeam(coords, 5e6, "electron", 1e-9), {"Q.k1": k1, "D.length": length}).beam.particles
    loss = out[..., 0].square().mean() + out[..., 3].square().mean() + 0.3 * (out[..., 4] * out[..., 5]).mean()
    return (out.detach(), *torch.autograd.grad(loss, (coords, k1, length)))


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # the drift length's
@pytest.mark.parametrize("extent", [None, 1.5])
def test_recomputed_gradients_equal_autograd(extent):
    """Particles and gradients with respect to the particles, a quadrupole's k1 and a drift's length:
    the same with and without recomputation, to float64 rounding (extent 1.5 puts outliers on the faces)."""
    with_recompute, plain = gradients(True, extent), gradients(False, extent)
    for name, a, b in zip(("particles", "d/dparticles", "d/dk1", "d/dlength"), with_recompute, plain):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12 * float(b.abs().max()), msg=name)


def saved_bytes(kicks: int, checkpoint: bool, n: int, grid: int) -> int:
    """Bytes autograd keeps (each storage once; the cached Green's functions excluded) for `kicks`
    kicks alternating with drifts of 2.5 cm, made by hand (no lattice, so no groups of slices), float32."""
    particles = torch.as_tensor(sample_uniform_ellipsoid(n, [1e-3] * 3, seed=0)).float().requires_grad_(True)
    space_charge = sim.SpaceCharge((grid,) * 3, checkpoint=checkpoint)
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = particles
        for _ in range(kicks):
            x = space_charge.kick(x, 5e6, "electron", 1e-9, 0.025)
            x = x + 0.025 * x[:, [1, 1, 3, 3, 5, 5]] * torch.tensor([1, 0, 1, 0, 1, 0])  # x += L px, ...
        loss = x[:, 1].square().mean() + x[:, 5].square().mean()
    loss.backward()
    assert torch.isfinite(particles.grad).all()
    cache = {k.untyped_storage().data_ptr() for k in space_charge._kernels.values()}
    return sum(v for k, v in saved.items() if k not in cache)


def test_a_kick_keeps_only_positions_and_field_grid():
    """From 1 to 10 kicks, each extra kick keeps no more than its particles' positions (N x 3) and its
    field grid (3 x nx ny nz), float32; plain autograd keeps more than twice that (the deposit's grid
    coordinates, the padded charge grid, the gathered fields ...)."""
    n, grid = 10_000, 16
    per_kick = (n * 3 + 3 * grid**3) * 4
    lean = saved_bytes(10, True, n, grid) - saved_bytes(1, True, n, grid)
    plain = saved_bytes(10, False, n, grid) - saved_bytes(1, False, n, grid)
    assert lean <= 9 * per_kick * 1.01
    assert plain > 2 * lean


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux to reset the peak RSS")
def test_peak_memory_of_24_kicks_within_twice_one_kick():
    """Peak RSS growth of a forward + backward through a 1 m drift (20k particles, 16^3 grid, float32,
    Green's functions cached), measured in a fresh process (benchmarks/bench_space_charge_memory.py):
    24 kicks need at most 2x the memory of 1 kick with checkpointing, over 2.5x without."""
    command = [sys.executable, str(BENCHMARK), "--particles", "20000", "--grid", "16", "--threads", "1",
               "--child", "1", "on", "24", "on", "1", "off", "24", "off"]
    # a clean environment (nothing earlier tests set), freed tensors go back to the system
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"), "MALLOC_MMAP_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    on_1, on_24, off_1, off_24 = (json.loads(line)["warm_mib"] for line in out[-4:])
    message = f"MiB: on {on_1:.1f} / {on_24:.1f}, off {off_1:.1f} / {off_24:.1f} (1 / 24 kicks)"
    assert on_24 <= 2 * on_1, message
    assert off_24 > 2.5 * off_1, message


def test_checkpoint_option():
    assert sim.SpaceCharge().checkpoint is True
    config = sim.SpaceCharge.from_config({"grid_shape": [8, 8, 8], "max_step": 0.1, "checkpoint": False})
    assert config.checkpoint is False and "checkpoint=False" in repr(config)
    with pytest.raises(ValueError, match="checkpoint must be true or false"):
        sim.SpaceCharge(checkpoint="yes")
