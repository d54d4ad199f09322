"""psr vs Cheetah 0.8.4: a 20-setting quadrupole scan of 100,000 particles through a 10-element
FODO-like line (5 quadrupoles, 5 drifts) onto a 256 x 256 screen, forward and backward.

Both codes get the same particles (converted to Cheetah's (x, px, y, py, tau, delta, 1)), the same
lattice and the same screen (cloud-in-cell, no point-spread function: Cheetah's screen has none).
The script first checks that the two produce the same images (moments and pixels), then times
forward + backward (loss = mean squared difference to a fixed target image set; gradients with
respect to the 20 scanned k1 values and the input particles) after a warm-up.

    python benchmarks/bench_tracking.py [--particles 100000] [--repeats 9] [--profile]
"""

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cheetah  # noqa: E402

import sim  # noqa: E402

P0C = 50e6  # eV
N_SETTINGS = 20
RESOLUTION = (256, 256)
SCANNED = "Q4"
LINE = [  # (type, name, length, k1): 10 elements, then the screen
    ("Quadrupole", "Q1", 0.1, 9.0),
    ("Drift", "D1", 0.6, None),
    ("Quadrupole", "Q2", 0.1, -9.0),
    ("Drift", "D2", 0.6, None),
    ("Quadrupole", "Q3", 0.1, 9.0),
    ("Drift", "D3", 0.6, None),
    ("Quadrupole", "Q4", 0.1, -9.0),  # scanned
    ("Drift", "D4", 0.6, None),
    ("Quadrupole", "Q5", 0.1, 5.0),
    ("Drift", "D5", 1.5, None),
]
K1_SCAN = torch.linspace(-25.0, 15.0, N_SETTINGS, dtype=torch.float64)


def make_particles(n: int) -> torch.Tensor:
    """A correlated Gaussian beam in Bmad coordinates, float64."""
    gen = torch.Generator().manual_seed(42)
    p = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    p = p * torch.tensor([3e-4, 5e-5, 2e-4, 4e-5, 1e-3, 1e-3], dtype=torch.float64)
    p[:, 1] += -0.1 * p[:, 0]  # some convergence
    p[:, 2] += 0.2 * p[:, 0]  # and an x-y tilt, so images are not separable
    return p


def psr_lattice(pixel_size: float) -> sim.Lattice:
    items = [{"type": t, "name": n, "length": length, **({} if k1 is None else {"k1": k1})} for t, n, length, k1 in LINE]
    items.append({"type": "Screen", "name": "SCR", "resolution": list(RESOLUTION), "pixel_size": [pixel_size] * 2,
                  "method": "cic"})
    return sim.Lattice.from_list(items)


def cheetah_segment(pixel_size: float, k1_scan: torch.Tensor, dtype) -> cheetah.Segment:
    elements = []
    for kind, name, length, k1 in LINE:
        length = torch.tensor(length, dtype=dtype)
        if kind == "Drift":
            elements.append(cheetah.Drift(length=length, name=name, dtype=dtype))
        else:
            k1 = k1_scan if name == SCANNED else torch.tensor(k1, dtype=dtype)
            elements.append(cheetah.Quadrupole(length=length, k1=k1, name=name, dtype=dtype))
    elements.append(cheetah.Screen(resolution=RESOLUTION, pixel_size=torch.tensor([pixel_size] * 2, dtype=dtype),
                                   method="cloud-in-cell", is_active=True, name="SCR", dtype=dtype))
    return cheetah.Segment(elements)


def to_cheetah(particles: torch.Tensor) -> torch.Tensor:
    """Bmad (x, px, y, py, z, pz) -> Cheetah (x, px, y, py, tau, delta, 1), linear: tau = -z/beta0, delta = beta0 pz."""
    _, beta = sim.relativistic_factors(P0C, "electron")
    c = particles.clone()
    c[:, 4] = -particles[:, 4] / beta
    c[:, 5] = particles[:, 5] * beta
    return torch.cat([c, torch.ones_like(c[:, :1])], dim=-1)


def moments(images: torch.Tensor, pixel: float):
    """Centroid and rms in x and y [m] of images (K, H, W)."""
    h, w = images.shape[-2:]
    xs = (torch.arange(w, dtype=images.dtype) - (w - 1) / 2) * pixel
    ys = (torch.arange(h, dtype=images.dtype) - (h - 1) / 2) * pixel
    total = images.sum((-1, -2))
    px, py = images.sum(-2) / total[:, None], images.sum(-1) / total[:, None]
    mx, my = (px * xs).sum(-1), (py * ys).sum(-1)
    sx = (px * (xs - mx[:, None]) ** 2).sum(-1).sqrt()
    sy = (py * (ys - my[:, None]) ** 2).sum(-1).sqrt()
    return mx, my, sx, sy


class ScanRun:
    """One forward + backward of a code's scan: loss = mean squared difference to `target`; gradients with
    respect to the scanned k1 values and the input particles. Subclasses provide `images`."""

    def step(self):
        particles = self.particles.clone().requires_grad_(True)
        k1 = self.k1.clone().requires_grad_(True)
        images = self.images(particles, k1)
        loss = ((images - self.target) ** 2).mean()
        loss.backward()
        return images, k1.grad, particles.grad


class PsrRun(ScanRun):
    def __init__(self, particles, pixel, dtype):
        self.lattice = psr_lattice(pixel)
        self.particles = particles.to(dtype)
        self.k1 = K1_SCAN.to(dtype)
        self.target = None

    def images(self, particles, k1):
        beam = sim.ParticleBeam(particles, p0c=P0C)
        return self.lattice(beam, settings={f"{SCANNED}.k1": k1}).images["SCR"]


class CheetahRun(ScanRun):
    def __init__(self, particles, pixel, dtype):
        self.pixel = pixel
        self.dtype = dtype
        self.particles = to_cheetah(particles).to(dtype)
        self.k1 = K1_SCAN.to(dtype)
        self.energy = torch.tensor(math.sqrt(P0C**2 + sim.get_species("electron").mass_eV ** 2), dtype=dtype)
        # unit total weight, like psr's images (Cheetah weights the image by |particle charge|)
        self.charges = torch.full((particles.shape[0],), 1.0 / particles.shape[0], dtype=dtype)
        self.target = None

    def images(self, particles, k1):
        segment = cheetah_segment(self.pixel, k1, self.dtype)
        beam = cheetah.ParticleBeam(particles, energy=self.energy, particle_charges=self.charges, dtype=self.dtype)
        segment.track(beam)
        return segment.SCR.reading


def timed_pair(fn_a, fn_b, repeats):
    """Per-call times of fn_a and fn_b after two warm-up calls each, interleaved (a, b, a, b, ...)
    so that both see the same background load on a shared machine."""
    for fn in (fn_a, fn_b, fn_a, fn_b):
        fn()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed_once(fn_a))
        times_b.append(timed_once(fn_b))
    return times_a, times_b


def compare(psr_run, ch_run, pixel):
    """Print how well the two codes agree on images (moments, pixels) and on gradients."""
    with torch.no_grad():
        ours = psr_run.images(psr_run.particles, psr_run.k1).double()
        theirs = ch_run.images(ch_run.particles, ch_run.k1).double()
    assert ours.shape == theirs.shape == (N_SETTINGS, RESOLUTION[1], RESOLUTION[0]), (ours.shape, theirs.shape)
    theirs_n = theirs / theirs.sum((-1, -2), keepdim=True)
    ours_n = ours / ours.sum((-1, -2), keepdim=True)
    mo, mt = moments(ours_n, pixel), moments(theirs_n, pixel)
    rms = torch.stack(mo[2:]).clamp(min=pixel)
    d_centroid = max(float(((a - b).abs() / r).max()) for a, b, r in zip(mo[:2], mt[:2], rms))
    d_rms = max(float(((a - b).abs() / a).max()) for a, b in zip(mo[2:], mt[2:]))
    d_pixel = float((ours_n - theirs_n).abs().max() / ours_n.abs().max())
    kept = float(ours.sum((-1, -2)).min())
    print(f"  images agree: max rel. diff of rms x/y {d_rms:.2e}, of centroids (in rms) {d_centroid:.2e}, "
          f"max pixel diff / peak {d_pixel:.2e}; rms x over the scan {float(mo[2].min()) * 1e3:.3f}.."
          f"{float(mo[2].max()) * 1e3:.3f} mm, least weight on screen {kept:.4f}")
    return d_rms, d_centroid


def profile_psr(run, label):
    """Where psr's time goes: simple timings of the forward and backward, and of the screen alone."""

    def best(fn, repeats=5):
        fn()
        return min(timed_once(fn) for _ in range(repeats))

    def forward():
        return run.images(run.particles.clone().requires_grad_(True), run.k1.clone().requires_grad_(True))

    def forward_backward():
        ((forward() - run.target) ** 2).mean().backward()

    with torch.no_grad():
        out = run.lattice(sim.ParticleBeam(run.particles, p0c=P0C), settings={f"{SCANNED}.k1": run.k1}).beam.particles
    x, y = out[..., 0].contiguous(), out[..., 2].contiguous()
    screen = run.lattice["SCR"]

    def screen_forward_backward():
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        ((screen.image_xy(xs, ys) - run.target) ** 2).mean().backward()

    t_fwd, t_all = best(forward), best(forward_backward)
    t_scr_fwd = best(lambda: screen.image_xy(x, y))
    t_scr_all = best(screen_forward_backward)
    print(f"  psr {label} breakdown (best of 5): forward {t_fwd * 1e3:.0f} ms (screen image {t_scr_fwd * 1e3:.0f} ms), "
          f"backward {(t_all - t_fwd) * 1e3:.0f} ms (screen image {(t_scr_all - t_scr_fwd) * 1e3:.0f} ms); "
          f"the rest is maps, x/y = M[[0, 2]] @ particles^T and the loss")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def timed_once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="print where psr's time goes")
    args = parser.parse_args()

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), cheetah {cheetah.__version__}, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.particles} particles, {N_SETTINGS}-setting scan of {SCANNED}.k1, {len(LINE)} elements + "
          f"{RESOLUTION[0]}x{RESOLUTION[1]} CIC screen, forward + backward (grad wrt k1 and particles)")
    particles = make_particles(args.particles)
    # a pixel size that keeps the widest image of the scan well on the screen (+-6 rms)
    with torch.no_grad():
        widest = PsrRun(particles, 1e-3, torch.float64)
        out = widest.lattice(sim.ParticleBeam(particles, p0c=P0C), settings={f"{SCANNED}.k1": K1_SCAN}).beam.particles
        half = 6 * float(torch.maximum(out[..., 0].std(-1), out[..., 2].std(-1)).max())
    pixel = 2 * half / RESOLUTION[0]
    print(f"pixel size {pixel * 1e6:.2f} um")

    for dtype in (torch.float32, torch.float64):
        label = str(dtype).replace("torch.", "")
        psr_run, ch_run = PsrRun(particles, pixel, dtype), CheetahRun(particles, pixel, dtype)
        with torch.no_grad():
            # a fixed target: the images of a slightly wider beam
            psr_run.target = psr_run.images(psr_run.particles * 1.1, psr_run.k1)
            ch_run.target = psr_run.target.to(dtype)
        print(f"{label}:")
        compare(psr_run, ch_run, pixel)
        _, g_k1_psr, g_x_psr = psr_run.step()
        _, g_k1_ch, g_x_ch = ch_run.step()
        d_gk1 = float((g_k1_psr - g_k1_ch).abs().max() / g_k1_psr.abs().max())
        print(f"  gradients agree: max rel. diff of dloss/dk1 {d_gk1:.2e}")
        t_psr, t_ch = timed_pair(psr_run.step, ch_run.step, args.repeats)
        m_psr, m_ch = statistics.median(t_psr), statistics.median(t_ch)
        print(f"  psr     forward+backward: median {m_psr * 1e3:8.1f} ms  (min {min(t_psr) * 1e3:.1f}, "
              f"max {max(t_psr) * 1e3:.1f}; {args.repeats} repeats, interleaved with cheetah's)")
        print(f"  cheetah forward+backward: median {m_ch * 1e3:8.1f} ms  (min {min(t_ch) * 1e3:.1f}, "
              f"max {max(t_ch) * 1e3:.1f}; {args.repeats} repeats)")
        print(f"  {label}: cheetah/psr = {m_ch / m_psr:.2f}x (median), {min(t_ch) / min(t_psr):.2f}x (min)")
        if args.profile:
            profile_psr(psr_run, label)


if __name__ == "__main__":
    main()
