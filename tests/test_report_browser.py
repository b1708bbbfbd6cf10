"""The report as a browser shows it: headless Chromium renders the HTML and the screenshot is not blank.

Chromium comes from Debian (`apt-get install -y chromium`); the test skips, saying so, only when no
Chromium binary is installed.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings

import matplotlib.image as mpimg
import numpy as np
import pytest

from bpkit.callbacks import _sink
from bpkit.report import write_report
from tests.test_report import _fake_trainer

pytestmark = pytest.mark.slow

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _screenshot(html, png, height=2400):
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1200,{height}", f"--screenshot={png}", html.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return mpimg.imread(str(png))[..., :3]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary: install it with `apt-get install -y chromium`")
def test_report_renders_in_headless_chromium(tmp_path):
    tr = _fake_trainer(tmp_path)
    rng = np.random.default_rng(0)
    edges = np.concatenate([[-np.inf], np.arange(-12, 4.5, 0.5), [np.inf]])
    for step in range(5, 105, 5):
        depth = {f"grad/norm/blocks.{i}.weight": 10.0 ** (i - 8) * (1 + 0.1 * rng.random()) for i in range(8)}
        _sink.log_scalars(tr, {**depth, "train/loss": 2.3 / (1 + 0.01 * step)}, step)
        _sink.log_histograms(tr, {"grad/hist/blocks.0.weight": (rng.integers(0, 40, 34), edges)}, step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from bpkit import Alert

        _sink.log_alert(tr, Alert("vanishing", 10, "blocks.0.weight, blocks.1.weight", 1e-8, 1e-3, "vanishing"))
    html = write_report(tmp_path)
    img = _screenshot(html, tmp_path / "shot.png")
    ink = (img.mean(axis=2) < 0.9).mean()  # share of pixels that are not (near) white background
    assert img.std() > 0.05 and ink > 0.05, (img.std(), ink)
    # the figures were decoded and painted: viridis greens/purples of the heatmap are on screen
    colorful = ((img.max(axis=2) - img.min(axis=2)) > 0.3).mean()
    assert colorful > 0.01, colorful

    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    empty = _screenshot(blank, tmp_path / "blank.png", height=600)
    assert empty.std() < 0.01  # the measure tells a blank page from the report


def _real(root, depth, activation, steps):
    import torch

    from bpkit.callbacks import ActivationMonitor, GradientMonitor, RunRecord
    from bpkit.data import DigitsDataModule
    from bpkit.models import MLP
    from tests.test_report import _fit

    torch.manual_seed(0)
    _fit(root, MLP(64, 10, depth=depth, width=48, activation=activation), DigitsDataModule(batch_size=64),
         [GradientMonitor(histogram_every_n_steps=10), ActivationMonitor(), RunRecord()], steps=steps, val_every=20)
    return root


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary: install it with `apt-get install -y chromium`")
def test_screenshots_of_a_healthy_a_vanishing_a_diverging_run_and_a_sweep(tmp_path):
    """The screenshots in docs/img: written there when BPKIT_UPDATE_SCREENSHOTS=1, else into tmp_path; each one
    must show a painted page (not blank) with the report's figures."""
    import os
    import shutil as sh
    from pathlib import Path

    from tests.test_report_broken_runs import _job, write_diverging

    healthy = _real(tmp_path / "healthy", 3, "relu", 60)
    vanishing = _real(tmp_path / "vanishing", 20, "sigmoid", 60)
    diverging = write_diverging(tmp_path / "diverging", steps=300)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    shared = ["recipe=vanishing_depth", "trainer.max_steps=40"]
    for name, act, acc, l0, l1 in (("0", "sigmoid", 0.1, 2.31, 2.30), ("1", "relu", 0.9, 2.3, 0.3),
                                   ("2", "tanh", 0.7, 2.3, 0.8)):
        _job(sweep, name, shared + [f"model.activation={act}", "model.depth=16"], acc, l0, l1)
    out = Path(__file__).resolve().parents[1] / "docs" / "img" if os.environ.get("BPKIT_UPDATE_SCREENSHOTS") \
        else tmp_path / "img"
    out.mkdir(parents=True, exist_ok=True)
    expect = {"healthy": "No problems found", "vanishing": "Vanishing gradients",
              "diverging": "after the NaN at step 22", "sweep": "&#9733; best"}
    for name, root in (("healthy", healthy), ("vanishing", vanishing), ("diverging", diverging), ("sweep", sweep)):
        html = write_report(root)
        assert expect[name] in html.read_text(), name
        img = _screenshot(html, tmp_path / f"{name}.png", height=2000)
        ink = (img.mean(axis=2) < 0.9).mean()  # not the page's background: text, boxes, figures
        assert img.std() > 0.05 and ink > 0.03, (name, img.std(), ink)
        sh.copy(tmp_path / f"{name}.png", out / f"report_{name}.png")
