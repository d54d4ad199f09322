"""End-of-fit outputs: the reconstructed beam (openPMD), emittances against the truth, plots."""

import json
from pathlib import Path

import h5py
import numpy as np
import torch

import sim

from psr.data.emittances import CORE_FRACTION, PLANES_4D, PLANES_6D, emittance_table  # noqa: F401 (re-exported)
from psr.outputs.entropy import knn_entropy
from psr.data.atomic import atomic_target, remove_stale_temporaries
from psr.data.openpmd import physical_mask, write_openpmd
from psr.outputs.plots import plot_images, plot_loss, plot_phase_space
from psr.outputs.scan_determination import scan_determines
from psr.data.lattices import build_lattice
from psr.outputs.space_charge_check import (SURROGATE_REFERENCE, compare_to_reference, describe, describe_surrogate,
                                             emittance_plane, reference_info, space_charge_check)

def compare_emittances(reconstructed: dict, truth: dict | None) -> dict:
    """{key: {"reconstructed", "true", "relative_error"}}."""
    rows = {}
    for key, value in reconstructed.items():
        row = {"reconstructed": value}
        if truth is not None and key in truth:
            row["true"] = truth[key]
            row["relative_error"] = value / truth[key] - 1
        rows[key] = row
    return rows


def format_emittances(rows: dict) -> str:
    lines = [f"{'':20s} {'reconstructed':>14s} {'true':>12s} {'error':>8s}"]
    for key, row in rows.items():
        if not isinstance(row, dict) or "reconstructed" not in row:
            continue  # notes (dropped_particles, nominal_charge_C): see report_notes
        true = f"{row['true']:12.4e}" if "true" in row else f"{'-':>12s}"
        err = f"{100 * row['relative_error']:+7.2f}%" if "relative_error" in row else f"{'-':>8s}"
        if "difference_nats" in row:
            err = f"{row['difference_nats']:+5.2f}nat"
        note = "  not determined by this scan" if row.get("determined_by_scan") is False else ""
        lines.append(f"{key:20s} {row['reconstructed']:14.4e} {true} {err}{note}")
    return "\n".join(lines)


ENTROPY_PARTICLES = 10_000  # particles of the kNN entropy estimates (O(N^2))


def entropy_row(model, particles: np.ndarray, truth: np.ndarray | None, planes) -> dict:
    """Entropy [nats, Bmad units] of the reconstructed beam's fitted coordinates: from the generator's
    own log-density where it has one (flows, Gaussian), else the kNN estimate; the truth's by kNN."""
    n_dim = 2 * len(planes)
    if hasattr(model.generator, "sample_with_log_density"):
        _, log_density = model.generator.sample_with_log_density()
        row = {"reconstructed": -log_density.mean().item()}
    else:
        row = {"reconstructed": knn_entropy(torch.as_tensor(particles[:ENTROPY_PARTICLES, :n_dim]))}
    if truth is not None:
        row["true"] = knn_entropy(torch.as_tensor(truth[:ENTROPY_PARTICLES, :n_dim]))
        row["difference_nats"] = row["reconstructed"] - row["true"]
    return row


def write_predicted_images(path: Path, images: dict[str, np.ndarray]) -> None:
    """The reconstruction's unit-sum images (K, H, W) at every setting, one dataset per screen (written
    to a temporary file and renamed, so never half-written)."""
    with atomic_target(path) as tmp, h5py.File(tmp, "w-") as handle:
        for name, stack in images.items():
            handle.create_dataset(name, data=stack, compression="gzip")


NOMINAL_CHARGE = 1e-12  # C: the bunch charge written into beam.h5 when the scan file's is 0 (unknown)


def write_beam(path: Path, particles: np.ndarray, scan) -> tuple[dict, np.ndarray]:
    """beam.h5 (openPMD) of the physical particles; notes for emittances.json: how many particles were
    dropped (NaN/inf or without forward momentum) and, when the scan's charge is 0 (unknown), the
    nominal charge written instead (attribute psr_nominal_charge = 1), so that beamphysics' weighted
    statistics exist. Returns the notes and the (N,) mask of the particles written."""
    keep = physical_mask(particles)
    if not keep.any():
        raise ValueError(f"{path}: every particle of the reconstructed beam is unphysical (NaN/inf or no forward "
                         "momentum); nothing to write")
    notes = {"dropped_particles": {"count": int((~keep).sum()), "fraction": float((~keep).mean())}}
    nominal = not scan.charge > 0
    with atomic_target(path) as tmp, h5py.File(tmp, "w-") as handle:
        write_openpmd(handle, particles[keep], p0c=scan.p0c, species=scan.species,
                      charge=NOMINAL_CHARGE if nominal else scan.charge)
        handle.attrs["psr_dropped_particles"] = notes["dropped_particles"]["count"]
        handle.attrs["psr_nominal_charge"] = int(nominal)
        if nominal:
            handle.attrs["psr_note"] = np.bytes_(f"the scan file's bunch charge is 0 (unknown): the weights carry a "
                                                 f"nominal total charge of {NOMINAL_CHARGE:g} C")
            notes["nominal_charge_C"] = NOMINAL_CHARGE
    return notes, keep


def determined_by_scan(model, datamodule) -> dict[str, bool]:
    """`psr.outputs.scan_determination.scan_determines` for the images the fit trained on ({} for conditional
    models, whose beam changes with the upstream settings)."""
    if getattr(model, "upstream", None):
        return {}
    train = torch.zeros(len(datamodule.settings), dtype=torch.bool)
    train[torch.as_tensor(datamodule.train_index, dtype=torch.long)] = True
    taken = {name: flags.cpu().bool() & train for name, flags in datamodule.measured.items()}
    return scan_determines(model.lattice, model.lattice_setting_names(), datamodule.settings.double(), taken,
                           datamodule.scan.p0c, datamodule.scan.species, getattr(model.generator, "n_dim", 6))


def model_check(model, scan, rows: dict) -> tuple[str, dict] | None:
    """The fit's model against a reference, on the reconstructed beam's particles (those of beam.h5; not for
    conditional models): ("space_charge_check", psr.outputs.space_charge_check with each x, y emittance's
    corrected value, reconstructed / (1 + bias of its plane; the rms bias for the core too), and its error
    where the truth is known) for a fit with PIC space charge; ("surrogate_check", the same) for a fit whose
    neural elements replace sections of a charged bunch's lattice (`model.replace`): the reference is then the
    scan's own lattice with SURROGATE_REFERENCE space charge."""
    pic = isinstance(model.lattice.space_charge, sim.SpaceCharge)
    surrogate = bool(model.hparams.get("replace")) and scan.charge > 0 and model.lattice.space_charge is None
    if getattr(model, "upstream", None) or not (pic or surrogate):
        return None
    beam = model.report_beam()
    keep = torch.as_tensor(physical_mask(beam.particles.detach().to(torch.float64).cpu().numpy()), device=beam.particles.device)
    # the particles of beam.h5 with the scan's charge (a fit without PIC tracks a beam of charge 0)
    beam = sim.ParticleBeam(beam.particles[keep], scan.p0c, scan.species, scan.charge)
    settings = torch.as_tensor(scan.settings, device=beam.particles.device)
    values = model.lattice_values(settings, beam.particles.dtype)
    if surrogate:
        reference = build_lattice(scan.lattice, scan.folder, SURROGATE_REFERENCE).to(beam.particles.device)
        check = compare_to_reference(model.lattice, values, reference,
                                     model.lattice_values(settings, beam.particles.dtype, route=False), beam)
        kind = "surrogate_check"
        if check:
            check = {"reference": reference_info(SURROGATE_REFERENCE), **check}
            if any(hasattr(element, "track_reference") for element in model.lattice.elements):
                check["model"] = "corrected surrogate: its PIC"  # outside training a CorrectedSection tracks by its PIC
    else:
        check, kind = space_charge_check(model.lattice, values, beam), "space_charge_check"
    if not check:
        return None
    check["corrected"] = {}
    for key, row in rows.items():
        plane = emittance_plane(key)
        if plane in ("x", "y") and isinstance(row, dict) and "reconstructed" in row:
            entry = {"value": row["reconstructed"] / (1 + check[plane])}
            if "true" in row:
                entry["relative_error"] = entry["value"] / row["true"] - 1
            check["corrected"][key] = entry
    return kind, check


def report_notes(rows: dict) -> list[str]:
    """Lines to print about what write_report changed: dropped particles, a nominal charge."""
    lines = []
    dropped = rows.get("dropped_particles", {})
    if dropped.get("count"):
        lines.append(f"dropped {dropped['count']} unphysical particle(s) ({100 * dropped['fraction']:.3g} % of the "
                     "beam: NaN/inf or no forward momentum); beam.h5 and the emittances hold the rest")
    if "nominal_charge_C" in rows:
        lines.append(f"the scan file's bunch charge is 0 (unknown): beam.h5 carries a nominal charge of "
                     f"{rows['nominal_charge_C'] * 1e12:g} pC (attribute psr_nominal_charge = 1)")
    if "space_charge_check" in rows:
        lines.append(describe(rows["space_charge_check"]))
    if "surrogate_check" in rows:
        lines.append(describe_surrogate(rows["surrogate_check"]))
    if "model_check_failed" in rows:
        lines.append(f"the model check failed ({rows['model_check_failed']['error']}); the report is complete without it")
    return lines


@torch.no_grad()
def write_report(model, datamodule, run_dir) -> dict:
    """Write beam.h5, emittances.json, calibration.json (with `model.calibrate`) and PNG plots into run_dir
    (each file atomically); return the emittance comparison and the notes of `write_beam`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    scan = datamodule.scan
    model.eval()
    beam = model.report_beam()
    particles = beam.particles.detach().to(torch.float64).cpu().numpy()
    notes, keep = write_beam(run_dir / "beam.h5", particles, scan)
    particles = particles[keep]

    six_d = getattr(model.generator, "n_dim", 6) == 6
    planes = PLANES_6D if six_d else PLANES_4D
    recon = emittance_table(particles, scan.p0c, scan.species, planes)
    truth = None
    if scan.ground_truth is not None:
        truth = emittance_table(scan.ground_truth, scan.p0c, scan.species, planes)
    rows = compare_emittances(recon, truth)
    try:  # a check must never cost the fit its report: any failure is written down instead
        for key, fixed in determined_by_scan(model, datamodule).items():
            rows[key]["determined_by_scan"] = fixed
    except Exception as err:  # noqa: BLE001
        rows["determined_by_scan_failed"] = f"{type(err).__name__}: {err}"[:500]
    rows["entropy_nats"] = entropy_row(model, particles, scan.ground_truth, planes)
    rows.update(notes)
    try:  # a check must never cost the fit its report
        check = model_check(model, scan, rows)
    except (RuntimeError, ValueError, MemoryError) as err:
        check = ("model_check_failed", {"error": f"{type(err).__name__}: {err}"[:500]})
    if check:
        rows[check[0]] = check[1]
    with atomic_target(run_dir / "emittances.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    calibration = model.calibration.report() if len(getattr(model, "calibration", ())) else None
    if calibration:
        with atomic_target(run_dir / "calibration.json") as tmp:
            tmp.write_text(json.dumps(calibration, indent=2))

    write_images(model, datamodule, run_dir, beam)
    beams = {"reconstructed": particles}
    if scan.ground_truth is not None:
        beams["ground truth"] = scan.ground_truth
    pairs = [("x", "px"), ("y", "py"), ("x", "y")]
    if six_d:
        pairs += [("z", "pz"), ("x", "z")]
    plot_phase_space(run_dir / "phase_space.png", beams, pairs)
    plot_loss(run_dir / "loss.png", run_dir / "metrics.csv")
    return rows


def write_images(model, datamodule, run_dir: Path, beam=None, per_row: int = 10) -> None:
    """predicted_images.h5 and images_<screen>.png (measured above predicted at every setting the screen read,
    validation settings marked) of the model's beam (a conditional model's beam at each setting by default)."""
    scan = datamodule.scan
    settings = datamodule.settings.to(model.device)
    predicted = model.predict_images(settings, beam)
    write_predicted_images(run_dir / "predicted_images.h5", {k: v.float().cpu().numpy() for k, v in predicted.items()})
    validation = np.isin(np.arange(settings.shape[0]), datamodule.val_index)
    labels = [", ".join(f"{v:.3g}" for v in row) for row in scan.settings]
    for name, screen in model.lattice.screens.items():
        xs, ys = screen.pixel_centres(torch.zeros((), dtype=torch.float64))
        dx, dy = screen.pixel_size.tolist()
        extent = [1e3 * (xs[0].item() - dx / 2), 1e3 * (xs[-1].item() + dx / 2),
                  1e3 * (ys[0].item() - dy / 2), 1e3 * (ys[-1].item() + dy / 2)]
        taken = datamodule.measured[name].numpy()  # plot the settings at which this screen was read
        plot_images(run_dir / f"images_{name}.png", datamodule.images[name].numpy()[taken],
                    predicted[name].float().cpu().numpy()[taken], extent,
                    [label for label, t in zip(labels, taken) if t], name, validation[taken], per_row=per_row)


def format_calibration(rows: dict) -> str:
    """calibration.json rows as lines `name (kind): value (init ...)`, with the ensemble spread where given."""
    lines = ["calibration:"]
    for name, row in rows.items():
        text = f"  {name} ({row['kind']}): {_numbers(row['value'])} (init {_numbers(row['init'])}"
        if "std" in row:
            text += f"; members' std {_numbers(row['std'])}"
        lines.append(text + ")")
    return "\n".join(lines)


def _numbers(value) -> str:
    array = np.atleast_1d(np.asarray(value, dtype=float))
    text = ", ".join(f"{v:.6g}" for v in array)
    return text if np.ndim(value) == 0 else f"[{text}]"
