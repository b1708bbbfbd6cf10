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
