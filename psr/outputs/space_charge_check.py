"""How much a fit's space-charge model error moves its emittances (issue 15, "honest uncertainty").

A fit with space charge reproduces the measured images through its own (coarse) space-charge model. Tracked
through a finer reference model, the reconstructed beam gives other rms sizes at the screen; a beam that
matches the images through the reference model differs from it by about the inverse of that change. The
change of the rms emittance is estimated by the quad-scan linearization: per plane, the size^2 changes
d_k = sigma_k,ref^2 - sigma_k^2 at the K settings are fitted (least squares weighted by 1 / sigma_k^2) by a
change dS of the beam's 2x2 covariance through sigma_k^2 = a_k^2 S11 + 2 a_k b_k S12 + b_k^2 S22, where
(a_k, b_k) are the beam's effective linear map from (u, pu) at the start to u at the screen (the least-squares
regression of the tracked particles, space charge included), and
    d(eps) / eps = (S22 dS11 + S11 dS22 - 2 S12 dS12) / (2 eps^2).
This is the relative error that the space-charge model gives the fitted emittance (its bias): the reference's
best estimate is reconstructed / (1 + bias). Measured on the hard-beam family through the space-charge
beamline (benchmarks/hard_beams.py), it predicted each fit's rms emittance error within 0.2-1.7 %.

A fit with neural elements in place of space-charge sections (a surrogate) gets the same comparison against
the scan's own lattice with PIC. There the linearization is rough: it assumes that the model answers a change
of the beam as the reference does, and the surrogate's size errors on a fitted beam reach 10 % (on the shipped
surrogate fit, seeds 0 / 1, it moved the errors from x +8.0 / -19.8 %, y +9.3 / -5.0 % to -5.4 / -7.7 %,
-1.0 / -6.6 %).
"""

import numpy as np
import torch

import sim

PLANES = {"x": (0, 1), "y": (2, 3)}
MAX_REFERENCE_CELLS = 64  # per axis: a finer reference grid costs 8x the memory per doubling
# a surrogate fit's reference: PIC at the settings the shipped surrogate's pairs were made with
SURROGATE_REFERENCE = sim.SpaceCharge(grid_shape=[32, 32, 32], max_step=0.1, checkpoint=False, compensate=True)


def reference_space_charge(model: sim.SpaceCharge) -> sim.SpaceCharge:
    """The finer reference of a fit's space-charge model: twice the cells per axis (at most 64), 0.4 of its
    step, over the bunch's bounding box (no extent: far particles keep their own field), with the model's
    smoothing compensation (`compensate`: else the reference's own smoothing, not the model's error, is measured).
    A grid-free model (solver gaussian or linear, held or not) gets PIC on 32^3 cells, compensated, as its reference."""
    solver = getattr(model, "solver", None) or model
    if not isinstance(solver, sim.SpaceCharge):
        return sim.SpaceCharge(grid_shape=[32, 32, 32], max_step=0.4 * solver.max_step, checkpoint=False, compensate=True)
    return sim.SpaceCharge(grid_shape=[min(2 * n, MAX_REFERENCE_CELLS) for n in model.grid_shape],
                           max_step=0.4 * model.max_step, checkpoint=False, compensate=model.compensate)


def reference_info(space_charge: sim.SpaceCharge) -> dict:
    """The reference's settings as the checks record them."""
    return {"grid_shape": list(space_charge.grid_shape), "max_step": space_charge.max_step,
            "compensate": space_charge.compensate}


def emittance_plane(key: str) -> str:
    """The plane of an emittance key: norm_emit_x and norm_emit_x_core90 -> "x"."""
    return key.removeprefix("norm_emit_").removesuffix("_core90")


def emittance_bias(initial: np.ndarray, screen: np.ndarray, reference: np.ndarray) -> dict:
    """Relative rms-emittance error per plane that the model of `screen` gives a fitted beam, if `reference`
    were the true physics (module docstring). initial (N, 6) particles at the start; screen, reference
    (K, N, 6) the same particles at the screen at K settings, tracked by the model and by the reference.
    Returns {"x": bias, "y": bias, "size_change": {"x": max_k |sigma_ref / sigma - 1|, "y": ...}}."""
    start = initial - initial.mean(0)
    out, change = {}, {}
    for plane, (u, pu) in PLANES.items():
        cov = np.cov(start[:, [u, pu]].T, bias=True)
        emittance2 = np.linalg.det(cov)
        rows, changes = [], []
        for model_k, reference_k in zip(screen, reference):
            var = model_k[:, u].var()
            coefficients, *_ = np.linalg.lstsq(start, model_k[:, u] - model_k[:, u].mean(), rcond=None)
            a, b = coefficients[u], coefficients[pu]
            rows.append(np.array([a * a, 2 * a * b, b * b]) / var)
            changes.append((reference_k[:, u].var() - var) / var)
        d_cov, *_ = np.linalg.lstsq(np.array(rows), np.array(changes), rcond=None)
        out[plane] = float((cov[1, 1] * d_cov[0] + cov[0, 0] * d_cov[2] - 2 * cov[0, 1] * d_cov[1]) / (2 * emittance2))
        change[plane] = float(np.max(np.abs(np.sqrt(np.maximum(np.array(changes) + 1, 0)) - 1)))
    out["size_change"] = change
    return out


def _at_screen(lattice: sim.Lattice, settings: dict, screen: str, beam: sim.ParticleBeam) -> np.ndarray:
    """The beam's particles (K, N, 6) at `screen` (the lattice up to it), float64 on the CPU."""
    elements = list(lattice.elements)
    last = next(i for i, e in enumerate(elements) if e.name == screen)
    names = {e.name for e in elements[:last + 1]}
    upto = {k: v for k, v in settings.items() if sim.lattice.parse_setting_name(k)[0] in names}
    part = sim.Lattice(elements[:last + 1], space_charge=lattice.space_charge)
    return part(beam, upto).beam.particles.to(torch.float64).cpu().numpy()


@torch.no_grad()
def compare_to_reference(lattice: sim.Lattice, settings: dict, reference: sim.Lattice, reference_settings: dict,
                         beam: sim.ParticleBeam) -> dict | None:
    """emittance_bias of `lattice` against `reference` (two lattices with the same first screen, each with its
    own (K,) settings) for `beam`, at that screen: {"screen", "x", "y", "size_change"}; None when there is no
    screen or fewer than 3 settings."""
    screens = list(lattice.screens)
    count = len(next(iter(settings.values()))) if settings else 0
    if not screens or count < 3 or beam.particles.ndim != 2:
        return None
    tracked = [np.broadcast_to(t, (count, *t.shape[-2:])) for t in
               (_at_screen(lattice, settings, screens[0], beam), _at_screen(reference, reference_settings, screens[0], beam))]
    return {"screen": screens[0], **emittance_bias(beam.particles.to(torch.float64).cpu().numpy(), *tracked)}


def space_charge_check(lattice: sim.Lattice, settings: dict[str, torch.Tensor], beam: sim.ParticleBeam,
                       reference: sim.SpaceCharge | None = None) -> dict | None:
    """The emittance bias of `lattice`'s space-charge model (sim.SpaceCharge) against `reference` (default:
    reference_space_charge), at the first screen and the (K,) `settings` of the fit (as the lattice takes
    them). None when the lattice has no PIC space charge, no screen, or fewer than 3 settings. Returns
    {"reference": {grid_shape, max_step}, "screen", "x", "y" (relative biases), "size_change"}. (The fit's 10k
    particles against 50k, made of 5 jittered copies, changed the biases by 0.1-0.2 %.)"""
    if not isinstance(lattice.space_charge, sim.SpaceCharge):
        return None
    reference = reference or reference_space_charge(lattice.space_charge)
    result = compare_to_reference(lattice, settings, sim.Lattice(list(lattice.elements), reference), settings, beam)
    return result and {"reference": reference_info(reference), **result}


def describe(check: dict) -> str:
    """One line for the end-of-fit report."""
    grid = "x".join(str(n) for n in check["reference"]["grid_shape"])
    compensated = ", compensated" if check["reference"].get("compensate") else ""
    return (f"space-charge model check: a finer model ({grid} cells, {check['reference']['max_step']:g} m steps{compensated}) changes "
            f"the rms sizes at {check['screen']} by up to {100 * check['size_change']['x']:.2g} % (x), "
            f"{100 * check['size_change']['y']:.2g} % (y); the fit's emittances are then off by about "
            f"{100 * check['x']:+.2f} % (x), {100 * check['y']:+.2f} % (y) (emittances.json: space_charge_check)")


def describe_surrogate(check: dict) -> str:
    """One line for the end-of-fit report of a fit with neural elements in place of space-charge sections."""
    grid = "x".join(str(n) for n in check["reference"]["grid_shape"])
    compensated = ", compensated" if check["reference"].get("compensate") else ""
    return (f"surrogate check: the fitted beam through the scan's own lattice with PIC space charge ({grid} cells, "
            f"{check['reference']['max_step']:g} m steps{compensated}) instead of the "
            f"{'PIC of the corrected surrogate' if check.get('model') else 'neural elements'} has rms sizes at {check['screen']} "
            f"up to {100 * check['size_change']['x']:.2g} % (x), {100 * check['size_change']['y']:.2g} % (y) different; "
            f"a rough linear estimate puts the emittances off by {100 * check['x']:+.1f} % (x), {100 * check['y']:+.1f} % (y) "
            "(emittances.json: surrogate_check)")
