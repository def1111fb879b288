"""What every benchmark shares: the machine description, the configurations under test, the
diffusers counterpart of our U-Net, timing with warm-up, alternating rounds, tables and JSON.

The benchmarks are scripts (`python benchmarks/<name>.py`), not tests. Each inserts the
repository root at the front of `sys.path` (through `repo_on_path`) so that `pipeline` is this
checkout's code even when another checkout is installed in the environment in editable mode.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]

# The paper's CIFAR10 model and run (Ho et al. 2020 Sec. 4 and App. B): T = 1000, linear betas
# 1e-4..0.02, 35.7M-parameter U-Net (ch 128, ch_mult 1,2,2,2, 2 res blocks, attention at
# 16x16, dropout 0.1), Adam at 2e-4 with 5000 warmup steps, EMA 0.9999, gradient clip 1.
CIFAR10_MODEL = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                     dropout=0.1)
CIFAR10_TRAIN = dict(lr=2e-4, warmup_steps=5000, ema_decay=0.9999, grad_clip=1.0)
CIFAR10_IMAGE_SHAPE = (3, 32, 32)
CIFAR10_TIMESTEPS = 1000
DIGITS_IMAGE_SHAPE = (1, 8, 8)
CONFIGS = ("cifar10", "digits")


def repo_on_path() -> None:
    """Put this checkout first on sys.path (before any editable install of the project)."""
    root = str(REPO_ROOT)
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)


repo_on_path()

import torch  # noqa: E402  (after the path set-up above)

# --------------------------------------------------------------------------------------------
# Configurations under test
# --------------------------------------------------------------------------------------------


def load_experiment(config: str, experiment: str = "eps_simple",
                    params_path: str | Path = REPO_ROOT / "params.yaml"):
    """(ExperimentConfig, image shape (C, H, W)) of a benchmark configuration.

    `digits`: the experiment as params.yaml defines it (the default study, 8x8 grey digits).
    `cifar10`: the same experiment with the paper's CIFAR10 model, T and optimizer settings
    (`CIFAR10_*` above), for 32x32 RGB images.
    """
    from pipeline.core.params import load_params

    if config not in CONFIGS:
        raise ValueError(f"unknown config '{config}'; choose one of: {', '.join(CONFIGS)}")
    exp = load_params(params_path).experiment(experiment)
    if config == "digits":
        return exp, DIGITS_IMAGE_SHAPE
    channels, size, _ = CIFAR10_IMAGE_SHAPE
    exp = dataclasses.replace(
        exp,
        data=dataclasses.replace(exp.data, dataset="cifar10", image_size=size, channels=channels),
        diffusion=dataclasses.replace(exp.diffusion, num_timesteps=CIFAR10_TIMESTEPS,
                                      beta_start=None, beta_end=None),
        model=dataclasses.replace(exp.model, **CIFAR10_MODEL),
        train=dataclasses.replace(exp.train, **CIFAR10_TRAIN),
    )
    return exp, CIFAR10_IMAGE_SHAPE


def diffusers_unet(model_cfg, image_shape: Sequence[int], out_channels: Optional[int] = None):
    """diffusers' `UNet2DModel` with the architecture of our `pipeline.model.unet.UNet`.

    For the CIFAR10 model this is the configuration of google/ddpm-cifar10-32 (the official
    DDPM weights converted to diffusers): one attention head as wide as the block, GroupNorm 32
    with eps 1e-6, TF-"SAME"-padded downsampling (`downsample_padding=0`), sinusoidal time
    embedding [sin, cos] with frequencies exp(-i log(1e4) / (half - 1)) (`freq_shift=1`,
    `flip_sin_to_cos=False`), and the same dropout. Raises ValueError where diffusers cannot
    express the model (e.g. channel counts not divisible by 32).
    """
    from diffusers import UNet2DModel

    channels, size, _ = image_shape
    widths = tuple(model_cfg.ch * m for m in model_cfg.ch_mult)
    if any(w % 32 for w in widths):
        raise ValueError(f"diffusers' UNet2DModel needs widths divisible by 32, got {widths}")
    resolutions = [size // 2 ** level for level in range(len(widths))]
    attn = set(model_cfg.attn_resolutions)
    down = tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in resolutions)
    up = tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(resolutions))
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=out_channels or channels,
        block_out_channels=widths, down_block_types=down, up_block_types=up,
        layers_per_block=model_cfg.num_res_blocks, attention_head_dim=None,
        norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, dropout=model_cfg.dropout, act_fn="silu", time_embedding_type="positional",
    )


def random_images(batch_size: int, image_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A batch of uniform random uint8 images (throughput does not depend on pixel values)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, *image_shape), generator=gen, dtype=torch.uint8)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------


def set_threads(threads: Optional[int]) -> None:
    """Use `threads` intra-op threads (None: torch's default) and one inter-op thread."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, torch, threads, load, nice, commit."""
    import pipeline

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        total_mem = None
    return {
        "gpu": gpu() if torch.cuda.is_available() else None,
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "memory_gib": round(total_mem, 1) if total_mem else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.cuda.is_available(),
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nice": os.nice(0),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "pipeline_path": str(Path(pipeline.__file__).parent),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def gpu(index: int = 0) -> dict[str, Any]:
    """Name, compute capability, memory and CUDA / cuDNN versions of CUDA device `index`."""
    p = torch.cuda.get_device_properties(index)
    return {"name": p.name, "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2 ** 30, 1),
            "multiprocessors": p.multi_processor_count, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def check_pipeline_is_this_checkout() -> None:
    import pipeline

    where = Path(pipeline.__file__).resolve().parent
    if where != REPO_ROOT / "pipeline":
        raise SystemExit(f"error: imported pipeline from {where}, not {REPO_ROOT / 'pipeline'}")


def describe(info: dict[str, Any]) -> str:
    gpu_name = f"{info['gpu']['name']}, " if info.get("gpu") else ""
    return (f"{gpu_name}{info['cpu_model']}, {info['usable_cores']} usable cores, "
            f"torch {info['torch']} ({info['torch_threads']} threads), "
            f"diffusers {info['diffusers']}, nice {info['nice']}, "
            f"load {info['load_average_at_start'][0]:.2f}, "
            f"commit {info['git_commit']}{' (dirty)' if info['git_dirty'] else ''}")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of wall time `fn()` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(cases: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
              log: bool = True) -> dict[str, list[float]]:
    """Time each case once per round, alternating, after `warmup` untimed calls of each.

    The order flips every round (A B, B A, A B, ...) so that a slow drift of the machine's
    load hits every case alike; seconds per call are returned per case, in round order.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            seconds[name].append(timed(cases[name]))
            if log:
                print(f"  round {r + 1}/{rounds} {name}: {seconds[name][-1]:.3f} s",
                      flush=True)
    return seconds


def summary(seconds: Sequence[float], items_per_call: float) -> dict[str, Any]:
    """Median (and spread) of per-call seconds and the items/s of the median call."""
    med = statistics.median(seconds)
    return {"seconds": list(seconds), "median_s": med, "min_s": min(seconds),
            "max_s": max(seconds), "items_per_call": items_per_call,
            "per_s": items_per_call / med}


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> dict[str, Any]:
    """Throughput ratio ours / theirs per round (= their seconds / ours), and its median.

    Each round's two calls ran back to back, so the per-round ratio cancels most of the
    shared machine's load changes; the median over rounds is the figure to quote.
    """
    per_round = [t / o for o, t in zip(ours, theirs)]
    return {"per_round": per_round, "median": statistics.median(per_round),
            "min": min(per_round), "max": max(per_round),
            "ratio_of_medians": statistics.median(theirs) / statistics.median(ours)}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of `rows` (floats to 4 significant digits)."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def write_json(path: Optional[str | Path], benchmark: str, args: Any,
               info: dict[str, Any], results: Any) -> None:
    """Write {benchmark, args, machine, results} to `path` atomically (nothing if None)."""
    if path is None:
        return
    from pipeline.core.io import atomic_path

    payload = {"benchmark": benchmark, "args": vars(args) if hasattr(args, "__dict__") else args,
               "machine": info, "results": results}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def add_common_args(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, "
                             f"{torch.get_num_threads()} here)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the results as JSON to PATH")


# --------------------------------------------------------------------------------------------
# Precision (train.precision / sample.precision of ours; torch.autocast for diffusers)
# --------------------------------------------------------------------------------------------


def add_precision_arg(parser) -> None:
    parser.add_argument("--precisions", default="fp32",
                        help="comma-separated precisions to time, each for ours and diffusers: "
                             "fp32, bf16 (ours: pipeline.model.precision; diffusers: "
                             "torch.autocast to bfloat16) (default: %(default)s)")


def parse_precisions(parser, text: str) -> list[str]:
    found = [p for p in text.split(",") if p]
    if not found or not set(found) <= {"fp32", "bf16"}:
        parser.error(f"--precisions: choose from fp32,bf16, got '{text}'")
    return found


def case_name(impl: str, precision: str, precisions: Sequence[str]) -> str:
    """'ours' / 'diffusers' when only fp32 is timed, else 'ours bf16' and the like."""
    return impl if list(precisions) == ["fp32"] else f"{impl} {precision}"


def autocast(precision: str, device_type: str = "cpu"):
    """torch.autocast to bfloat16 on `device_type` for bf16; a no-op context otherwise."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def precision_ratios(seconds: dict[str, Sequence[float]],
                     precisions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Paired throughput ratios: ours / diffusers at each precision, and every precision of
    ours against diffusers' default fp32 (what each tool gives without mixed precision)."""
    ratios = {}
    for p in precisions:
        ours, theirs = case_name("ours", p, precisions), case_name("diffusers", p, precisions)
        if ours in seconds and theirs in seconds:
            ratios[f"{ours} / {theirs}"] = paired_ratio(seconds[ours], seconds[theirs])
    baseline = case_name("diffusers", "fp32", precisions)
    for p in precisions:
        ours = case_name("ours", p, precisions)
        if p != "fp32" and ours in seconds and baseline in seconds:
            ratios[f"{ours} / {baseline}"] = paired_ratio(seconds[ours], seconds[baseline])
    return ratios
