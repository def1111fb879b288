"""The shared per-worker training function, run in-process (no Ray): resume, divergence, EMA."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.training.loop import (STATE_FILE, CheckpointError, LocalSession,
                                       load_training_state, lr_factor, make_optimizer, train_worker)
from pipeline.core.params import parse_params
from pipeline.data.datasets import prepare_dataset, prepared_path
from pipeline.model.ema import ema_decay_at, ema_initial_weight, make_ema


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    params = parse_params({})
    prepare_dataset(params.data, root, seed=0)
    return prepared_path(root, "digits", "train")


def tiny_experiment(**train):
    raw = {
        "diffusion": {"num_timesteps": 50},
        "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
                  "dropout": 0.1},
        "train": {"steps": 12, "batch_size": 16, "log_every": 3, "checkpoint_every": 6,
                  "warmup_steps": 2, "lr": 1e-3, **train},
        "experiments": {"eps_simple": {}, "mu_vlb": {"mean_type": "mu", "loss": "vlb"}},
    }
    return parse_params(raw)


class CrashingSession(LocalSession):
    """A LocalSession whose process dies (KeyboardInterrupt) right after its n-th report."""

    def __init__(self, root, stop_after_reports: int):
        super().__init__(root)
        self.stop_after = stop_after_reports

    def report(self, metrics, checkpoint_dir=None):
        super().report(metrics, checkpoint_dir)
        if len(self.reports) >= self.stop_after:
            raise KeyboardInterrupt("a simulated crash")


def run(exp, data, root, stop_after_reports=None):
    session = (LocalSession(root) if stop_after_reports is None
               else CrashingSession(root, stop_after_reports))
    train_worker(exp, data, session, checkpoint_root=root)
    return session


def final_state(session):
    return load_training_state(session.latest_checkpoint() / STATE_FILE)


@pytest.mark.parametrize("name, precision", [("eps_simple", "fp32"), ("mu_vlb", "fp32"),
                                             ("eps_simple", "bf16")])
def test_resume_after_a_crash_matches_an_uninterrupted_run(digits, tmp_path, name, precision):
    exp = tiny_experiment(precision=precision).experiment(name)
    full = final_state(run(exp, digits, tmp_path / "full"))
    # crash right after the report at step 9 (the last checkpoint is at step 6)
    with pytest.raises(KeyboardInterrupt):
        run(exp, digits, tmp_path / "crash", stop_after_reports=3)
    crashed = LocalSession(tmp_path / "crash")
    assert load_training_state(crashed.latest_checkpoint() / STATE_FILE)["step"] == 6
    resumed = final_state(run(exp, digits, tmp_path / "crash"))
    assert resumed["step"] == full["step"] == 12
    steps = [s for s, _ in resumed["loss_history"]]
    assert steps == [3, 6, 9, 12]  # continuous, no step logged twice
    assert resumed["loss_history"] == full["loss_history"]
    for key in ("model", "ema"):
        for k, v in full[key].items():
            assert torch.equal(v, resumed[key][k]), (key, k)
    assert resumed["optimizer"]["state"][0]["step"] == full["optimizer"]["state"][0]["step"]


def test_same_seed_is_bitwise_reproducible_and_another_seed_is_not(digits, tmp_path):
    params = tiny_experiment()
    exp = params.experiment("eps_simple")
    a = final_state(run(exp, digits, tmp_path / "a"))
    b = final_state(run(exp, digits, tmp_path / "b"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    other = dataclasses.replace(exp, seed=1)
    c = final_state(run(other, digits, tmp_path / "c"))
    assert not all(torch.equal(a["ema"][k], c["ema"][k]) for k in a["ema"])


def test_divergence_is_recorded_as_unstable(digits, tmp_path):
    exp = tiny_experiment(lr=1e6, grad_clip=1e12, steps=30).experiment("mu_vlb")
    session = run(exp, digits, tmp_path)
    state = final_state(session)
    assert state["status"] == "unstable"
    assert state["step"] < 30  # stopped early
    assert session.reports[-1]["status"] == "unstable"
    assert not math.isfinite(state["loss_history"][-1][1])
    # resuming an unstable run does not train on
    again = run(exp, digits, tmp_path)
    assert again.reports == [{"step": state["step"], "status": "unstable"}]


def test_ema_tracks_the_weights():
    model = torch.nn.Linear(2, 1)
    ema = make_ema(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 2.0))


def _ema_weight_on_first(ema_updates, decay, warmup, resume_after=None):
    """The EMA of a weight that is 1 at the first update and 0 afterwards, i.e. the share of
    the first update's parameters, optionally saved and reloaded into a fresh EMA midway."""
    model = torch.nn.Linear(1, 1, bias=False).double()
    ema = make_ema(model, decay, warmup)
    for update in range(ema_updates):
        if update == resume_after:
            state = ema.state_dict()
            ema = make_ema(model, decay, warmup)
            ema.load_state_dict(state)
        with torch.no_grad():
            model.weight.fill_(1.0 if update == 0 else 0.0)
        ema.update_parameters(model)
    return float(ema.module.weight.detach())


@pytest.mark.parametrize("updates", [1, 2, 10, 400, 3000])
def test_ema_weight_on_the_initial_parameters_has_its_closed_form(updates):
    """With the warm-up, decay_n = min(d, (1 + n) / (10 + n)) at the update after n earlier
    ones; while it stays below d the product telescopes to 10! (k - 1)! ... : after k updates
    the first one's share is prod_{n=1}^{k-1} (1 + n) / (10 + n) = 10! k! / (k + 9)!. Without
    the warm-up it is d^(k-1): 0.995^399 = 13.5 % after 400 steps."""
    decay = 0.995
    closed = math.factorial(10) * math.factorial(updates) / math.factorial(updates + 9)
    switch = 1790  # (1 + n) / (10 + n) reaches 0.995 at n = 1790
    if updates > switch:
        closed = (math.factorial(10) * math.factorial(switch) / math.factorial(switch + 9)
                  * decay ** (updates - switch))
    assert ema_initial_weight(updates, decay) == pytest.approx(closed, rel=1e-9)
    assert _ema_weight_on_first(updates, decay, warmup=True) == pytest.approx(closed, rel=1e-6,
                                                                             abs=1e-300)
    assert _ema_weight_on_first(updates, decay, warmup=False) == \
        pytest.approx(decay ** (updates - 1), rel=1e-9)
    if updates == 400:
        assert ema_initial_weight(400, decay, warmup=False) == pytest.approx(0.1353, abs=1e-4)
        assert closed < 1e-15


def test_ema_warmup_carries_on_across_a_resume():
    for resume_after in (1, 5, 37):
        assert _ema_weight_on_first(60, 0.995, True, resume_after) == \
            _ema_weight_on_first(60, 0.995, True)
    assert ema_decay_at(0, 0.995) == pytest.approx(0.1)
    assert ema_decay_at(10_000, 0.995) == 0.995


def test_learning_rate_schedule():
    """Linear warm-up over warmup_steps; then constant, or a cosine from lr down to
    lr_final * lr at the last step (half way at the middle of the decay)."""
    steps, warmup = 100, 10
    assert [lr_factor(s, steps, warmup) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, steps, warmup, "cosine", final=0.1) for s in range(steps)]
    assert cosine[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert cosine[-1] == pytest.approx(0.1)
    assert cosine[54] == pytest.approx(0.1 + 0.9 * 0.5)  # (55 - 10) / 90 of the decay
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:]))
    # the optimizer follows it, and a resumed scheduler carries on where it stopped
    exp = tiny_experiment(lr=1e-3, steps=20, warmup_steps=4, lr_schedule="cosine",
                          lr_final=0.0).experiment("eps_simple")
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, exp)
    seen = []
    for step in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if step == 7:
            state = scheduler.state_dict()
            optimizer, scheduler = make_optimizer(model, exp)
            scheduler.load_state_dict(state)
            optimizer.param_groups[0]["lr"] = scheduler.get_last_lr()[0]
    assert seen == pytest.approx([1e-3 * lr_factor(s, 20, 4, "cosine") for s in range(20)])
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)


def test_corrupt_checkpoint_is_a_clear_error(digits, tmp_path):
    exp = tiny_experiment().experiment("eps_simple")
    session = run(exp, digits, tmp_path)
    path = session.latest_checkpoint() / STATE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)) as info:
        load_training_state(path)
    # the file and the reason are fields, kept when the error crosses from a Ray worker
    import pickle

    for error in (info.value, pickle.loads(pickle.dumps(info.value))):
        assert (error.path, error.reason) == (str(path), f"{path}: corrupt or truncated checkpoint")
        assert str(error) == str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_training_state(tmp_path / "missing" / STATE_FILE)


def test_loss_decreases_on_digits(digits, tmp_path):
    exp = tiny_experiment(steps=60, log_every=10, checkpoint_every=60,
                          batch_size=64).experiment("eps_simple")
    losses = [v for _, v in final_state(run(exp, digits, tmp_path))["loss_history"]]
    assert np.mean(losses[-2:]) < 0.7 * losses[0]


def test_ema_snapshots_are_kept_at_every_checkpoint_step(digits, tmp_path, capsys):
    from pipeline.model.ema import ema_snapshot_steps, ema_weights

    exp = tiny_experiment().experiment("eps_simple")
    session = LocalSession(tmp_path / "ckpt")
    train_worker(exp, digits, session, checkpoint_root=tmp_path / "ckpt",
                 ema_snapshot_dir=tmp_path / "ema")
    snapshots = ema_snapshot_steps(tmp_path / "ema")
    assert list(snapshots) == [6, 12]  # checkpoint_every 6, 12 steps
    final = ema_weights(final_state(session)["ema"])
    last = torch.load(snapshots[12], weights_only=True)
    assert last.keys() == final.keys()
    assert all(torch.equal(last[k], final[k]) for k in final)
    first = torch.load(snapshots[6], weights_only=True)
    assert not all(torch.equal(first[k], final[k]) for k in final)
    # rank 0 prints a progress line per log step, with the time left
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("train eps_simple")]
    assert len(lines) == 4 and "step 12/12 (100%)" in lines[-1] and "ETA 0s" in lines[-1]
    assert "images/s" in lines[0] and "loss" in lines[0]


@pytest.mark.slow
def test_compiled_training_follows_the_eager_run(digits, tmp_path):
    """train.compile: the same losses and weights as eager training (no dropout: TorchInductor
    draws dropout masks from its own generator), and checkpoints of the plain module."""
    def experiment(compile_):
        return parse_params({
            "diffusion": {"num_timesteps": 50},
            "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
                      "dropout": 0.0},
            "train": {"steps": 6, "batch_size": 16, "log_every": 2, "checkpoint_every": 6,
                      "warmup_steps": 2, "lr": 1e-3, "compile": compile_},
            "experiments": {"eps_simple": {}},
        }).experiment("eps_simple")

    eager = final_state(run(experiment(False), digits, tmp_path / "eager"))
    compiled = final_state(run(experiment(True), digits, tmp_path / "compiled"))
    assert [s for s, _ in compiled["loss_history"]] == [2, 4, 6]
    np.testing.assert_allclose([v for _, v in compiled["loss_history"]],
                               [v for _, v in eager["loss_history"]], rtol=1e-4)
    assert compiled["model"].keys() == eager["model"].keys()  # no "_orig_mod." prefix
    for key, value in eager["model"].items():  # Adam's normalised steps amplify float noise
        torch.testing.assert_close(compiled["model"][key], value, rtol=1e-3, atol=1e-4)


def test_bf16_training_follows_the_fp32_run_with_float32_weights(digits, tmp_path):
    """train.precision bf16 (mixed precision): the U-Net's forward and backward in bfloat16,
    the weights, Adam, EMA and checkpoints in float32; the losses track the fp32 run's."""
    params = tiny_experiment()
    exact = final_state(run(params.experiment("mu_vlb"), digits, tmp_path / "fp32"))
    mixed_exp = tiny_experiment(precision="bf16").experiment("mu_vlb")
    assert mixed_exp.train.precision == "bf16"
    mixed = final_state(run(mixed_exp, digits, tmp_path / "bf16"))
    exact_losses = [v for _, v in exact["loss_history"]]
    mixed_losses = [v for _, v in mixed["loss_history"]]
    assert mixed_losses != exact_losses  # bfloat16 arithmetic really ran
    np.testing.assert_allclose(mixed_losses, exact_losses, rtol=0.01)  # measured: ~1e-4
    assert mixed["model"].keys() == exact["model"].keys()  # the plain U-Net, not the wrapper
    for key in ("model", "ema"):
        assert all(v.dtype == torch.float32 for v in mixed[key].values()
                   if v.is_floating_point()), key
    moments = mixed["optimizer"]["state"][0]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.float32


def test_reports_carry_the_gradient_norm_averaged_over_each_window(digits, tmp_path):
    """The norm `clip_grad_norm_` measures before clipping, a mean over the log window: with a
    clip far below it, the reported norm is still the unclipped one (well above the clip)."""
    exp = tiny_experiment(grad_clip=1e-3).experiment("eps_simple")
    reports = [r for r in run(exp, digits, tmp_path).reports if "loss" in r]
    assert [r["step"] for r in reports] == [3, 6, 9, 12]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 1e-2 for r in reports)


class _Stream:
    def __init__(self):
        self.logged = []

    def log(self, step, metrics):
        self.logged.append((step, dict(metrics)))
        return True


def test_stream_reports_logs_rank_zero_once_under_the_mlflow_names():
    """The Ray Train callback (run on the controller) logs one report per step, rank 0's, its
    keys renamed as the train stage names them; a report without a loss (a resumed run's final
    state) is not logged. It travels to the controller pickled."""
    from ray import cloudpickle

    from pipeline.cluster.ray_train import stream_reports
    from pipeline.jobs.train_job import STREAMED

    stream = _Stream()
    callback = cloudpickle.loads(cloudpickle.dumps(stream_reports(stream, STREAMED)))
    rank0 = {"step": 10, "loss": 0.5, "lr": 2e-4, "images_per_s": 80.0, "grad_norm": 1.5,
             "status": "ok"}
    callback.after_report(None, [rank0, {**rank0, "images_per_s": 79.0}], None)
    callback.after_report(None, [{"step": 40, "status": "ok"}], None)
    assert callback.stream.logged == [(10, {"train_loss": 0.5, "lr": 2e-4, "images_per_s": 80.0,
                                            "grad_norm": 1.5})]
