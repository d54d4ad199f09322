"""Memory and time of backpropagating through many space-charge kicks, with `SpaceCharge(checkpoint=...)`
off (autograd keeps every intermediate of every kick) and on (each kick keeps its particles' positions
and its field grid, the rest is recomputed in the backward pass; and groups of ~sqrt(2 n) of an
element's n slices keep only their incoming particles and are tracked again in the backward pass).

A cold uniformly charged ellipsoid (5 MeV electrons, 1 nC, rms 1 mm) through a 1 m drift with 1 or 40
kicks, 100k particles, 32^3 grid, float32; forward + backward of a loss of the final momenta with
respect to the incoming particles. Memory is measured in a fresh process per configuration:

- cold: peak RSS during one forward + backward minus the RSS before it, after imports (torch._dynamo
  too, which non-reentrant checkpointing imports on first use and Lightning imports anyway) and making the
  beam (includes computing and caching the Green's functions, as the first step of a fit does);
- warm: the same for a second forward + backward (Green's functions cached, as in every later step of
  a fit); the peak is reset through /proc/self/clear_refs (Linux) before each;
- saved: bytes autograd keeps from the forward for the backward pass (each storage counted once,
  kernels included; tensors a recomputed group makes during the backward pass are not seen).

glibc keeps freed memory in its heap, which blurs RSS; `--malloc-mmap-threshold 65536` (the default
here) makes it return tensors to the system when freed, so RSS follows the live tensors ("0": glibc's
defaults). Time is the median of `--repeat` forward + backward passes in this process, alternating on
and off. Run on an idle machine: timings on shared cores are noisy.

    python benchmarks/bench_space_charge_memory.py [--particles 100000] [--kicks 1 40] [--repeat 5]

`--sim DIR` imports `sim` from DIR instead (e.g. `git archive <commit> sim | tar -x -C DIR` for the code
before checkpointing, which has only the plain mode, reported as "off").
"""

import argparse
import ctypes
from contextlib import nullcontext
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.utils.checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIM = sys.argv[sys.argv.index("--sim") + 1] if "--sim" in sys.argv else str(ROOT)
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, SIM)

import sim  # noqa: E402
from space_charge_analytic import sample_uniform_ellipsoid  # noqa: E402

P0C, CHARGE, SIGMA, LENGTH = 5e6, 1e-9, (1e-3, 1e-3, 1e-3), 1.0
HAS_CHECKPOINT = hasattr(sim.SpaceCharge(), "checkpoint")
MODES = ("off", "on") if HAS_CHECKPOINT else ("off",)


def setup(particles: int, kicks: int, checkpoint: bool, grid: int):
    """(lattice, incoming particles) for a 1 m drift with `kicks` kicks, float32."""
    x = torch.as_tensor(sample_uniform_ellipsoid(particles, SIGMA, seed=0)).float()
    options = {"checkpoint": checkpoint} if HAS_CHECKPOINT else {}
    space_charge = sim.SpaceCharge((grid,) * 3, LENGTH / kicks, **options)
    return sim.Lattice.from_list([{"type": "Drift", "name": "D", "length": LENGTH}], space_charge=space_charge), x


def forward_backward(lattice, x: torch.Tensor, saved: dict | None = None):
    """One forward + backward; with `saved`, the bytes of each storage autograd keeps, by address."""

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if saved is not None else nullcontext():
        out = lattice(sim.ParticleBeam(x, P0C, "electron", CHARGE)).beam.particles
        loss = out[..., 1].square().mean() + out[..., 3].square().mean() + out[..., 5].square().mean()
    loss.backward()
    return x.grad


def rss_mib() -> float:
    """Resident memory [MiB] now."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def peak_mib() -> float:
    """Peak resident memory [MiB] since the process started or `reset_peak` (VmHWM, which clear_refs resets;
    getrusage's ru_maxrss also keeps the peaks of exited threads, so it may not follow a reset)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lock_mapped_pages():
    """Keep the pages mapped now (libraries) resident: the system may drop file pages of a process and
    fault them in again later, which counts as RSS growth. Needs the right to lock memory (root)."""
    try:
        ctypes.CDLL(None, use_errno=True).mlockall(1)  # MCL_CURRENT
    except (OSError, AttributeError):
        pass


def reset_peak() -> float:
    """Reset the peak RSS to the RSS now (Linux), and return it [MiB]."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return rss_mib()


def child(particles: int, kicks: int, checkpoint: bool, grid: int) -> dict:
    """Memory of one configuration, in this (fresh) process."""
    lattice, x = setup(particles, kicks, checkpoint, grid)
    # non-reentrant checkpointing imports torch._dynamo (and sympy, ~90 MiB) when first used; `psr fit`
    # has it already (Lightning imports it), so it is imported here before measuring, in every mode
    torch.utils.checkpoint.checkpoint(torch.sin, torch.zeros(1, requires_grad=True), use_reentrant=False)
    lock_mapped_pages()
    before = reset_peak()
    forward_backward(lattice, x)
    cold = peak_mib() - before
    saved: dict = {}
    before = reset_peak()
    forward_backward(lattice, x, saved)
    warm = peak_mib() - before
    cache = sum(k.numel() * k.element_size() for k in lattice.space_charge._kernels.values())
    return {"cold_mib": cold, "warm_mib": warm, "saved_mib": sum(saved.values()) / 2**20,
            "kernel_cache_mib": cache / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--particles", type=int, default=100_000)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--kicks", type=int, nargs="+", default=[1, 40])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--malloc-mmap-threshold", default="65536")
    parser.add_argument("--sim", default=str(ROOT), help="folder holding the sim package to measure")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a busy machine")
    parser.add_argument("--child", nargs="+", metavar="KICKS CHECKPOINT",
                        help="measure memory in this process: pairs of kicks and on/off; prints JSON lines")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        for kicks, mode in zip(args.child[::2], args.child[1::2]):
            print(json.dumps(child(args.particles, int(kicks), mode == "on", args.grid)), flush=True)
        return

    env = dict(os.environ)
    if args.malloc_mmap_threshold != "0":
        env["MALLOC_MMAP_THRESHOLD_"] = args.malloc_mmap_threshold
    print(f"sim from {SIM}; torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {args.particles} particles, "
          f"{args.grid}^3 grid, 1 m drift; MALLOC_MMAP_THRESHOLD_={env.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}")
    memory = {}
    for kicks in args.kicks:
        for mode in MODES:
            command = [sys.executable, __file__, "--particles", str(args.particles), "--grid", str(args.grid),
                       "--sim", args.sim, "--threads", str(args.threads), "--child", str(kicks), mode]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            memory[kicks, mode] = json.loads(out.strip().splitlines()[-1])

    times = {}
    for kicks in args.kicks:
        runs = {mode: setup(args.particles, kicks, mode == "on", args.grid) for mode in MODES}
        samples = {mode: [] for mode in MODES}
        for mode in MODES:
            forward_backward(*runs[mode])  # warm-up (Green's functions)
        for _ in range(args.repeat):
            for mode in MODES:
                start = time.perf_counter()
                forward_backward(*runs[mode])
                samples[mode].append(time.perf_counter() - start)
        for mode in MODES:
            times[kicks, mode] = statistics.median(samples[mode])

    print("\n| kicks | checkpoint | cold peak RSS growth [MiB] | warm peak RSS growth [MiB] | saved by autograd [MiB] "
          "| kernel cache [MiB] | forward + backward [ms] |")
    print("|---|---|---|---|---|---|---|")
    for (kicks, mode), m in memory.items():
        print(f"| {kicks} | {mode} | {m['cold_mib']:.0f} | {m['warm_mib']:.0f} | {m['saved_mib']:.1f} "
              f"| {m['kernel_cache_mib']:.1f} | {times[kicks, mode] * 1e3:.0f} |")
    low, high = min(args.kicks), max(args.kicks)
    for mode in MODES:
        ratios = [memory[high, mode][key] / memory[low, mode][key] for key in ("cold_mib", "warm_mib", "saved_mib")]
        print(f"checkpoint {mode}: {high} vs {low} kicks memory cold {ratios[0]:.2f}x, warm {ratios[1]:.2f}x, "
              f"saved {ratios[2]:.2f}x")
    for kicks in args.kicks if HAS_CHECKPOINT else []:
        print(f"{kicks} kicks: time on / off = {times[kicks, 'on'] / times[kicks, 'off']:.2f}")


if __name__ == "__main__":
    main()
