"""Stage `evaluate@<E>-<S>`: FID / IS / KID of the samples of run (experiment E, seed S) and
the NLL bound (bits/dim) of its model, each with its standard error.

    python -m stages.evaluate --experiment eps_simple [--seed 0] [--params params.yaml]

What is measured, and how, is `pipeline.evaluation`. Writes metrics/<E>-<S>.json (DVC
metrics: numbers only), metrics/<E>-<S>_run.json (what the run was: settings, status, sample
counts, timings), metrics/<E>-<S>_nll.csv (the bound of every test and train image, for comparing runs
image by image) and, for scores over training, metrics/<E>-<S>_checkpoints.csv with its figure
plots/fid_over_training/<E>-<S>.png (one row, the final model, without evaluate.checkpoints).
An unstable model gets status "unstable" and no scores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.status import Status
from stages import _common


def main(argv: list[str] | None = None) -> int:
    p = _common.parser("evaluate", "Measure FID / IS / KID and NLL (bits/dim) of one run.",
                       experiment=True)
    p.add_argument("--data", default="data/prepared", type=Path,
                   help="prepared data folder (default: %(default)s)")
    p.add_argument("--models", default="models", type=Path,
                   help="folder holding models/<E>-<S>/ and models/classifier/ "
                        "(default: %(default)s)")
    p.add_argument("--samples", default="samples", type=Path,
                   help="folder holding samples/<E>-<S>/ (default: %(default)s)")
    p.add_argument("--out", default="metrics", type=Path,
                   help="folder for <E>-<S>.json, _nll.csv and _checkpoints.csv "
                        "(default: %(default)s)")
    p.add_argument("--figures", default="plots/fid_over_training", type=Path,
                   help="folder for <E>-<S>.png, FID and NLL over training "
                        "(default: %(default)s)")
    args = p.parse_args(argv)

    def body(params) -> int:
        from pipeline.diffusion import GaussianDiffusion
        from pipeline.evaluation import (METRICS, Apparatus, flatten, nll_ceiling, nll_path,
                                         save_nll_per_image, save_run_metrics)

        from pipeline.figures import save_scores_over_training
        from pipeline.over_training import (best_by_fid, final_scores, score_checkpoints,
                                            write_scores)
        from pipeline.sampling import (is_ok, kept_ema_snapshots, load_model, load_samples,
                                       read_model_info)

        exp = params.experiment(args.experiment, args.seed)
        tracker = _common.tracker_for(params)
        model_dir = args.models / exp.key
        info = read_model_info(model_dir, exp)
        samples, sample_status = load_samples(args.samples / exp.key, exp)
        d = exp.diffusion
        record = {"experiment": exp.name, "seed": exp.seed,
                  "status": info.get("status", Status.UNSTABLE.value), "dataset": exp.data.dataset,
                  "mean_type": d.mean_type, "var_type": d.var_type, "loss": d.loss,
                  "weighting": d.weighting, "schedule": d.schedule,
                  "num_timesteps": d.num_timesteps, **{k: None for k in METRICS},
                  "nll_method": exp.evaluate.nll,
                  "num_samples": int(len(samples)), "data_levels": info["data_levels"],
                  "nll_ceiling_bpd": nll_ceiling(info["data_levels"]),
                  "train_steps": info.get("step"), "final_loss": info.get("final_loss"),
                  "train_wall_s": info.get("train_wall_s"),
                  "images_per_s": info.get("images_per_s")}
        run_id = tracker.run_for(exp.name, {"config_hash": exp.config_hash()}, exp.seed)
        per_image = {"test": [], "train": []}
        scores = final_scores(record)  # no scores unless evaluated below
        if is_ok(info) and sample_status == Status.OK:
            start = time.monotonic()
            device = _common.device_for(exp.train.use_gpu)
            apparatus = Apparatus.load(exp, args.data, args.models / "classifier" /
                                       "classifier.pt", device)
            estimates = apparatus.fidelity(samples, exp.evaluate.is_splits, seed=exp.seed)
            model = load_model(exp, model_dir, "ema", device)
            diffusion = GaussianDiffusion.from_config(exp.diffusion,
                                                      data_levels=apparatus.train.levels)
            nll, per_image = apparatus.nll(model, diffusion, exp.evaluate, seed=exp.seed + 2,
                                           progress=True)
            record.update(flatten({**estimates, **nll}))
            record["evaluate_wall_s"] = time.monotonic() - start
            scores = final_scores(record)
            if exp.evaluate.checkpoints is not None:
                kept = list(kept_ema_snapshots(model_dir))
                if not kept:
                    print(f"warning: evaluate.checkpoints is set but {model_dir} keeps no EMA "
                          f"snapshots; rerun `dvc repro train@{exp.key}`", file=sys.stderr)
                start = time.monotonic()
                scores = score_checkpoints(
                    exp, model_dir, kept, apparatus.train.images, apparatus.test.images,
                    extractor=apparatus.extractor, weights=apparatus.weights,
                    image_shape=tuple(info["image_shape"]), device=device, seed=exp.seed + 3,
                    data_levels=apparatus.train.levels)
                best = best_by_fid(scores) or {}
                record.update({"checkpoint_num_samples": exp.evaluate.checkpoint_num_samples,
                               "best_checkpoint_step": best.get("step"),
                               "best_checkpoint_fid": best.get("fid"),
                               "best_checkpoint_nll_bpd": best.get("nll_bpd"),
                               "checkpoints_wall_s": time.monotonic() - start})
        elif record["status"] == Status.OK:
            record["status"] = sample_status
        out, info_out = save_run_metrics(args.out, exp.key, record)
        save_nll_per_image(nll_path(args.out, exp.key), per_image)
        scores_csv = args.out / f"{exp.key}_checkpoints.csv"
        figure = args.figures / f"{exp.key}.png"
        write_scores(scores, scores_csv)
        best_step = record.get("best_checkpoint_step")
        save_scores_over_training(
            scores["step"].tolist(), scores["fid"].tolist(), scores["nll_bpd"].tolist(), figure,
            f"{exp.key}: FID and NLL over training", best_step=best_step,
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
        tracker.log_metrics(run_id, {k: v for k, v in record.items()
                                     if k.startswith(("fid", "is_", "kid_", "nll_bpd"))
                                     and v is not None})
        tracker.set_tags(run_id, {"ddpm.status": record["status"]})
        tracker.log_artifact(run_id, out, "metrics")
        tracker.log_artifact(run_id, info_out, "metrics")
        tracker.set_terminated(run_id, "FINISHED")  # evaluate is the run's last stage
        shown = ", ".join(f"{k} {record[k]:.4g} ± {1.96 * record[k + '_se']:.2g}"
                          for k in ("fid", "is_mean", "nll_bpd") if record.get(k) is not None)
        print(f"evaluated {exp.key} ({record['status']}): {shown or 'no metrics'} -> {out}")
        if best_step is not None:
            print(f"best FID over training: step {best_step} (quick FID "
                  f"{record['best_checkpoint_fid']:.4g}) -> {scores_csv}, {figure}")
        return 0

    return _common.run(body, args.params)


if __name__ == "__main__":
    raise SystemExit(main())
