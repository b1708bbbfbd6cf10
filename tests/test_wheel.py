"""Build the wheel, install it into a fresh virtual environment and run `bpkit-train` elsewhere."""

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_finds_its_configs_from_any_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    wheel = next(dist.glob("bpkit-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # the heavy dependencies (torch, lightning, wandb...) come from this environment through a .pth
    # line; bpkit itself only from the wheel (a .pth line adds a path but runs no .pth found there)
    env_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                              capture_output=True, text=True).stdout.strip()
    Path(env_site, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import bpkit; print(bpkit.__file__)"], check=True, capture_output=True,
                           text=True, cwd=elsewhere).stdout
    assert str(env_dir) in where and str(ROOT) not in where
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run([str(env_dir / "bin" / "bpkit-train"), "recipe=vanishing_depth", "trainer.max_epochs=1",
                           "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                           "trainer.enable_progress_bar=false", "hydra.run.dir=run"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bpkit: val/acc=" in proc.stdout
    assert (elsewhere / "run" / ".hydra" / "config.yaml").read_text().count("sigmoid") >= 1
