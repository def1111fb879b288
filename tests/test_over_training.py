"""Scores over training: choosing the best-FID checkpoint, the one-row table of a study without
checkpoints, the csv DVC plots and the figure."""

import math

import pandas as pd

from pipeline.figures import save_scores_over_training
from pipeline.over_training import COLUMNS, best_by_fid, final_scores, write_scores


def scores(rows):
    return pd.DataFrame([{**dict.fromkeys(COLUMNS), **r} for r in rows], columns=list(COLUMNS))


def test_best_by_fid_takes_the_lowest_finite_fid_and_the_earliest_step_on_ties():
    frame = scores([{"step": 200, "fid": 9.0, "nll_bpd": 2.0},
                    {"step": 400, "fid": 4.0, "nll_bpd": 1.9},
                    {"step": 600, "fid": math.nan, "nll_bpd": 1.8},
                    {"step": 800, "fid": 4.0, "nll_bpd": 1.7}])
    assert best_by_fid(frame) == {"step": 400, "fid": 4.0, "nll_bpd": 1.9}
    assert best_by_fid(scores([{"step": 1, "fid": math.nan, "nll_bpd": 1.0}])) is None


def test_without_checkpoints_the_table_is_the_final_model(tmp_path):
    record = {"train_steps": 450, "fid": 3.5, "is_mean": 9.1, "nll_bpd": 1.2,
              "nll_bpd_se": 0.01, "num_samples": 400, "nll_method": "exact"}
    frame = final_scores(record)
    assert frame.to_dict("records") == [{
        "step": 450, "fid": 3.5, "is_mean": 9.1, "nll_bpd": 1.2, "nll_bpd_se": 0.01,
        "num_samples": 400, "nll_method": "exact", "source": "final"}]
    assert final_scores({"fid": None}).empty  # an unstable model has no row
    write_scores(frame, tmp_path / "e_checkpoints.csv")
    again = pd.read_csv(tmp_path / "e_checkpoints.csv")
    assert list(again.columns) == list(COLUMNS) and again["step"].tolist() == [450]


def test_figure_is_written_with_and_without_scores(tmp_path):
    save_scores_over_training([200, 400, 450], [9.0, 4.0, 5.0], [2.0, 1.9, 1.85],
                              tmp_path / "a.png", "eps_simple", best_step=400, note="quick FID")
    save_scores_over_training([], [], [], tmp_path / "b.png", "unstable")
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
