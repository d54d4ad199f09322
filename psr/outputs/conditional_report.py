"""End-of-fit outputs of a conditional beam model: the beam, emittances and plots at each upstream setting."""

import json
from pathlib import Path

import numpy as np
import torch

from psr.data.atomic import atomic_target, remove_stale_temporaries
from psr.data.datamodule import upstream_groups
from psr.data.emittances import PLANES_4D, PLANES_6D, emittance_table
from psr.outputs.plots import plot_conditional_emittances, plot_loss, plot_phase_space
from psr.outputs.report import compare_emittances, write_beam, write_images

REPORT_PARTICLES = 20_000  # particles per upstream setting for the reported emittances (less shot noise)
SUMMARY_KEYS = ("norm_emit_x", "norm_emit_y", "norm_emit_x_core90", "norm_emit_y_core90")


def upstream_points(scan) -> tuple[np.ndarray, np.ndarray]:
    """(G, U) distinct upstream settings of a scan in order of first appearance, and (K,) each setting's point."""
    groups = upstream_groups(scan)
    columns = [scan.setting_names.index(name) for name in scan.upstream]
    points = np.stack([scan.settings[np.flatnonzero(groups == g)[0], columns] for g in range(groups.max() + 1)])
    return points, groups


def truth_indices(scan, points: np.ndarray) -> list[int | None]:
    """Each upstream point's row in the file's true beams (/ground_truth_upstream); None where it has none."""
    truth = scan.upstream_truth
    indices = []
    for point in points:
        match = [] if truth is None else np.flatnonzero(np.isclose(truth["settings"], point, rtol=1e-9, atol=1e-12).all(1))
        indices.append(int(match[0]) if len(match) else None)
    return indices


def true_rows(scan, indices: list[int | None]) -> list[dict | None]:
    """The true emittance table at each upstream point (`truth_indices`), where the file has one."""
    return [None if i is None else {k: float(v[i]) for k, v in scan.upstream_truth["emittances"].items()}
            for i in indices]


@torch.no_grad()
def write_conditional_report(model, datamodule, run_dir) -> dict:
    """Write, for every distinct upstream setting of the scan file, its beam (beams/upstream_<g>.h5, openPMD) and
    emittances against the truth where known (emittances.json: "points", and a "summary" of the errors at the
    training and held-out upstream settings), beam.h5 (the first upstream setting's beam), predicted_images.h5
    and PNG plots (images, emittances against the upstream settings, phase spaces)."""
    run_dir = Path(run_dir)
    (run_dir / "beams").mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    scan = datamodule.scan
    model.eval()
    points, groups = upstream_points(scan)
    held_out = {int(g) for g in groups[datamodule.val_index]}
    planes = PLANES_6D if getattr(model.generator, "n_dim", 4) == 6 else PLANES_4D
    particles = model.beam_at(torch.as_tensor(points, dtype=torch.float32, device=model.device),
                              max(REPORT_PARTICLES, model.generator.n_particles)).particles.double().cpu().numpy()
    indices = truth_indices(scan, points)
    truths = true_rows(scan, indices)
    rows, kept = [], []
    for g, point in enumerate(points):
        notes, keep = write_beam(run_dir / "beams" / f"upstream_{g}.h5", particles[g], scan)
        kept.append(particles[g][keep])
        table = compare_emittances(emittance_table(particles[g][keep], scan.p0c, scan.species, planes), truths[g])
        rows.append({"upstream": dict(zip(scan.upstream, point.tolist())), "held_out": g in held_out,
                     "emittances": table, **notes})
    write_beam(run_dir / "beam.h5", particles[0], scan)
    report = {"upstream": list(scan.upstream), "points": rows, "summary": error_summary(rows)}
    with atomic_target(run_dir / "emittances.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))

    write_images(model, datamodule, run_dir, per_row=12)
    plot_conditional_emittances(run_dir / "emittances.png", rows, [k for k in SUMMARY_KEYS if k in rows[0]["emittances"]])
    shown = sorted({0, len(points) // 2, *(sorted(held_out)[:1])})
    beams = {}
    for g in shown:
        tag = "held out " if g in held_out else ""
        label = ", ".join(f"{v:.3g}" for v in points[g])
        beams[f"{tag}({label})"] = kept[g]
        if indices[g] is not None and scan.upstream_truth.get("particles") is not None:
            beams[f"truth ({label})"] = scan.upstream_truth["particles"][indices[g]]
    plot_phase_space(run_dir / "phase_space.png", beams, [("x", "px"), ("y", "py"), ("x", "y")])
    plot_loss(run_dir / "loss.png", run_dir / "metrics.csv")
    return report


def error_summary(rows: list[dict]) -> dict:
    """Mean and largest |relative error| of each emittance at the training and at the held-out upstream settings."""
    summary = {}
    for split, wanted in (("training", False), ("held_out", True)):
        for key in SUMMARY_KEYS:
            errors = [abs(r["emittances"][key]["relative_error"]) for r in rows
                      if r["held_out"] == wanted and "relative_error" in r["emittances"].get(key, {})]
            if errors:
                summary.setdefault(split, {})[key] = {"mean_abs_relative_error": float(np.mean(errors)),
                                                      "max_abs_relative_error": float(np.max(errors)),
                                                      "points": len(errors)}
    return summary


def format_conditional(report: dict) -> str:
    """A table of the emittances at every upstream setting (error against the truth where known), then the summary."""
    names = report["upstream"]
    keys = [k for k in ("norm_emit_x", "norm_emit_y") if k in report["points"][0]["emittances"]]
    head = " ".join(f"{n:>13s}" for n in names) + "".join(f" {k[10:]:>11s} {'error':>8s}" for k in keys)
    lines = [f"{head}  (emittances [m], normalized rms; * held out)"]
    for row in report["points"]:
        text = " ".join(f"{v:13.4g}" for v in row["upstream"].values())
        for key in keys:
            entry = row["emittances"][key]
            error = f"{100 * entry['relative_error']:+7.2f}%" if "relative_error" in entry else f"{'-':>8s}"
            text += f" {entry['reconstructed']:11.4e} {error}"
        lines.append(text + (" *" if row["held_out"] else ""))
    for split, table in report["summary"].items():
        lines.append(f"{split.replace('_', ' ')} upstream settings: " + ", ".join(
            f"{key[10:]} mean |error| {100 * v['mean_abs_relative_error']:.2f} % (max {100 * v['max_abs_relative_error']:.2f} %)"
            for key, v in table.items()))
    return "\n".join(lines)
