"""PNG plots of a reconstruction: measured vs predicted images, phase-space projections, loss curve."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COORDINATES = {"x": (0, 1e3, "x [mm]"), "px": (1, 1e3, "px [mrad]"), "y": (2, 1e3, "y [mm]"),
               "py": (3, 1e3, "py [mrad]"), "z": (4, 1e3, "z [mm]"), "pz": (5, 1e3, "pz [1e-3]")}


def plot_images(path, measured: np.ndarray, predicted: np.ndarray, extent, labels: list[str], screen: str,
                validation: np.ndarray | None = None, per_row: int = 10) -> None:
    """Measured (top) above predicted (bottom) for every setting; validation settings marked."""
    n = measured.shape[0]
    per_row = min(per_row, n)
    rows = -(-n // per_row)
    fig, axes = plt.subplots(2 * rows, per_row, figsize=(1.6 * per_row, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def plot_loss(path, metrics_csv) -> bool:
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
    ax.set_ylabel("image mismatch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
