"""The summary of an ensemble of fits: mean and spread over members of emittances, phase-space
projections and predicted screen images, with confidence-band plots."""

import itertools
import json
from pathlib import Path

import h5py
import numpy as np
import yaml
from scipy import stats

from psr.data.atomic import atomic_target
from psr.data.datamodule import prepare_images
from psr.data.openpmd import read_openpmd
from psr.data.scanfile import read_scan
from psr.outputs.plots import plot_ensemble_marginals, plot_ensemble_phase_space, plot_ensemble_profiles
from psr.outputs.report import PLANES_4D, PLANES_6D, emittance_table
from psr.outputs.space_charge_check import emittance_plane

AXES = ("x", "px", "y", "py", "z", "pz")
# an emittance whose members scatter by more than this (relative std), or that the members' images cannot fix at all
# (determined_by_scan: psr.outputs.scan_determination), is reported as not determined by the data
UNDETERMINED_SPREAD = 0.05
PROJECTION_BINS = 48
BAND_CONFIDENCE = 0.95  # band_95: Student-t prediction interval of the members (prediction_factor)
# The method's own relative error on hard beams, which every member shares and no spread of members shows: the rms
# over the beams of benchmarks/hard_beams.py's 4D and 5 MeV families (S-shapes, halo, hollow, px tail; shipped 4D
# config, six seeds a beam) of each beam's six-seed mean error, of the x, y rms emittances and of their 90 % cores:
# 0.14 % and 0.60 % (stop 40, with the projections' mean absolute deviation; stop 39, without it, 0.13 / 0.88 %;
# with the kurtosis part, the 4D family alone, 0.19 / 0.79 %), rounded up. Measured without charge; a fit with PIC
# space charge has its model check's bias besides (band_2std_with_model).
# band_2std_with_method: mean +- 2 sqrt(std^2 + (METHOD_ERROR * mean)^2).
METHOD_ERROR = {"rms": 0.0025, "core90": 0.010}
# The same with space charge in the fit (PIC, or a surrogate): the rms over benchmarks/hard_beams.py's space-charge
# family (shipped sc config, the beams above simulated with a finer space-charge model, six seeds a beam) of each
# beam's six-seed mean error: rms emittances 0.60 %, cores 0.53 % (stop 41; leaving out any one beam 0.42-0.67 % and
# 0.36-0.58 %), rounded up, the cores kept at the no-charge value. It holds the space-charge model's bias too.
METHOD_ERROR_SPACE_CHARGE = {"rms": 0.0065, "core90": 0.010}


def prediction_factor(members: int, confidence: float = BAND_CONFIDENCE) -> float:
    """k of the band mean +- k std (std with ddof 1) that holds one more draw from the members' distribution with
    probability `confidence` when only `members` draws are known: t_(1+confidence)/2, members-1 * sqrt(1 + 1/members).
    4.97 for 3 members, 2.78 for 6, 2.10 for 20 (-> 1.96). A +-2 std band of 3 members holds such a draw 78 % of
    the time, of 6 members 88 %."""
    if members < 2:
        raise ValueError(f"a prediction band needs at least 2 members, got {members}")
    return float(stats.t.ppf((1 + confidence) / 2, members - 1) * np.sqrt(1 + 1 / members))


def add_method_error(key: str, row: dict, space_charge: bool = False) -> None:
    """An x or y emittance row gets `method_error` (relative: METHOD_ERROR, or METHOD_ERROR_SPACE_CHARGE for fits
    with space charge) and band_2std_with_method: the members' std and the method's error added in quadrature,
    +- 2 of that; with the truth, whether it holds it."""
    if emittance_plane(key) not in ("x", "y"):
        return
    errors = METHOD_ERROR_SPACE_CHARGE if space_charge else METHOD_ERROR
    error = errors["core90" if key.endswith("_core90") else "rms"]
    half = 2 * float(np.hypot(row["std"], error * row["mean"]))
    row.update(method_error=error, band_2std_with_method=[row["mean"] - half, row["mean"] + half])
    if "true" in row:
        row["truth_in_band_with_method"] = bool(row["mean"] - half <= row["true"] <= row["mean"] + half)


def band_95(low: float, high: float, half: float) -> list[float]:
    """[low - half, high + half], the lower end at least 0 (emittances are positive)."""
    return [max(low - half, 0.0), high + half]


def _member_data(folder: Path) -> dict:
    for needed in ("beam.h5", "predicted_images.h5", "config.yaml"):
        if not (folder / needed).exists():
            raise FileNotFoundError(f"{folder}: no {needed} (did this member's fit finish?)")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    with h5py.File(folder / "predicted_images.h5", "r") as handle:
        images = {name: handle[name][...] for name in handle}
    report = json.loads((folder / "emittances.json").read_text()) if (folder / "emittances.json").exists() else {}
    calibration = json.loads((folder / "calibration.json").read_text()) if (folder / "calibration.json").exists() else None
    return {"calibration": calibration, "path": config["data"]["path"], "points": report.get("points"), "n_dim": int(config["model"]["generator"]["init_args"].get("n_dim", 6)),
            "particles": read_openpmd(folder / "beam.h5").particles, "images": images,
            "entropy": report.get("entropy_nats", {}).get("reconstructed"), "check": report.get("space_charge_check"),
            "space_charge": "space_charge_check" in report or "surrogate_check" in report,
            "determined_by_scan": {k: r["determined_by_scan"] for k, r in report.items()
                                   if isinstance(r, dict) and "determined_by_scan" in r}}


def _spread(stack: np.ndarray) -> dict:
    return {"mean": stack.mean(0), "std": stack.std(0, ddof=1)}


def add_model_bias(emittances: dict, checks: list[dict]) -> None:
    """Each x, y emittance row gets the members' mean space-charge model bias of its plane (psr.outputs.
    space_charge_check; the rms bias for the core too), the corrected mean (mean / (1 + bias)) and the band
    band_2std_with_model: from the lower to the upper of the two means, each +- 2 std (it holds both the
    fit's answer and the reference model's); band_95 widens the same way (from the lower to the upper mean,
    +- band_95_factor std); with the truth, whether the bands hold it."""
    for key, row in emittances.items():
        plane = emittance_plane(key)
        if plane not in ("x", "y"):
            continue
        bias = float(np.mean([c[plane] for c in checks]))
        corrected = row["mean"] / (1 + bias)
        low, high = min(row["mean"], corrected), max(row["mean"], corrected)
        half = row.setdefault("band_95_factor", prediction_factor(len(checks))) * row["std"]
        row.update(space_charge_bias=bias, corrected_mean=corrected,
                   band_2std_with_model=[low - 2 * row["std"], high + 2 * row["std"]], band_95=band_95(low, high, half))
        if "true" in row:
            row.update(corrected_relative_error=corrected / row["true"] - 1,
                       truth_in_band_with_model=bool(low - 2 * row["std"] <= row["true"] <= high + 2 * row["std"]),
                       truth_in_band_95=bool(row["band_95"][0] <= row["true"] <= row["band_95"][1]))


def calibration_spread(calibrations: list[dict]) -> dict:
    """The members' calibration.json rows with the mean (`value`), std and member values of each entry."""
    rows = {}
    for name, first in calibrations[0].items():
        values = np.array([c[name]["value"] for c in calibrations], dtype=np.float64)
        rows[name] = {**first, "value": values.mean(0).tolist(), "std": values.std(0, ddof=1).tolist(),
                      "members": values.tolist()}
    return rows


def summarize_ensemble(member_dirs: list[Path], folder: Path) -> Path:
    """Mean and spread over members of emittances, 1D/2D phase-space projections, predicted images and the
    calibration (where fitted); writes ensemble_emittances.json, ensemble_projections.h5, calibration.json
    (the members' mean as `value`, their `std`) and plots into `folder`."""
    members = [_member_data(Path(d)) for d in member_dirs]
    if len(members) < 2:
        raise ValueError(f"{folder}: an ensemble summary needs at least 2 members, found {len(members)}")
    if len({m["path"] for m in members}) != 1:
        raise ValueError(f"{folder}: the members fitted different scan files: {sorted({m['path'] for m in members})}")
    scan = read_scan(members[0]["path"])
    n_dim = members[0]["n_dim"]
    planes = PLANES_6D if n_dim == 6 else PLANES_4D
    axes = AXES[:max(n_dim, 4)]
    tables = [emittance_table(m["particles"], scan.p0c, scan.species, planes) for m in members]
    truth = emittance_table(scan.ground_truth, scan.p0c, scan.species, planes) if scan.ground_truth is not None else None
    emittances = {}
    factor = prediction_factor(len(members))
    space_charge = all(m["space_charge"] for m in members)
    for key in tables[0]:
        values = np.array([t[key] for t in tables])
        row = {"mean": values.mean(), "std": values.std(ddof=1), "relative_std": values.std(ddof=1) / values.mean(),
               "members": values.tolist()}
        row["band_2std"] = [row["mean"] - 2 * row["std"], row["mean"] + 2 * row["std"]]
        row["band_95_factor"] = factor
        row["band_95"] = band_95(row["mean"], row["mean"], factor * row["std"])
        by_scan = [m["determined_by_scan"].get(key) for m in members]
        if all(fixed is not None for fixed in by_scan):  # the members' reports say whether their images can fix it
            row["determined_by_scan"] = all(by_scan)
        row["determined"] = bool(row["relative_std"] <= UNDETERMINED_SPREAD and row.get("determined_by_scan", True))
        if truth is not None:
            row.update(true=truth[key], mean_relative_error=values.mean() / truth[key] - 1,
                       truth_in_band=bool(row["band_2std"][0] <= truth[key] <= row["band_2std"][1]),
                       truth_in_band_95=bool(row["band_95"][0] <= truth[key] <= row["band_95"][1]))
        add_method_error(key, row, space_charge)
        emittances[key] = row
    checks = [m["check"] for m in members]
    if all(checks):
        add_model_bias(emittances, checks)

    pooled = np.concatenate([m["particles"] for m in members])
    ranges = {a: np.percentile(pooled[:, AXES.index(a)], [0.5, 99.5]) for a in axes}
    marginals = {a: _spread(np.stack([np.histogram(m["particles"][:, AXES.index(a)], PROJECTION_BINS, ranges[a],
                                                   density=True)[0] for m in members])) for a in axes}
    pairs = list(itertools.combinations(axes, 2))
    projections = {}
    for a, b in pairs:
        hists = [np.histogram2d(m["particles"][:, AXES.index(a)], m["particles"][:, AXES.index(b)], PROJECTION_BINS,
                                [ranges[a], ranges[b]])[0] / len(m["particles"]) for m in members]
        projections[f"{a}-{b}"] = _spread(np.stack(hists))
    stacked_images = {name: np.stack([m["images"][name] for m in members]) for name in members[0]["images"]}
    images = {name: _spread(stack) for name, stack in stacked_images.items()}
    profiles = {name: {"x": _spread(stack.sum(-2)), "y": _spread(stack.sum(-1))} for name, stack in stacked_images.items()}
    # spread of a projection: sum over bins of the members' std / sum of their mean (0: identical members)
    projection_spread = {key: float(p["std"].sum() / p["mean"].sum()) for key, p in projections.items()}
    entropies = [m["entropy"] for m in members if m["entropy"] is not None]
    summary = {"members": len(members), "space_charge": space_charge, "emittances": emittances,
               "entropy_nats": {"mean": float(np.mean(entropies)), "std": float(np.std(entropies, ddof=1)),
                                "members": entropies} if len(entropies) == len(members) else None,
               "projection_spread": projection_spread,
               "mean_projection_spread": float(np.mean(list(projection_spread.values())))}
    if all(m["points"] for m in members):  # conditional models: the spread at every upstream setting
        summary["by_upstream"] = upstream_spread([m["points"] for m in members])
    calibrations = [m["calibration"] for m in members]
    if all(calibrations) and len({tuple(c) for c in calibrations}) == 1:
        summary["calibration"] = calibration_spread(calibrations)
        with atomic_target(folder / "calibration.json") as tmp:
            tmp.write_text(json.dumps(summary["calibration"], indent=2))
    with atomic_target(folder / "ensemble_emittances.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    _write_projections(folder / "ensemble_projections.h5", ranges, marginals, projections, images)

    truth_particles = scan.ground_truth
    plot_ensemble_marginals(folder / "ensemble_marginals.png", ranges, marginals, truth_particles)
    plot_ensemble_phase_space(folder / "ensemble_phase_space.png", ranges,
                              {k: v for k, v in projections.items() if k in _PLOTTED_PAIRS})
    for name, screen in scan.screens.items():
        measured, taken = prepare_images(screen, name)
        labels = [", ".join(f"{v:.3g}" for v in row) for row in scan.settings]
        taken_profiles = {k: {f: v[f][taken] for f in v} for k, v in profiles[name].items()}
        plot_ensemble_profiles(folder / f"ensemble_profiles_{name}.png", measured[taken], taken_profiles,
                               [label for label, t in zip(labels, taken) if t], name)
    return folder


def upstream_spread(members_points: list[list[dict]]) -> list[dict]:
    """Per upstream setting of conditional members' emittances.json points: mean, std, +-2 std band of each
    emittance and whether the band holds the truth (where known)."""
    rows = []
    for g, first in enumerate(members_points[0]):
        row = {"upstream": first["upstream"], "held_out": first["held_out"], "emittances": {}}
        for key, entry in first["emittances"].items():
            values = np.array([points[g]["emittances"][key]["reconstructed"] for points in members_points])
            mean, std = float(values.mean()), float(values.std(ddof=1))
            item = {"mean": mean, "std": std, "band_2std": [mean - 2 * std, mean + 2 * std], "members": values.tolist()}
            if "true" in entry:
                item.update(true=entry["true"], truth_in_band=bool(mean - 2 * std <= entry["true"] <= mean + 2 * std))
            row["emittances"][key] = item
        rows.append(row)
    return rows


_PLOTTED_PAIRS = ("x-px", "y-py", "x-y", "z-pz", "x-z")


def _write_projections(path: Path, ranges, marginals, projections, images) -> None:
    """Mean and std arrays per projection, written to a temporary file and renamed (never half-written)."""
    with atomic_target(path) as tmp, h5py.File(tmp, "w-") as handle:
        for group_name, table in (("marginals", marginals), ("projections", projections), ("images", images)):
            group = handle.create_group(group_name)
            for key, values in table.items():
                sub = group.create_group(key)
                sub["mean"], sub["std"] = values["mean"], values["std"]
        bounds = handle.create_group("ranges")  # histogram ranges [m for x, y, z; 1 for px, py, pz]
        for axis, (lo, hi) in ranges.items():
            bounds[axis] = np.array([lo, hi])
