"""A prepared check of the pipeline on one GPU: what the paper's CIFAR10 model costs there.

One command, one JSON, one markdown table, within a time budget (`--budget`, default 420 s:
under 8 minutes on an H100 with start-up; a row that does not fit is skipped with a note).
Rows (`CHECKS`, in this order; README.md, "The GPU check", says more): `seeds` (per-image
seeds give byte-identical samples in batches of 8 and of 3), `train` (images/s and MFU of the
pipeline's training step at fp32 / tf32 / bf16, 16 and 128 images, channels_last or not),
`diffusers` (the same for diffusers' UNet2DModel, where it imports), `sample` (ancestral and
50-step DDIM at batch 1000), `bound` (terms/s of the exact NLL bound), `precision` (tf32 and
bf16 samples against fp32 ones) and `compile` (the training step under torch.compile).

MFU: FLOPs per image (FlopCounterMode, as `flops.py`) x images/s over the GPU's dense peak at
that precision (`PEAK_TFLOPS`). Fresh weights, with the layers a fresh U-Net zeroes made
random (`randomize_zero_layers_`), so that its output, precision and batching matter.

    python3 benchmarks/gpu_check.py --wheels build/wheels --json $OUT/gpu_check.json

Exit code 1 where a row failed (its error is in the JSON), 2 without a CUDA device (at once,
writing nothing). `--tiny` runs every row with a small model in seconds: with `--device cpu`
for the tests, on the GPU as a pre-flight; its figures are not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import _common as common  # puts this checkout first on sys.path
from flops import model_flops
from train_throughput import diffusers_train_step, our_train_step

from pipeline.diffusion.gaussian import GaussianDiffusion
from pipeline.measure.nll import NllPart, nll_part
from pipeline.measure.sampling import sample_batch, sample_chunks, sampling_network
from pipeline.model.precision import matmul_precision
from pipeline.model.unet import build_model

PRECISIONS = ("fp32", "tf32", "bf16")
# Dense (no sparsity) peak TFLOP/s by precision, from NVIDIA's data sheets; fp32 is the
# CUDA cores' rate, tf32 and bf16 the tensor cores'. Checked in order against the device name.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0},  # SXM5 (NVIDIA H100 80GB HBM3)
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H200": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0},
}
CHECKS = ("seeds", "train", "diffusers", "sample", "bound", "precision", "compile")
# seconds a row of each check may take on an H100: a row starts only with this much budget left
ESTIMATE_S = {"seeds": 10, "train": 15, "diffusers": 15, "sample": 40, "bound": 15,
              "precision": 20, "compile": 90}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each row measures: the real check (`FULL`) or the tests' CPU run (`TINY`)."""

    train_batches: tuple[int, ...] = (16, 128)
    warmup: int = 3
    steps: int = 15
    sample_batch: int = 1000
    ancestral_steps: int = 10
    ddim_steps: int = 50
    bound_images: int = 100
    bound_terms_per_call: int = 8
    bound_calls: int = 10
    seeds_images: int = 8
    seeds_batch: int = 3
    seeds_ddim_steps: int = 10
    compare_images: int = 256


FULL = Sizes()
TINY = Sizes(train_batches=(2, 4), warmup=1, steps=2, sample_batch=4, ancestral_steps=2,
             ddim_steps=3, bound_images=2, bound_terms_per_call=2, bound_calls=2,
             seeds_ddim_steps=3, compare_images=4)


def tiny_experiment(exp):
    """The cifar10 experiment shrunk for the CPU tests: 3x8x8 images, T = 40, a two-level
    U-Net of width 32 (diffusers' UNet2DModel needs widths divisible by 32)."""
    model = dataclasses.replace(exp.model, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                attn_resolutions=(4,))
    return dataclasses.replace(
        exp, model=model, data=dataclasses.replace(exp.data, image_size=8),
        diffusion=dataclasses.replace(exp.diffusion, num_timesteps=40)), (3, 8, 8)


def peak_of(device: torch.device) -> tuple[str | None, dict[str, float] | None]:
    """(row of PEAK_TFLOPS, its peaks) for the device's name; (None, None) if unknown."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if all(word in name for word in key.split()):
            return key, peaks
    return None, None


def add_wheels(folder: Path) -> list[str]:
    """Put every wheel in `folder` first on sys.path: a pure-Python wheel (diffusers') is a zip
    that zipimport imports from."""
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    sys.path[:0] = wheels
    return wheels


def diffusers_missing() -> str | None:
    """Why diffusers cannot be imported here, or None where it can. Where it cannot, every
    later import of it raises ImportError at once (as `machine()` and `model_flops` expect)."""
    try:
        from diffusers import DDPMScheduler, UNet2DModel  # noqa: F401
    except Exception as err:  # an ImportError, or a failed check of its dependencies
        sys.modules["diffusers"] = None
        return f"{type(err).__name__}: {err}"
    return None


def randomize_zero_layers_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Xavier-uniform weights for the layers a fresh U-Net initialises to zero (each residual
    block's last convolution, the attention projection, the output convolution): a fresh
    model outputs zeros, which every precision and batch computes exactly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                torch.nn.init.xavier_uniform_(p, generator=gen)
    return model


class OutOfTime(BaseException):
    """The check's time budget ran out inside a row (a BaseException, as KeyboardInterrupt:
    library code that catches Exception must not swallow it)."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    @contextlib.contextmanager
    def deadline(self):
        """Raise OutOfTime inside the block when the budget runs out (SIGALRM)."""
        def stop(signum, frame):
            raise OutOfTime()

        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass
class Check:
    """What the rows share (the experiment, the device, the sizes, the budget, the FLOPs per
    image and the peaks) and the rows so far."""

    exp: Any
    image_shape: tuple[int, int, int]
    device: torch.device
    sizes: Sizes
    budget: Budget
    flops: dict[str, float]
    peaks: dict[str, float] | None
    compile_backend: str
    missing_diffusers: str | None
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    _model: torch.nn.Module | None = None

    @property
    def diffusion(self) -> GaussianDiffusion:
        return GaussianDiffusion.from_config(self.exp.diffusion)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def model(self) -> torch.nn.Module:
        """The sampling rows' U-Net (eval mode), built once: fresh, zero layers randomized."""
        if self._model is None:
            torch.manual_seed(0)
            model = randomize_zero_layers_(build_model(self.exp, self.image_shape), seed=0)
            self._model = model.to(self.device).eval()
        return self._model

    def rate(self, per_s: float, unit: str, flops_per_item: float, precision: str) -> dict:
        tflops = flops_per_item * per_s / 1e12
        peak = self.peaks[precision] if self.peaks else None
        return {"per_s": per_s, "unit": unit, "achieved_tflops": tflops,
                "mfu": tflops / peak if peak else None}

    def run(self, row: dict[str, Any], measure: Callable[[], dict[str, Any]],
            skip: str | None = None) -> None:
        """Measure one row within the budget (unless `skip` says why not); a row that fails is
        recorded and the rest run."""
        left, estimate = self.budget.left(), ESTIMATE_S[row["check"]]
        if skip:
            row.update(status="skipped", note=skip)
        elif left < estimate:
            row.update(status="skipped", note=f"skipped: time budget ({max(left, 0):.0f} s "
                                              f"left, about {estimate:.0f} s needed)")
        else:
            start = time.monotonic()
            try:
                with self.budget.deadline():
                    row.update(measure(), status="ok")
            except OutOfTime:
                row.update(status="skipped", note="stopped: the time budget ran out in this row")
            except Exception as err:  # CUDA out of memory, a compile error: keep the others
                row.update(status="failed", note=f"{type(err).__name__}: {err}"[:300])
            row["wall_s"] = time.monotonic() - start
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.rows.append(row)
        shown = table_row(row)
        print(f"  {row['check']} {shown['case']}, batch {row.get('batch')}: {row['status']}"
              + "".join(f", {shown[k]}" for k in ("rate", "MFU", "result / note") if shown[k]),
              flush=True)


def timed_steps(step: Callable[[], Any], warmup: int, steps: int, sync) -> tuple[list, float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones, the device synchronized
    after each; and the first call's seconds (where torch.compile compiles)."""
    sync()
    first = common.timed(lambda: (step(), sync()))
    for _ in range(warmup - 1):
        step()
    sync()
    return [common.timed(lambda: (step(), sync())) for _ in range(steps)], first


def sample_config(check: Check, sampler: str, steps: int | None, precision: str,
                  eta: float = 0.0):
    return dataclasses.replace(check.exp.sample, sampler=sampler, steps=steps, eta=eta,
                               precision=precision, compile=False)


def draw(check: Check, cfg, diffusion, first: int, count: int) -> np.ndarray:
    """uint8 images first .. first + count - 1 of seed 0, as the sample stage draws them."""
    net = sampling_network(check.model(), cfg)
    return sample_batch(net, diffusion, cfg, check.image_shape, first, count, seed=0,
                        device=check.device)["images"]


def seeds_rows(check: Check) -> None:
    n, b = check.sizes.seeds_images, check.sizes.seeds_batch
    diffusion = check.diffusion
    for precision in PRECISIONS:
        def measure(precision=precision):
            cfg = sample_config(check, "ddim", check.sizes.seeds_ddim_steps, precision, eta=1.0)
            whole = draw(check, cfg, diffusion, 0, n)
            parts = np.concatenate([draw(check, cfg, diffusion, f, c)
                                    for f, c in sample_chunks(n, b)])
            equal = whole.tobytes() == parts.tobytes()
            differ = int((whole != parts).sum())
            return {"equal": equal, "pixels_differing": differ, "pixels": whole.size,
                    "batches": [n, b], "result": f"byte-identical: {equal} ({differ} of "
                                                 f"{whole.size} pixels differ)"}

        check.run({"check": "seeds", "impl": "ours", "precision": precision,
                   "batch": f"{n} / {b}"}, measure)


def train_rows(check: Check, impl: str, compiled: bool) -> None:
    """Training rows of `impl` (ours or diffusers): eager at each batch and precision (ours
    both channels_last and contiguous); compiled, channels_last on a GPU as train_worker, the
    costly compiles likeliest to be used first (bf16, the largest batch)."""
    name = "compile" if compiled else "diffusers" if impl == "diffusers" else "train"
    batches, layouts = check.sizes.train_batches, (True, False) if impl == "ours" else (False,)
    if compiled:
        cases = [(p, b, check.device.type == "cuda") for p in PRECISIONS[::-1]
                 for b in sorted(batches, reverse=True)]
    else:
        cases = [(p, b, cl) for b in batches for p in PRECISIONS for cl in layouts]
    skip = None
    if impl == "diffusers" and check.missing_diffusers:
        skip = f"skipped: diffusers not importable ({check.missing_diffusers})"
    for precision, batch, channels_last in cases:
        def measure(precision=precision, batch=batch, channels_last=channels_last):
            if compiled:
                torch._dynamo.reset()  # a fresh compile for every row
            with matmul_precision(precision):
                if impl == "ours":
                    step, _ = our_train_step(
                        check.exp, check.image_shape, batch, precision=precision,
                        device=check.device, channels_last=channels_last,
                        compile_backend=check.compile_backend if compiled else None)
                else:
                    step, _ = diffusers_train_step(check.exp, check.image_shape, batch,
                                                   precision=precision, device=check.device)
                seconds, first = timed_steps(step, check.sizes.warmup, check.sizes.steps,
                                             check.sync)
            s = common.summary(seconds, batch)
            # MFU from our step's FLOPs for both: the same architecture, the same work
            return {**check.rate(s["per_s"], "images/s", check.flops["train_step"], precision),
                    "s_per_step": s["median_s"], "first_step_s": first, "seconds": seconds}

        check.run({"check": name, "impl": impl, "precision": precision, "compile": compiled,
                   "channels_last": channels_last, "batch": batch}, measure, skip)


def sample_rows(check: Check) -> None:
    sizes, T, full = check.sizes, check.exp.diffusion.num_timesteps, check.diffusion
    batch = sizes.sample_batch
    short = GaussianDiffusion.from_config(
        dataclasses.replace(check.exp.diffusion, num_timesteps=sizes.ancestral_steps))
    for sampler, steps, diffusion in (("ancestral", sizes.ancestral_steps, short),
                                      ("ddim", sizes.ddim_steps, full)):
        chain = T if sampler == "ancestral" else steps  # network calls per image
        for precision in PRECISIONS:
            def measure(sampler=sampler, steps=steps, diffusion=diffusion, chain=chain,
                        precision=precision):
                draw(check, sample_config(check, "ddim", 1, precision), full, 0, batch)
                cfg = sample_config(check, sampler, steps if sampler == "ddim" else None,
                                    precision)
                check.sync()
                seconds = common.timed(lambda: (draw(check, cfg, diffusion, 0, batch),
                                                check.sync()))
                per_step = seconds / steps
                out = check.rate(batch / (per_step * chain), "images/s",
                                 check.flops["forward"] * chain, precision)
                out.update(steps_timed=steps, chain_steps=chain, s_per_step=per_step)
                if sampler == "ancestral":
                    out["extrapolated"] = True
                    out["note"] = (f"{steps} steps of a T = {steps} chain timed, extrapolated "
                                   f"to T = {T}")
                return out

            check.run({"check": "sample", "impl": "ours", "sampler": sampler,
                       "precision": precision, "batch": batch}, measure)


def bound_rows(check: Check) -> None:
    sizes, diffusion = check.sizes, check.diffusion
    images = common.random_images(sizes.bound_images, check.image_shape)
    per_call = sizes.bound_terms_per_call

    def part(calls: int) -> NllPart:  # terms 1.. of the term order: no L_T, full calls only
        return NllPart(0, sizes.bound_images, 1, per_call * calls)

    def measure():
        def run(calls):
            nll_part(check.model(), diffusion, images, part(calls), method="exact",
                     num_strata=0, terms_per_call=per_call, seed=0, device=check.device)
            check.sync()

        run(1)
        seconds = common.timed(lambda: run(sizes.bound_calls))
        terms = sizes.bound_images * per_call * sizes.bound_calls
        return {**check.rate(terms / seconds, "terms/s", check.flops["forward"], "fp32"),
                "terms": terms, "note": f"{per_call} timesteps x {sizes.bound_images} images "
                                        "per call, strict fp32 (as the evaluate stage)"}

    check.run({"check": "bound", "impl": "ours", "precision": "fp32",
               "batch": sizes.bound_images * per_call}, measure)


def precision_rows(check: Check) -> None:
    n, steps, diffusion = check.sizes.compare_images, check.sizes.ddim_steps, check.diffusion
    reference: dict[str, np.ndarray] = {}
    for precision in ("tf32", "bf16"):
        def measure(precision=precision):
            if "fp32" not in reference:
                reference["fp32"] = draw(check, sample_config(check, "ddim", steps, "fp32"),
                                         diffusion, 0, n)
            images = draw(check, sample_config(check, "ddim", steps, precision), diffusion, 0, n)
            diff = np.abs(images.astype(np.int16) - reference["fp32"].astype(np.int16))
            return {"images": n, "ddim_steps": steps, "max_abs_diff": int(diff.max()),
                    "mean_abs_diff": float(diff.mean()),
                    "fraction_differing": float((diff > 0).mean()),
                    "result": f"max {int(diff.max())}, mean {diff.mean():.3g}, "
                              f"{(diff > 0).mean():.2%} of pixels differ"}

        check.run({"check": "precision", "impl": "ours", "precision": f"{precision} vs fp32",
                   "batch": n}, measure)


SECTIONS: dict[str, Callable[[Check], None]] = {
    "seeds": seeds_rows,
    "train": lambda check: train_rows(check, "ours", compiled=False),
    "diffusers": lambda check: train_rows(check, "diffusers", compiled=False),
    "sample": sample_rows,
    "bound": bound_rows,
    "precision": precision_rows,
    "compile": lambda check: train_rows(check, "ours", compiled=True),
}


def case_label(row: dict[str, Any]) -> str:
    words = [row.get("impl", ""), row.get("sampler", ""), row.get("precision", "")]
    words += ["compiled" if row.get("compile") else "", "channels_last" if row.get(
        "channels_last") else ""]
    return " ".join(w for w in words if w)


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    rate = f"{row['per_s']:.4g} {row['unit']}" if "per_s" in row else None
    note = row.get("result") or row.get("note") or ""
    if row.get("compile") and row["status"] == "ok":
        note = f"first step (compiles) {row['first_step_s']:.1f} s"
    return {"check": row["check"], "case": case_label(row), "batch": row.get("batch"),
            "rate": rate, "MFU": f"{row['mfu']:.1%}" if row.get("mfu") else None,
            "result / note": note}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu only with --tiny, for the tests (default: %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="a small model and few steps: every row in seconds (tests only)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for all rows; a row that no longer fits is skipped "
                        "(default: %(default)s)")
    p.add_argument("--checks", default=",".join(CHECKS),
                   help="comma-separated subset of the rows, run in this order "
                        "(default: %(default)s)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile rows (default: %(default)s)")
    p.add_argument("--wheels", type=Path, default=None, metavar="DIR",
                   help="put the wheels in DIR (e.g. diffusers', from `pip download diffusers "
                        "--no-deps -d DIR`) first on sys.path")
    common.add_common_args(p)
    args = p.parse_args(argv)
    checks = [c for c in args.checks.split(",") if c]
    if not checks or not set(checks) <= set(CHECKS):
        p.error(f"--checks: choose from {','.join(CHECKS)}, got '{args.checks}'")
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny (the CIFAR10 rows would take hours on a CPU)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, cuda available: False); "
              "run it on a GPU machine: python3 benchmarks/gpu_check.py --json PATH",
              file=sys.stderr)
        return 2
    budget = Budget(args.budget)
    wheels = add_wheels(args.wheels) if args.wheels else []
    common.set_threads(args.threads)
    common.check_pipeline_is_this_checkout()

    device = torch.device(args.device)
    exp, image_shape = common.load_experiment("cifar10")
    if args.tiny:
        exp, image_shape = tiny_experiment(exp)
    sizes = TINY if args.tiny else FULL
    missing = diffusers_missing()
    info = {**common.machine(), "wheels": wheels}
    peak_name, peaks = peak_of(device)
    flops = model_flops(exp, image_shape, batch=2)  # on the CPU, as flops.py counts
    check = Check(exp, image_shape, device, sizes, budget, flops, peaks, args.compile_backend,
                  missing)
    print(f"machine: {common.describe(info)}")
    print(f"peak TFLOP/s: {peaks or 'unknown peak'}")
    print(f"model: {common.count_parameters(check.model()) / 1e6:.2f}M parameters, image "
          f"{'x'.join(map(str, image_shape))}, T = {exp.diffusion.num_timesteps}; train step "
          f"{flops['train_step'] / 1e9:.2f} GFLOP/image; budget {args.budget:.0f} s", flush=True)
    results = {"config": "tiny" if args.tiny else "cifar10", "image_shape": list(image_shape),
               "num_timesteps": exp.diffusion.num_timesteps,
               "parameters": common.count_parameters(check.model()),
               "flops_per_image": flops, "sizes": dataclasses.asdict(sizes),
               "peak": peak_name or "unknown peak", "peak_tflops": peaks,
               "peak_table_tflops": PEAK_TFLOPS, "diffusers_missing": missing,
               "budget_s": args.budget, "rows": check.rows}
    for name in checks:
        SECTIONS[name](check)
        results["elapsed_s"] = time.monotonic() - budget.start
        # the rows so far, rewritten after each check: a run cut short keeps what it measured
        common.write_json(args.json, "gpu_check", args, info, results)
    print()
    print(common.table([table_row(r) for r in check.rows],
                       ["check", "case", "batch", "rate", "MFU", "result / note"]))
    failed = sum(r["status"] == "failed" for r in check.rows)
    skipped = sum(r["status"] == "skipped" for r in check.rows)
    print(f"{len(check.rows)} rows, {skipped} skipped, {failed} failed, in "
          f"{results['elapsed_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
