"""The stages as users run them: `dvc repro` of tiny study variants in a fresh git repo, and the
stages' command-line errors."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from helpers import (PROJECT, env_for, make_cifar10_archive, make_study_repo, mlflow_runs,
                     pixels_of_colour, png_pixels, run_record, sh, tiny)
from pipeline.artifacts.records import over_training_path


# What a quiet study log holds none of: Ray Train's report and checkpoint lines, Ray Tune's
# tables, MLflow's INFO lines and database tracebacks, ANSI colour codes, Python warnings.
NOISE = ("Reporting training result", "Checkpoint successfully created", "Trial _tune_trial",
         "╭", "INFO mlflow", "Creating initial MLflow database tables", "Traceback", "\x1b[",
         "UserWarning", "DeprecationWarning", "Requesting resources", "Setting up process group",
         "Experiment state snapshotting")


@pytest.mark.slow
def test_the_study_log_holds_the_stages_lines_and_no_library_chatter(shared_study, tmp_path):
    """What `python -m stages.local_ray dvc repro` printed for the shared study (as `make study`
    runs it): each stage's own lines (a training's progress, what each stage wrote, the sweep's
    reports and rung decisions), and none of the libraries' INFO chatter, tracebacks or colour
    codes; with `DDPM_VERBOSE=1` a stage prints MLflow's INFO lines again (the sample stage
    rerun with it)."""
    from conftest import STABLE_KEY

    out = (shared_study.parent / "first_repro.stdout").read_text()
    err = (shared_study.parent / "first_repro.stderr").read_text()
    for needle in NOISE:
        assert needle not in out + err, (needle, (out + err)[(out + err).find(needle) - 500:][:1500])
    for line in (f"train {STABLE_KEY}: step 40/40 (100%)", f"trained {STABLE_KEY}: 40 steps",
                 f"sampled {STABLE_KEY}: 60 images", f"evaluated {STABLE_KEY} (ok)",
                 f"sampling steps of {STABLE_KEY}",
                 "sweep linear x uniform: step 10/20", "sweep: at step 10, 1 of 2 trials go on",
                 "sweep done in"):
        assert line in out, (line, out[-3000:])
    verbose = subprocess.run(
        [sys.executable, "-m", "stages.sample", "-e", "eps_simple", "--out", str(tmp_path)],
        cwd=shared_study, env=env_for(shared_study, extra={
            "DDPM_VERBOSE": "1", "DDPM_STORAGE": str(tmp_path / "storage"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}),
        capture_output=True, text=True, timeout=600)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "INFO mlflow.system_metrics" in verbose.stderr, verbose.stderr[-3000:]


@pytest.mark.slow
def test_dvc_repro_of_a_tiny_digits_study(shared_study, tmp_path):
    """The shared tiny study (conftest.py): eps_simple trains, mu_vlb_fixed diverges on purpose;
    every stage's outputs, the tables, the metrics and MLflow agree, and DVC behaves."""
    repo = shared_study
    first_run = float((repo.parent / "first_repro_s").read_text())
    ok, unstable = "eps_simple-0", "mu_vlb_fixed-0"  # experiment-seed
    experiments = [ok, unstable]

    # outputs of every stage
    for name in experiments:
        assert (repo / "models" / name / "ema.pt").is_file()
        for figure in ("grid.png", "progressive.png"):  # a placeholder for the unstable run
            assert len(np.unique(png_pixels(repo / "samples" / name / figure))) > 1, figure
    # what a reader sees: grid.png tiles the first 6 x 6 samples, each scaled up alike, with
    # 1-pixel gaps (sample.grid_size 6, digits of 8 x 8)
    with np.load(repo / "samples" / ok / "samples.npz") as f:
        images = f["images"]
    with Image.open(repo / "samples" / ok / "grid.png") as image:
        shown = np.asarray(image)
    scale = shown.shape[0] // (6 * 9 + 1)
    assert scale > 1 and shown.shape == (55 * scale, 55 * scale)  # grey: one channel
    tiles = shown[::scale, ::scale]
    for i in range(36):
        row, col = divmod(i, 6)
        np.testing.assert_array_equal(
            tiles[1 + 9 * row:9 + 9 * row, 1 + 9 * col:9 + 9 * col], images[i, 0])
    # scores over training: the stable run's FID and NLL curves (NLL in orange), none for the
    # diverged run
    fid_figures = {n: png_pixels(repo / "plots" / "fid_over_training" / f"{n}.png")
                   for n in experiments}
    assert pixels_of_colour(fid_figures[ok], "tab:orange").sum() > 100
    assert not pixels_of_colour(fid_figures[unstable], "tab:orange").any()
    curve = pd.read_csv(repo / "plots" / "loss" / f"{ok}.csv")
    assert curve["step"].tolist() == [10, 20, 30, 40]
    # the training workers removed their scratch folders (checkpoints on their way to storage)
    assert (repo.parent / "scratch_left").read_text() == ""
    # evaluate.checkpoints all: EMA snapshots at every checkpoint step, each scored
    snapshots = sorted(p.name for p in (repo / "models" / ok / "ema_snapshots").iterdir())
    assert snapshots == ["ema_20.pt", "ema_40.pt"]
    over_training = pd.read_csv(over_training_path(repo / "metrics", ok))
    assert over_training[["step", "source"]].values.tolist() == [[20, "checkpoint"],
                                                                 [40, "checkpoint"]]
    assert (over_training["num_samples"] == 40).all() and over_training["fid"].notna().all()
    assert (repo / "models" / "classifier" / "classifier.pt").is_file()
    reference = json.loads((repo / "metrics" / "reference.json").read_text())
    assert reference["real_data"]["fid"] < reference["untrained"]["fid"]

    # the metrics and the tables agree
    metrics = {n: run_record(repo / "metrics", n) for n in experiments}
    m = metrics[ok]
    assert m["status"] == "ok" and m["train_steps"] == 40 and m["seed"] == 0
    for key in ("fid", "is_mean", "kid_mean", "nll_bpd", "nll_bpd_train"):
        assert isinstance(m[key], float) and m[f"{key}_se"] > 0, key
    # the bound on the data's 17 levels: below the ceiling of a uniform model, log2(17)
    assert m["data_levels"] == 17 and m["nll_ceiling_bpd"] == pytest.approx(4.087, abs=1e-3)
    assert 0 < m["nll_bpd"]
    per_image = pd.read_csv(repo / "metrics" / f"{ok}_nll.csv")
    assert per_image.groupby("split")["bpd"].mean().to_dict() == pytest.approx(
        {"test": m["nll_bpd"], "train": m["nll_bpd_train"]})
    best = over_training.sort_values(["fid", "step"]).iloc[0]
    assert m["best_checkpoint_step"] == best["step"]
    assert m["best_checkpoint_fid"] == pytest.approx(best["fid"])
    assert metrics[unstable]["status"] == "unstable" and "fid" not in metrics[unstable]
    table2 = pd.read_csv(repo / "results" / "table2.csv")
    fids = [v for v in table2["fid"].tolist() if v == v]
    assert fids == pytest.approx([m["fid"]])
    table1 = (repo / "results" / "table1.md").read_text()
    assert "Real data" in table1 and "Untrained" in table1 and "L_simple" in table1
    assert "Uniform over the 17 levels" in table1
    assert reference["real_data"]["num_images"] == 60 and reference["real_data"]["draws"] == 3
    findings = pd.read_csv(repo / "results" / "findings.csv")
    assert len(findings) == 8 and (repo / "results" / "findings.md").is_file()
    assert set(findings["verdict"]) <= {"reproduced", "contradicted", "inconclusive",
                                        "not measured"}
    assert (repo / "results" / "table1.tex").read_text().count("\\begin{tabular}") == 1
    loss_figure = png_pixels(repo / "results" / "loss_curves.png")
    assert pixels_of_colour(loss_figure, "tab:blue").sum() > 100  # eps_simple-0, listed first
    sweep = pd.read_csv(repo / "results" / "sweep" / "trials.csv")  # the sweep stage ran too
    assert sorted(sweep["schedule"]) == ["cosine", "linear"]
    assert len(np.unique(png_pixels(repo / "results" / "sweep_heatmap.png").reshape(-1, 3),
                         axis=0)) > 10
    assert (repo / "results" / "sweep.md").is_file()

    # MLflow: one run per experiment with the same numbers, artifacts, and the tables run
    client, runs = mlflow_runs(repo)
    by_name = {r.info.run_name: r for r in runs}
    run = by_name[ok]
    assert run.data.metrics["fid"] == pytest.approx(m["fid"])
    assert run.data.metrics["nll_bpd"] == pytest.approx(m["nll_bpd"])
    assert run.data.params["diffusion.num_timesteps"] == "20"
    assert run.data.tags["ddpm.status"] == "ok"
    assert "dvc.train.md5" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [h.step for h in history] == [10, 20, 30, 40]
    fid_curve = client.get_metric_history(run.info.run_id, "checkpoint_fid")
    assert [h.step for h in fid_curve] == [20, 40]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/grid.png" in artifacts
    assert by_name[unstable].data.tags["ddpm.status"] == "unstable"
    assert "tables" in by_name and "sweep" in by_name

    # DVC behaves as users expect
    shown = sh(["dvc", "metrics", "show"], repo).stdout  # the headline numbers
    assert "results/metrics.json" in shown and "eps_simple.fid" in shown, shown
    assert "findings.reproduced" in shown and "real_data.fid" in shown, shown
    plots = sh(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    assert (tmp_path / "plots" / "index.html").is_file(), plots.stdout
    assert "failed to load" not in plots.stdout + plots.stderr
    start = time.monotonic()
    again = sh(["dvc", "repro"], repo)
    assert time.monotonic() - start < 15
    assert "Running stage" not in again.stdout
    good = (repo / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["diffusion"]["schedule"] = "cosine"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        diff = sh(["dvc", "params", "diff"], repo).stdout
        assert "diffusion.schedule" in diff and "cosine" in diff
        status = sh(["dvc", "status"], repo).stdout
        assert "train@eps_simple-0" in status and "prepare" not in status
    finally:  # the study is shared: leave it as it was
        (repo / "params.yaml").write_text(good)
    print(f"tiny study: first dvc repro {first_run:.0f}s")


@pytest.mark.slow
def test_train_sample_and_evaluate_stream_into_their_run(shared_study):
    """Each stage of a run logged as it went: the training's curves at every log step once
    (train.log_every 10), the images sampled and the evaluations done with their rates as
    chunks came back, MLflow's system metrics through all three stages (one step each, continued
    from stage to stage); the run ended FINISHED."""
    from conftest import STABLE_KEY

    client, runs = mlflow_runs(shared_study)
    run = {r.info.run_name: r for r in runs}[STABLE_KEY]
    assert run.info.status == "FINISHED"

    def history(name):
        return sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)

    for name in ("train_loss", "lr", "images_per_s", "grad_norm"):
        assert [m.step for m in history(name)] == [10, 20, 30, 40], name
    for stage, unit, total in (("sample", "images", 60), ("evaluate", "evaluations", None)):
        done = history(f"{stage}_progress_{unit}")
        rate = history(f"{stage}_progress_{unit}_per_s")
        assert done and [m.step for m in done] == [m.step for m in rate], stage
        assert [m.value for m in done] == [m.step for m in done], stage  # units done, by step
        assert all(m.value > 0 for m in rate), stage
        assert total is None or done[-1].value == total
    cpu = [m.step for m in history("system/cpu_utilization_percentage")]
    assert len(cpu) >= 3 and len(set(cpu)) == len(cpu)
    assert history("system/system_memory_usage_megabytes")


def test_the_sampling_steps_stage_redraws_the_runs_samples_and_scores_each_sampler(
        shared_study):
    """sampling_steps@<stable run>: DDIM at 5 and 10 steps and ancestral sampling at all 20,
    from the run's model and per-image seeds. The ancestral setting redraws the sample stage's
    images, so its scores are the evaluate stage's; each DDIM count is on the run's MLflow run
    at step = its number of steps; tabulate's table and chart hold every setting."""
    from conftest import STABLE_KEY
    from pipeline.artifacts.records import load_sampling_steps, sampling_steps_path

    steps = load_sampling_steps(sampling_steps_path(shared_study / "metrics", STABLE_KEY),
                                STABLE_KEY)
    assert list(zip(steps["sampler"], steps["steps"])) == [("ddim", 5), ("ddim", 10),
                                                           ("ancestral", 20)]
    evaluated = json.loads((shared_study / "metrics" / f"{STABLE_KEY}.json").read_text())
    ancestral = steps.iloc[-1]
    for score in ("fid", "is_mean", "kid_mean", "precision", "recall"):
        assert ancestral[score] == pytest.approx(evaluated[score], rel=1e-9), score
        assert ancestral[f"{score}_se"] == pytest.approx(evaluated[f"{score}_se"], rel=1e-6)
    assert steps["fid"].nunique() == 3 and (steps["precision"].between(0, 1)).all()
    client, runs = mlflow_runs(shared_study)
    run = {r.info.run_name: r for r in runs}[STABLE_KEY]
    history = client.get_metric_history(run.info.run_id, "ddim_fid")
    assert sorted((m.step, m.value) for m in history) == list(zip([5, 10], steps["fid"][:2]))
    assert run.info.status == "FINISHED"
    table = (shared_study / "results" / "sampling_steps.md").read_text()
    assert table.count(f"| {STABLE_KEY}") == 3
    chart = (shared_study / "plots" / "sampling_steps.csv").read_text().splitlines()
    assert chart[1:] == [f"{STABLE_KEY} {s},{n},{float(f)!r}"
                         for s, n, f in zip(steps["sampler"], steps["steps"], steps["fid"])]


@pytest.mark.slow
def test_cifar10_study_from_a_local_archive(tmp_path):

    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar10_archive(archive, n_train=200, n_test=50, seed=0)

    def edit(params):
        tiny(params, experiments=("eps_simple",))
        params["study"]["name"] = "ddpm-cifar10-tiny"
        params["data"].update(dataset="cifar10", cifar10_archive=str(archive))
        params["model"].update(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1,
                               attn_resolutions=[8])
        params["train"].update(steps=20, checkpoint_every=10)
        params["sample"].update(num_samples=40, batch_size=40)
        params["evaluate"].update(feature_extractor="helpers_metrics:TinyConvExtractor",
                                  nll_num_images=10)
        params["sweep"].update(schedules=["linear"])  # one trial: the sweep runs on CIFAR10 too

    repo = make_study_repo(tmp_path, edit)
    # under one Ray instance, as `make study` runs it (the plain `dvc repro`, each Ray stage
    # starting its own, is test_dvc_repro_of_a_tiny_digits_study's)
    sh([sys.executable, "-m", "stages.local_ray", "dvc", "repro"], repo)
    train = np.load(repo / "data" / "prepared" / "cifar10" / "train.npz")
    assert train["images"].shape == (200, 3, 32, 32)
    m = run_record(repo / "metrics", "eps_simple-0")
    assert m["status"] == "ok" and m["dataset"] == "cifar10" and m["data_levels"] == 256
    assert all(isinstance(m[k], float) for k in ("fid", "is_mean", "nll_bpd"))
    table1 = (repo / "results" / "table1.md").read_text()
    assert "Paper" in table1 and "3.17" in table1  # the published numbers beside ours


@pytest.mark.slow
def test_evaluate_reads_the_reference_statistics_and_extracts_no_train_features(
        shared_study, monkeypatch, tmp_path):
    """The shared study's evaluate@eps_simple-0 again, in this process (its chunks computed here,
    `run_here`, the extractor's calls counted): the feature extractor sees the 60 samples and
    the 2 x 40 checkpoint samples, no real image; the train split's side comes from
    data/reference_stats/train.npz, whose arrays are the reference chunks' merged sums (those the
    evaluate stage extracted and merged for itself before); and the scores are those `dvc repro`
    wrote, bit for bit."""
    from pipeline.cluster import ray_data
    from pipeline.measure.chunks import run_here
    from pipeline.core.params import load_params
    from pipeline.jobs.evaluate_job import Apparatus, evaluate_run, evaluation_inputs
    from pipeline.jobs.reference_stats_job import reference_statistics, reference_stats_job
    from pipeline.measure.digits_classifier import classifier_path
    from pipeline.measure.extractors import FeatureNetwork
    from pipeline.measure.reference_stats_file import load_reference_stats
    from pipeline.measure.stats import FeatureMoments

    repo = shared_study
    params = load_params(repo / "params.yaml")
    exp = params.experiment("eps_simple", 0)
    apparatus = Apparatus.load(exp, repo / "data" / "prepared",
                               classifier_path(repo / "models"))
    path = repo / "data" / "reference_stats" / "train.npz"
    stats = load_reference_stats(path, apparatus.reference_provenance())
    train = apparatus.train.images
    assert stats.provenance["num_images"] == len(train) == 1437
    assert stats.provenance["extractor"] == "digits-classifier"

    seen: list[np.ndarray] = []
    original = FeatureNetwork.__call__

    def counting(self, images):
        seen.append(np.asarray(images))
        return original(self, images)

    monkeypatch.setattr(FeatureNetwork, "__call__", counting)
    monkeypatch.setattr(ray_data, "run_chunks", lambda job, storage, **_: run_here(job))
    job, chunks = reference_stats_job(params.base_experiment("reference_stats"), apparatus)
    again = reference_statistics(chunks, run_here(job), {})
    assert [len(b) for b in seen] == [len(train)]  # the stage's one pass over the train split
    for name in ("feature_sum", "outer_sum"):
        assert getattr(again.moments, name).tobytes() == getattr(stats.moments, name).tobytes()
    assert again.kid_features.tobytes() == stats.kid_features.tobytes()
    whole = FeatureMoments.of(original(FeatureNetwork("digits-classifier",
                                                      apparatus.weights), train)[0])
    np.testing.assert_allclose(stats.moments.outer_sum, whole.outer_sum, rtol=1e-9)

    seen.clear()
    inputs = evaluation_inputs(exp, repo / "data" / "prepared", repo / "models",
                               repo / "samples", path)
    result = evaluate_run(inputs, tmp_path / "storage")
    assert sorted(len(b) for b in seen) == [40, 40, 60]  # checkpoints' samples, the samples
    for batch in seen:
        assert not any(np.array_equal(batch[0], image) for image in train)  # no real image
    wrote = json.loads((repo / "metrics" / "eps_simple-0.json").read_text())
    assert {k: result.record[k] for k in wrote} == wrote


@pytest.mark.slow
@pytest.mark.parametrize("change, needle", [({"num_images": 1000}, "N 1000, this study's is 1437"),
                                            ({"extractor": "inception-v3-compat"},
                                             "extractor 'inception-v3-compat', this study's is "
                                             "'digits-classifier'")])
def test_a_reference_file_made_for_another_study_is_refused_in_one_line(shared_study, tmp_path,
                                                                        change, needle):
    """data/reference_stats/train.npz of another N or another extractor (its digest rewritten to
    match: a sound file of another study) stops evaluate and the sweep before Ray, in one line
    naming the file, what differs and `dvc repro reference_stats`; nothing is written."""
    from pipeline.measure.reference_stats_file import (ReferenceStats, load_reference_stats,
                                                  save_reference_stats)

    repo = shared_study
    stats = load_reference_stats(repo / "data" / "reference_stats" / "train.npz")
    other = tmp_path / "stats" / "train.npz"
    save_reference_stats(other, ReferenceStats(stats.moments, stats.kid_features,
                                               {**stats.provenance, **change}))
    for name, args in (("evaluate", ["-e", "eps_simple", "--figures", tmp_path / "figures"]),
                       ("sweep", [])):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", f"stages.{name}", *map(str, args),
                               "--stats", str(other.parent), "--out", str(tmp_path / "out")],
                              cwd=repo, env=env_for(repo), capture_output=True, text=True,
                              timeout=120)
        assert time.monotonic() - start < 60
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: {other}: made for another study's reference side")
        assert needle in lines[-1] and "`dvc repro reference_stats`" in lines[-1]
        assert "Ray" not in proc.stdout
    assert not (tmp_path / "out").exists()


def test_stage_errors_are_short_and_name_the_problem(tmp_path):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["diffusion"]["schedule"] = "cosin"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    for stage in ("prepare", "classifier", "reference_stats", "train", "sample", "evaluate",
                  "sampling_steps", "reference", "tabulate"):
        args = [sys.executable, "-m", f"stages.{stage}", "--params", str(bad)]
        if stage in ("train", "sample", "evaluate", "sampling_steps"):
            args += ["--experiment", "eps_simple"]
        start = time.monotonic()
        proc = subprocess.run(args, cwd=tmp_path, env=env_for(PROJECT), capture_output=True,
                              text=True, timeout=60)
        assert time.monotonic() - start < 15
        assert proc.returncode == 2, (stage, proc.stderr)
        assert "diffusion.schedule" in proc.stderr and "cosine" in proc.stderr, stage
        assert "Traceback" not in proc.stderr, stage


def test_sigterm_stops_a_stage_as_an_interrupt_and_its_cleanup_runs(capsys):
    """SIGTERM reaches a stage (before Ray installs its own handler) as an interrupt: the
    stage's `finally` and `with` blocks run (its MLflow run is marked KILLED), it exits 143
    with one line, and the process's handler is put back."""
    import signal

    from stages import _common

    cleaned = []

    def body(params):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            return 0
        except KeyboardInterrupt:
            cleaned.append("interrupted")
            raise
        finally:
            cleaned.append("finally")

    before = signal.getsignal(signal.SIGTERM)
    start = time.monotonic()
    assert _common.run(body, PROJECT / "params.yaml") == 128 + signal.SIGTERM
    assert time.monotonic() - start < 5
    assert cleaned == ["interrupted", "finally"]
    assert "error: stopped by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


def test_unknown_experiment_lists_the_defined_ones(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.sample", "--experiment", "eps_smple",
                           "--params", str(PROJECT / "params.yaml")], cwd=tmp_path,
                          env=env_for(PROJECT), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "eps_smple" in proc.stderr and "eps_simple" in proc.stderr


@pytest.mark.parametrize("stage", ["sample", "sampling_steps"])
def test_sampling_before_train_names_the_command(tmp_path, stage):
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--experiment",
                           "eps_simple", "--params", str(PROJECT / "params.yaml"), "--models",
                           str(tmp_path / "models")], cwd=tmp_path, env=env_for(PROJECT),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "dvc repro train@eps_simple-0" in proc.stderr


def test_a_seed_the_study_does_not_list_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--experiment", "eps_simple",
                           "--seed", "7", "--params", str(PROJECT / "params.yaml")],
                          cwd=tmp_path, env=env_for(PROJECT), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "seed 7 is not one of the study's seeds [0]" in proc.stderr


def test_local_ray_runs_the_command_on_one_instance_and_stops_it(tmp_path):
    """`python -m stages.local_ray COMMAND` starts one Ray instance, hands COMMAND its address
    (a stage joins it: "connected to Ray cluster"), passes on the exit code, and stops it."""
    script = ("import ray, sys; from pipeline.cluster import connection; "
              "print(connection.connect()); print(int(ray.cluster_resources()['CPU'])); "
              "connection.shutdown(); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-m", "stages.local_ray", sys.executable, "-c",
                           script], cwd=tmp_path, env=env_for(PROJECT), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    address = re.match(r"started a local Ray instance at (127\.0\.0\.1:\d+) for: ", lines[0])[1]

    assert lines[1] == f"connected to Ray cluster at {address}" and int(lines[2]) >= 1
    port = address.rsplit(":", 1)[1]
    leftovers = subprocess.run(["pgrep", "-f", f"gcs_server_port={port}"],
                               capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""  # the instance is stopped with the command
    usage = subprocess.run([sys.executable, "-m", "stages.local_ray"], cwd=tmp_path,
                           env=env_for(PROJECT), capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "give the command to run" in usage.stderr
    missing = subprocess.run([sys.executable, "-m", "stages.local_ray", "no-such-command"],
                             cwd=tmp_path, env=env_for(PROJECT), capture_output=True, text=True,
                             timeout=60)  # refused before Ray starts
    assert missing.returncode == 2 and "command not found: no-such-command" in missing.stderr
    assert "Traceback" not in missing.stderr and missing.stdout == ""

    # Ctrl-C (SIGINT to the foreground group): the command stops, then the instance
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "stages.local_ray", sys.executable, "-c",
                             "import time; print('running', flush=True); time.sleep(120)"],
                            cwd=tmp_path, env=env_for(PROJECT), stdout=subprocess.PIPE,
                            text=True, start_new_session=True,  # as from a terminal, also
                            # where this test runs as a background job (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()
        port = re.search(r"127\.0\.0\.1:(\d+)", first)[1]
        assert proc.stdout.readline().strip() == "running"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    leftovers = subprocess.run(["pgrep", "-f", f"gcs_server_port={port}"],
                               capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""



ALL_STAGES = sorted(p.stem for p in (PROJECT / "stages").glob("*.py")
                    if not p.stem.startswith("_") and p.stem != "local_ray")  # new ones too


@pytest.mark.parametrize("address, message", [
    ("headnode", "is not an address of a Ray cluster"),
    ("http://headnode:", "is not an address of a Ray cluster"),
    ("127.0.0.1:{closed}", "no Ray cluster answers at RAY_ADDRESS=127.0.0.1:{closed}"),
    ("ray://127.0.0.1:{closed}", "no Ray cluster answers at RAY_ADDRESS=ray://127.0.0.1:"),
])
def test_a_ray_address_nothing_answers_at_is_refused_before_ray_starts(monkeypatch, address,
                                                                       message):
    import socket

    import ray

    from pipeline.cluster.connection import ClusterError, connect

    with socket.socket() as sock:  # a port nothing listens at once closed
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", address.format(closed=closed))
    with pytest.raises(ClusterError, match=re.escape(message.format(closed=closed))):
        connect()
    assert not ray.is_initialized()


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_every_stage_documents_its_arguments(stage):
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"],
                          env=env_for(PROJECT), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--params" in proc.stdout
