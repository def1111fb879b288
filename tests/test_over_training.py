"""Scores over training: choosing the best-FID checkpoint, the one-row table of a study without
checkpoints, the csv DVC plots and the figure."""

import math

import numpy as np
import pandas as pd

from helpers import pixels_of_colour, png_pixels
from pipeline.artifacts.figures import save_scores_over_training
from pipeline.artifacts.records import over_training_path, save_over_training
from pipeline.jobs.over_training import COLUMNS, best_by_fid, final_scores


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
    path = over_training_path(tmp_path, "e-0")
    assert path == tmp_path / "e-0_over_training.csv"
    save_over_training(path, frame)
    again = pd.read_csv(path)
    assert list(again.columns) == list(COLUMNS) and again["step"].tolist() == [450]


def test_figure_shows_both_scores_and_says_when_there_are_none(tmp_path):
    """FID (blue) and NLL (orange) curves with the best step marked (green); a diverged run's
    figure has the same size and neither curve nor marker."""
    save_scores_over_training([200, 400, 450], [9.0, 4.0, 5.0], [2.0, 1.9, 1.85],
                              tmp_path / "a.png", "eps_simple", best_step=400, note="quick FID")
    save_scores_over_training([], [], [], tmp_path / "b.png", "unstable")
    scored, empty = png_pixels(tmp_path / "a.png"), png_pixels(tmp_path / "b.png")
    assert scored.shape == empty.shape == (400, 700, 3)
    assert pixels_of_colour(scored, "tab:orange").sum() > 500  # the NLL curve and its axis
    assert pixels_of_colour(scored, "tab:green").sum() > 10  # the best-FID marker
    assert not pixels_of_colour(empty, "tab:orange").any()
    assert not pixels_of_colour(empty, "tab:green").any()
    # blue in the empty figure is the FID axis alone; the scored one adds the curve
    blue = [pixels_of_colour(pixels, "tab:blue").sum() for pixels in (scored, empty)]
    assert blue[0] > 3 * blue[1]


def test_figure_follows_the_scores_and_marks_the_best_step(tmp_path):
    """FID falling then rising vs rising then falling, over the same range (so the same FID
    axis) and with the same NLL: where the two FID curves differ in the figure's left half, the
    first is drawn high and the second low; the best-FID marker sits at the best step (right of
    the centre for step 400, left of it for step 200)."""
    steps, nll = [200, 400, 450], [1.5, 1.0, 2.0]
    save_scores_over_training(steps, [9.0, 4.0, 5.0], nll, tmp_path / "falls.png", "e",
                              best_step=400)
    save_scores_over_training(steps, [4.0, 9.0, 5.0], nll, tmp_path / "rises.png", "e",
                              best_step=200)
    falls, rises = png_pixels(tmp_path / "falls.png"), png_pixels(tmp_path / "rises.png")
    height, width = falls.shape[:2]
    blue_falls = pixels_of_colour(falls, "tab:blue")[:, : width // 2]
    blue_rises = pixels_of_colour(rises, "tab:blue")[:, : width // 2]
    only_falls = np.nonzero(blue_falls & ~blue_rises)[0]  # rows
    only_rises = np.nonzero(blue_rises & ~blue_falls)[0]
    assert only_falls.size > 100 and only_rises.size > 100
    assert only_falls.mean() + height / 4 < only_rises.mean()  # image rows count downwards

    def marker_column(pixels):
        return np.nonzero(pixels_of_colour(pixels, "tab:green"))[1].mean()

    assert marker_column(falls) > width / 2 > marker_column(rises)
