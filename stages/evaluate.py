"""Stage `evaluate@<E>`: FID / IS / KID of experiment E's samples, NLL (bits/dim) of its model.

    python -m stages.evaluate --experiment eps_simple [--params params.yaml]

FID and KID against the prepared train split and the Inception Score (mean and std over
evaluate.is_splits splits) through torch-fidelity (the digits classifier's features for digits,
inception-v3-compat for CIFAR10); the variational bound in bits/dim on the first
evaluate.nll_num_images test and train images (exact T-term loop, or the stratified estimator).
Writes metrics/<E>.json (DVC metrics). An unstable model gets status "unstable" and no numbers.

Scores over training: with evaluate.checkpoints set, every EMA snapshot the train stage kept
(models/<E>/checkpoints/) gets a quick FID (evaluate.checkpoint_num_samples samples) and the
stratified NLL; metrics/<E>.json then names the step with the best FID. Always writes
metrics/<E>_checkpoints.csv (step, fid, nll_bpd, ...; one row, the final model, without
checkpoints) and its figure plots/fid_over_training/<E>.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from stages import _common

METRIC_KEYS = ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "nll_bpd", "nll_bpd_stderr",
               "nll_bpd_train", "nll_bpd_train_stderr")


def load_samples(path: Path, name: str) -> tuple[np.ndarray, str]:
    from pipeline.sampling import ModelError

    command = f"`dvc repro sample@{name}` (or `python -m stages.sample --experiment {name}`)"
    if not path.is_file():
        raise ModelError(f"{path}: samples not found; make them with {command}")
    try:
        with np.load(path) as f:
            images, status = f["images"], str(f["status"])
    except Exception as exc:
        raise ModelError(f"{path}: corrupt or truncated samples ({type(exc).__name__}); "
                         f"remake them with {command}") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ModelError(f"{path}: expected uint8 N x C x H x W images; remake them with "
                         f"{command}")
    return images, status


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("evaluate", "Measure FID / IS / KID and NLL (bits/dim) of one "
                       "experiment.", experiment=True)
    p.add_argument("--data", default="data/prepared", type=Path,
                   help="prepared data folder (default: %(default)s)")
    p.add_argument("--models", default="models", type=Path,
                   help="folder holding models/<E>/ and models/classifier/ (default: %(default)s)")
    p.add_argument("--samples", default="samples", type=Path,
                   help="folder holding samples/<E>/ (default: %(default)s)")
    p.add_argument("--out", default="metrics", type=Path,
                   help="folder for <E>.json and <E>_checkpoints.csv (default: %(default)s)")
    p.add_argument("--figures", default="plots/fid_over_training", type=Path,
                   help="folder for <E>.png, FID and NLL over training (default: %(default)s)")
    args = p.parse_args(argv)

    def body(params) -> int:
        from pipeline import metrics
        from pipeline.data import load_prepared, prepared_path
        from pipeline.diffusion import GaussianDiffusion
        from pipeline.figures import save_scores_over_training
        from pipeline.io import write_json
        from pipeline.over_training import (best_by_fid, final_scores, score_checkpoints,
                                            write_scores)
        from pipeline.sampling import is_ok, kept_ema_snapshots, load_model, read_model_info

        exp = params.experiment(args.experiment)
        tracker = _common.tracker_for(params)
        info = read_model_info(args.models / exp.name, exp.name)
        samples, sample_status = load_samples(args.samples / exp.name / "samples.npz", exp.name)
        d = exp.diffusion
        record = {"experiment": exp.name, "status": info.get("status", "unstable"),
                  "dataset": exp.data.dataset, "mean_type": d.mean_type, "var_type": d.var_type,
                  "loss": d.loss, "weighting": d.weighting, "schedule": d.schedule,
                  "num_timesteps": d.num_timesteps, **{k: None for k in METRIC_KEYS},
                  "nll_method": exp.evaluate.nll, "num_samples": int(len(samples)),
                  "train_steps": info.get("step"), "final_loss": info.get("final_loss"),
                  "train_wall_s": info.get("train_wall_s"),
                  "images_per_s": info.get("images_per_s")}
        run_id = tracker.run_for(exp.name, {"config_hash": exp.config_hash()})
        scores = final_scores(record)  # no scores unless evaluated below
        if is_ok(info) and sample_status == "ok":
            start = time.monotonic()
            train_images, _ = load_prepared(prepared_path(args.data, exp.data.dataset, "train"))
            test_images, _ = load_prepared(prepared_path(args.data, exp.data.dataset, "test"))
            extractor, weights = metrics.study_extractor(
                exp.data.dataset, exp.evaluate.inception_weights,
                args.models / "classifier" / "classifier.pt", exp.evaluate.feature_extractor)
            device = _common.device_for(exp.train.use_gpu)
            record.update(metrics.compute_fidelity(
                samples, train_images, extractor=extractor, weights_path=weights,
                is_splits=exp.evaluate.is_splits, kid_subset_size=exp.evaluate.kid_subset_size,
                device=device, download=exp.data.download))
            model = load_model(exp, args.models / exp.name, "ema", device)
            diffusion = GaussianDiffusion.from_config(exp.diffusion)
            n = exp.evaluate.nll_num_images
            for split, images in (("", test_images), ("_train", train_images)):
                nll = metrics.nll_bpd(model, diffusion, images[:n], method=exp.evaluate.nll,
                                      num_strata=exp.evaluate.nll_strata,
                                      batch_size=exp.evaluate.nll_batch_size,
                                      seed=exp.study.seed + 2, device=device, progress=True)
                record[f"nll_bpd{split}"] = nll["nll_bpd"]
                record[f"nll_bpd{split}_stderr"] = nll["nll_bpd_stderr"]
            record["evaluate_wall_s"] = time.monotonic() - start
            scores = final_scores(record)
            if exp.evaluate.checkpoints is not None:
                kept = list(kept_ema_snapshots(args.models / exp.name))
                if not kept:
                    print(f"warning: evaluate.checkpoints is set but {args.models / exp.name} "
                          f"keeps no EMA snapshots; rerun `dvc repro train@{exp.name}`",
                          file=sys.stderr)
                start = time.monotonic()
                scores = score_checkpoints(
                    exp, args.models / exp.name, kept, train_images, test_images,
                    extractor=extractor, weights=weights, image_shape=tuple(info["image_shape"]),
                    device=device, seed=exp.study.seed + 3)
                best = best_by_fid(scores) or {}
                record.update({"checkpoint_steps": kept,
                               "checkpoint_num_samples": exp.evaluate.checkpoint_num_samples,
                               "best_checkpoint_step": best.get("step"),
                               "best_checkpoint_fid": best.get("fid"),
                               "best_checkpoint_nll_bpd": best.get("nll_bpd"),
                               "checkpoints_wall_s": time.monotonic() - start})
        elif record["status"] == "ok":
            record["status"] = sample_status
        out = args.out / f"{exp.name}.json"
        write_json(out, record)
        scores_csv = args.out / f"{exp.name}_checkpoints.csv"
        figure = args.figures / f"{exp.name}.png"
        write_scores(scores, scores_csv)
        best_step = record.get("best_checkpoint_step")
        save_scores_over_training(
            scores["step"].tolist(), scores["fid"].tolist(), scores["nll_bpd"].tolist(), figure,
            f"{exp.name}: FID and NLL over training", best_step=best_step,
            note=("only the final model: set evaluate.checkpoints for scores over training"
                  if exp.evaluate.checkpoints is None else
                  f"quick FID of {exp.evaluate.checkpoint_num_samples} samples per step; "
                  "stratified NLL"))
        for row in scores[scores["source"] == "checkpoint"].to_dict("records"):
            tracker.log_metrics(run_id, {"checkpoint_fid": row["fid"],
                                         "checkpoint_nll_bpd": row["nll_bpd"]},
                                step=int(row["step"]))
        if best_step is not None:
            tracker.log_metrics(run_id, {"best_checkpoint_step": best_step,
                                         "best_checkpoint_fid": record["best_checkpoint_fid"]})
        tracker.log_artifact(run_id, scores_csv, "fid_over_training")
        tracker.log_artifact(run_id, figure, "fid_over_training")
        tracker.log_metrics(run_id, {k: record[k] for k in METRIC_KEYS
                                     if record[k] is not None})
        tracker.set_tags(run_id, {"ddpm.status": record["status"]})
        tracker.log_artifact(run_id, out, "metrics")
        tracker.set_terminated(run_id, "FINISHED")  # evaluate is the experiment's last stage
        shown = ", ".join(f"{k} {record[k]:.4g}" for k in ("fid", "is_mean", "nll_bpd")
                          if record[k] is not None)
        print(f"evaluated {exp.name} ({record['status']}): {shown or 'no metrics'} -> {out}")
        if best_step is not None:
            print(f"best FID over training: step {best_step} (quick FID "
                  f"{record['best_checkpoint_fid']:.4g}) -> {scores_csv}, {figure}")
        return 0

    return _common.run(body, args.params)


if __name__ == "__main__":
    raise SystemExit(main())
