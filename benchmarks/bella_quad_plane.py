"""Which plane does BELLA's EMQ3 focus? Beam sizes of the imported scan and thick-lens quad-scan fits.

Usage: python benchmarks/bella_quad_plane.py [data/bella_htu.h5]   (after psr import --config data/bella_htu.import.yaml)

Prints the rms beam size per setting in x and y [mm] and, for each plane and each sign of k1 in that
plane, the least-squares fit of sigma^2 = R11^2 s11 + 2 R11 R12 s12 + R12^2 s22 (thick quadrupole
then drift) with the rms residual and the geometric emittance sqrt(s11 s22 - s12^2): the plane and
sign that the images support fit well with a real (positive) emittance.
"""

import sys

import numpy as np

from psr.data.scanfile import read_scan

QUAD_LENGTH, DRIFT = 0.1409, 2.126


def rms_sizes(image: np.ndarray, pixel_size, center) -> tuple[float, float]:
    """rms sizes (x, y) [m] of an image (H, W) with the contract's pixel centres."""
    height, width = image.shape
    x = center[0] + (np.arange(width) - (width - 1) / 2) * pixel_size[0]
    y = center[1] + (np.arange(height) - (height - 1) / 2) * pixel_size[1]
    w = image / image.sum()
    px, py = w.sum(axis=0), w.sum(axis=1)
    return float(np.sqrt(px @ (x - px @ x) ** 2)), float(np.sqrt(py @ (y - py @ y) ** 2))


def transfer(k1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R11, R12 from quad entrance to screen for focusing strength k1 [1/m^2] (negative defocuses)."""
    r11, r12 = [], []
    for k in k1:
        if k > 0:
            s = np.sqrt(k)
            quad = np.array([[np.cos(s * QUAD_LENGTH), np.sin(s * QUAD_LENGTH) / s],
                             [-s * np.sin(s * QUAD_LENGTH), np.cos(s * QUAD_LENGTH)]])
        else:
            s = np.sqrt(-k)
            quad = np.array([[np.cosh(s * QUAD_LENGTH), np.sinh(s * QUAD_LENGTH) / s],
                             [s * np.sinh(s * QUAD_LENGTH), np.cosh(s * QUAD_LENGTH)]])
        m = np.array([[1.0, DRIFT], [0.0, 1.0]]) @ quad
        r11.append(m[0, 0])
        r12.append(m[0, 1])
    return np.array(r11), np.array(r12)


def fit_plane(k_focus: np.ndarray, sizes: np.ndarray) -> tuple[float, float]:
    """rms residual of sigma^2 [relative] and geometric emittance [m] (NaN if not positive definite)."""
    r11, r12 = transfer(k_focus)
    a = np.stack([r11**2, 2 * r11 * r12, r12**2], axis=1)
    s11, s12, s22 = np.linalg.lstsq(a, sizes**2, rcond=None)[0]
    residual = np.sqrt(np.mean((a @ [s11, s12, s22] / sizes**2 - 1) ** 2))
    det = s11 * s22 - s12**2
    return float(residual), float(np.sqrt(det)) if det > 0 and s11 > 0 else float("nan")


def main(path="data/bella_htu.h5") -> None:
    scan = read_scan(path)
    k1 = scan.settings[:, scan.setting_names.index("EMQ3.k1")]
    name, screen = next(iter(scan.screens.items()))
    sizes = np.array([rms_sizes(image, screen.pixel_size, screen.center) for image in screen.images])
    print(f"screen {name}: images {screen.images.shape}, pixel size {np.array(screen.pixel_size) * 1e6} um")
    print(" k1 [1/m^2]   rms x [mm]   rms y [mm]")
    for k, (sx, sy) in zip(k1, sizes):
        print(f"{k:10.3f}   {sx * 1e3:10.3f}   {sy * 1e3:10.3f}")
    for plane, column, sign in (("x", 0, 1), ("y", 1, -1)):
        for label, k_focus in (("the lattice's sign (k1 > 0 focuses x, defocuses y)", sign * k1),
                               ("the opposite sign", -sign * k1)):
            residual, emittance = fit_plane(k_focus, sizes[:, column])
            print(f"plane {plane}, {label}: rms residual of sigma^2 {100 * residual:.1f} %, "
                  f"geometric emittance {emittance * 1e9:.1f} nm")


if __name__ == "__main__":
    main(*sys.argv[1:])
