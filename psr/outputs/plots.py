"""PNG plots of a reconstruction: measured vs predicted images, phase-space projections, loss curve."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from psr.data.atomic import atomic_target  # noqa: E402

COORDINATES = {"x": (0, 1e3, "x [mm]"), "px": (1, 1e3, "px [mrad]"), "y": (2, 1e3, "y [mm]"),
               "py": (3, 1e3, "py [mrad]"), "z": (4, 1e3, "z [mm]"), "pz": (5, 1e3, "pz [1e-3]")}


def save_figure(fig, path, dpi: int = 110) -> None:
    """Save and close a figure, written to a temporary sibling and renamed (never a half-written file)."""
    path = Path(path)
    try:
        with atomic_target(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def _paired_panels(n: int, per_row: int, size: tuple[float, float]):
    """A figure with two rows of panels per row of `per_row` settings (n settings), all axes off."""
    per_row = min(per_row, n)
    rows = -(-n // per_row)
    fig, axes = plt.subplots(2 * rows, per_row, figsize=(size[0] * per_row, size[1] * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes, per_row


def plot_images(path, measured: np.ndarray, predicted: np.ndarray, extent, labels: list[str], screen: str,
                validation: np.ndarray | None = None, per_row: int = 10) -> None:
    """Measured (top) above predicted (bottom) for every setting; validation settings marked."""
    n = measured.shape[0]
    fig, axes, per_row = _paired_panels(n, per_row, (1.6, 3.4))
    for k in range(n):
        r, c = 2 * (k // per_row), k % per_row
        vmax = max(np.nanmax(measured[k]), np.nanmax(predicted[k]), 1e-30)
        for offset, image, tag in ((0, measured[k], "meas"), (1, predicted[k], "pred")):
            ax = axes[r + offset, c]
            ax.imshow(image, origin="lower", extent=extent, vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
            title = f"{tag} {labels[k]}" if offset == 0 else tag
            if offset == 0 and validation is not None and validation[k]:
                title += " (val)"
            ax.set_title(title, fontsize=6)
    fig.suptitle(f"screen {screen}: measured (upper) vs predicted (lower)", fontsize=9)
    height = fig.get_figheight()  # inches; axes are off, so fixed margins do (tight_layout costs ~2 s here)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / height, wspace=0.06, hspace=0.25)
    save_figure(fig, path)


def plot_phase_space(path, beams: dict[str, np.ndarray], pairs: list[tuple[str, str]], bins: int = 80) -> None:
    """2D histograms of coordinate pairs, one row per beam (e.g. reconstructed and true), same ranges."""
    names = list(beams)
    fig, axes = plt.subplots(len(names), len(pairs), figsize=(3.2 * len(pairs), 3.0 * len(names)), squeeze=False)
    for col, (a, b) in enumerate(pairs):
        ia, sa, la = COORDINATES[a]
        ib, sb, lb = COORDINATES[b]
        stacked = np.concatenate([beams[n] for n in names])
        lo_a, hi_a = np.percentile(stacked[:, ia] * sa, [0.5, 99.5])
        lo_b, hi_b = np.percentile(stacked[:, ib] * sb, [0.5, 99.5])
        for row, name in enumerate(names):
            ax = axes[row, col]
            p = beams[name]
            ax.hist2d(p[:, ia] * sa, p[:, ib] * sb, bins=bins, range=[[lo_a, hi_a], [lo_b, hi_b]], cmap="viridis")
            ax.set_xlabel(la)
            ax.set_ylabel(lb)
            ax.set_title(name, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def read_metrics(metrics_csv) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps, values)} from a Lightning CSVLogger metrics.csv."""
    series: dict[str, tuple[list, list]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(row["step"]))
                values.append(float(value))
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in series.items()}


def plot_loss(path, metrics_csv, ylabel: str = "image mismatch") -> bool:
    """Loss curves from a metrics.csv; returns False when there is nothing to plot."""
    if not Path(metrics_csv).exists():
        return False
    series = {k: v for k, v in read_metrics(metrics_csv).items() if "loss" in k}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, (steps, values) in series.items():
        ax.plot(steps, values, label=key, marker="." if len(steps) < 50 else None)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_ensemble_marginals(path, ranges: dict, marginals: dict, truth: np.ndarray | None = None) -> None:
    """1D phase-space marginals of an ensemble: mean with +-1 and +-2 std bands, the truth as a line."""
    axes_names = list(marginals)
    fig, axes = plt.subplots(1, len(axes_names), figsize=(3.0 * len(axes_names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], axes_names):
        index, scale, label = COORDINATES[name]
        mean, std = marginals[name]["mean"], marginals[name]["std"]
        edges = np.linspace(*ranges[name], mean.size + 1)
        centres = 0.5 * (edges[1:] + edges[:-1]) * scale
        for k, alpha in ((2, 0.2), (1, 0.4)):
            ax.fill_between(centres, np.clip(mean - k * std, 0, None) / scale, (mean + k * std) / scale,
                            color="C0", alpha=alpha, lw=0, label=f"+-{k} std")
        ax.plot(centres, mean / scale, color="C0", label="ensemble mean")
        if truth is not None:
            density, _ = np.histogram(truth[:, index], edges, density=True)
            ax.step(centres, density / scale, where="mid", color="k", lw=0.8, label="truth")
        ax.set_xlabel(label)
    axes[0, 0].set_ylabel("density")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def plot_ensemble_phase_space(path, ranges: dict, projections: dict) -> None:
    """2D projections of an ensemble: the mean (upper row) and the members' std (lower row, same scale)."""
    fig, axes = plt.subplots(2, len(projections), figsize=(3.2 * len(projections), 6.0), squeeze=False)
    for col, (key, values) in enumerate(projections.items()):
        a, b = key.split("-")
        extent = [*(np.asarray(ranges[a]) * COORDINATES[a][1]), *(np.asarray(ranges[b]) * COORDINATES[b][1])]
        vmax = values["mean"].max()
        for row, (field, title) in enumerate((("mean", "mean"), ("std", "std (spread)"))):
            ax = axes[row, col]
            ax.imshow(values[field].T, origin="lower", extent=extent, aspect="auto", vmin=0, vmax=vmax, cmap="viridis")
            ax.set_xlabel(COORDINATES[a][2])
            ax.set_ylabel(COORDINATES[b][2])
            ax.set_title(f"{key} {title}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_ensemble_profiles(path, measured: np.ndarray, profiles: dict, labels: list[str], screen: str,
                           per_row: int = 8) -> None:
    """Horizontal and vertical profiles of every image: measured (black) and the ensemble's predicted
    mean with a +-2 std band (orange). profiles: {"x"|"y": {"mean", "std"}: (K, pixels)}."""
    n = measured.shape[0]
    fig, axes, per_row = _paired_panels(n, per_row, (2.0, 3.6))
    for k in range(n):
        r, c = 2 * (k // per_row), k % per_row
        for offset, (tag, summed_axis) in enumerate((("x", 0), ("y", 1))):
            ax = axes[r + offset, c]
            ax.set_axis_on()
            mean, std = profiles[tag]["mean"][k], profiles[tag]["std"][k]
            pixels = np.arange(mean.size)
            ax.fill_between(pixels, np.clip(mean - 2 * std, 0, None), mean + 2 * std, color="C1", alpha=0.35, lw=0)
            ax.plot(pixels, mean, color="C1", lw=0.8)
            ax.plot(pixels, measured[k].sum(axis=summed_axis), color="k", lw=0.6)
            ax.set_title(f"{tag} profile" + (f" {labels[k]}" if offset == 0 else ""), fontsize=6)
            ax.tick_params(labelsize=5)
    fig.suptitle(f"{screen}: measured (black),\nensemble mean +- 2 std (orange)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_conditional_emittances(path, rows: list[dict], keys: list[str]) -> None:
    """Emittances [um] at every upstream setting of a conditional model: reconstructed (circles; held-out
    settings as triangles) and true (crosses), one panel per emittance."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.0 * len(keys), 3.4), squeeze=False)
    index = np.arange(len(rows))
    held = np.array([r["held_out"] for r in rows])
    for ax, key in zip(axes[0], keys):
        values = np.array([r["emittances"][key]["reconstructed"] for r in rows]) * 1e6
        ax.plot(index[~held], values[~held], "o", ms=4, label="reconstructed")
        ax.plot(index[held], values[held], "^", ms=5, label="held out")
        true = np.array([r["emittances"][key].get("true", np.nan) for r in rows]) * 1e6
        if np.isfinite(true).any():
            ax.plot(index, true, "kx", ms=4, label="true")
        ax.set_xlabel("upstream setting (file order)")
        ax.set_ylabel(f"{key} [um]")
        ax.legend(fontsize=6)
    fig.suptitle("emittances at the upstream settings: " + ", ".join(rows[0]["upstream"]), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
