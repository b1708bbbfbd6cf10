"""``bpkit-train``: the Hydra training app (also ``python -m bpkit.train``).

Composes a model, data, optimizer, scheduler, callbacks, clipping policy, logger and trainer from
``conf/`` (and an experiment from ``recipes/`` with ``recipe=<name>``), validates the choices
before anything runs, trains, ends with a short summary (``bpkit: <metrics> | run: <dir>`` and, per logger, a command
that works when pasted: ``wandb leet``/``wandb sync``, ``tensorboard --logdir``, the CSV file) and returns the
monitored metric (for sweepers such as Optuna). The composed config is printed only with ``print_config=true`` (it is
always saved in ``<run dir>/.hydra/config.yaml``); each Lightning log line is printed once.

W&B identity (:func:`wandb_identity`): a run is named by ``run_name``, the recipe, or ``<model>-<data>``; each job of
a multirun by the overrides that vary across the sweep, all jobs grouped as ``<recipe or model-data>-<sweep start>``;
tags carry the config choices. A multirun job's W&B run is linked from ``<sweep dir>/wandb``, so
``wandb leet <sweep dir>/wandb`` browses the sweep and ``wandb sync <sweep dir>/wandb`` uploads it.

Example::

    bpkit-train                                    # MLP on digits, W&B offline
    bpkit-train model=rnn data=adding trainer.max_epochs=3
    bpkit-train -m recipe=vanishing_depth model.depth=4,16 model.activation=sigmoid,relu
    bpkit-train trainer.max_epochs=10 ckpt_path=last   # resume the newest run, train up to 10 epochs
    bpkit-train debug=fdr                          # one batch through everything (also overfit, limit, profiler)
    bpkit-train pretrained=weights.ckpt finetune=gradual   # fine-tune pretrained weights (docs/transfer.md)
    bpkit-train -m recipe=transfer                 # pretrain on digits 0-4, fine-tune on 5-9 with 20 labels a class

Transfer learning: ``pretrained`` (a Lightning checkpoint or a state_dict file, read with ``weights_only=True``;
partial unless ``pretrained_strict``; ``pretrained_skip`` globs; one line reports missing, unexpected and skipped
tensors), the ``finetune`` group (none, scratch, freeze, backbone, gradual, llrd: :mod:`bpkit.finetune`), and
``pretrain`` (a recipe's source task, trained once into ``<sweep dir>/pretrained/`` when ``pretrained`` is null;
``test/source_acc`` after fine-tuning).

Resuming (``ckpt_path``, passed to ``Trainer.fit(ckpt_path=...)``): a path to a ``.ckpt`` file, or ``last``. Hydra
gives the resumed invocation a new run directory, so ``last`` means the newest (by modification time)
``last.ckpt`` among:

- this run's checkpoint directory (``callbacks.checkpoint.dirpath``, by default ``<run dir>/checkpoints``), which
  holds one when ``hydra.run.dir`` (or the dirpath) is pinned to a previous run's;
- the previous runs of the same layout: the run directory pattern (``hydra.run.dir``; for a multirun job
  ``hydra.sweep.dir/hydra.sweep.subdir``) with each ``${now:...}`` part as a wildcard, followed by the
  checkpoint directory's place inside the run directory. With the defaults that is
  ``outputs/*/*/checkpoints/last.ckpt``, and for job ``k`` of a multirun ``multirun/*/*/k/checkpoints/last.ckpt``.

The trainer's limits are totals: a run that stopped at step N and is resumed with ``trainer.max_steps=2N`` trains
N more steps.

Failures of the environment rather than of the code (a directory that cannot be created or written, a full disk,
a setting Lightning rejects, a checkpoint that does not fit the model) end the job with one line
``bpkit-train: error: <key>=<value> is invalid: expected ...`` and exit status 2; errors raised by the training
code itself keep their traceback.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import inspect
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, ListConfig, OmegaConf
from typing_extensions import override

from bpkit.errors import BpkitConfigError, check_int

log = logging.getLogger("bpkit")

METRICS_FOR_TARGET = {"regression": ["mse"], "binary": ["acc", "f1"], "multiclass": ["acc", "f1"],
                      "sequence_multiclass": ["acc"], "multilabel": ["acc", "f1"]}


def config_dir() -> str:
    """The configs: inside the installed package (wheel) or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"bpkit's configs were not found next to {here}")


def _unwrap(exc: BaseException) -> BaseException:
    """Hydra wraps errors raised while instantiating: find ours inside."""
    seen = exc
    while seen is not None:
        if isinstance(seen, BpkitConfigError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def _instantiate(key: str, node: Any, **kwargs: Any) -> Any:
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except Exception as exc:  # name the config key in the message
        inner = _unwrap(exc)
        if isinstance(inner, BpkitConfigError):
            raise inner.with_prefix(key) from None
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        lines = [ln.strip() for ln in str(inner).strip().splitlines()
                 if ln.strip() and not ln.strip().startswith(("full_key", "object_type", "Error in call to target"))]
        detail = " ".join(lines) or type(inner).__name__
        raise BpkitConfigError(key, target, f"a config that builds: {detail}") from None


def _fill_model_kwargs(model_cfg: DictConfig, shapes: dict[str, Any]) -> dict[str, Any]:
    """Size the model from the data: fill the keys the model takes that the config leaves null."""
    cls = hydra.utils.get_class(model_cfg._target_)
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in shapes.items() if k in accepted and model_cfg.get(k, None) is None}


def _check_config(cfg: DictConfig) -> None:
    check_int("seed", cfg.seed, minimum=0)
    if cfg.get("lr_find"):
        from bpkit.lr_find import check_options

        check_options(**OmegaConf.to_container(cfg.lr_finder, resolve=True))
    for key in ("model", "data", "optimizer"):
        if not isinstance(cfg.get(key), DictConfig) or "_target_" not in cfg[key]:
            raise BpkitConfigError(key, OmegaConf.to_container(cfg.get(key)), "a config group choice with _target_")
    trainer_cfg = cfg.get("trainer")
    if isinstance(trainer_cfg, DictConfig) and trainer_cfg.get("accumulate_grad_batches") is not None:
        # Lightning takes 0, -1 or 1.5 without a word (and bpkit's step count divides by it)
        check_int("trainer.accumulate_grad_batches", trainer_cfg.accumulate_grad_batches, minimum=1)
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and ckpt != "last":
        _check_ckpt_file(ckpt)
    _finetune_spec(cfg)
    from bpkit.errors import check_bool

    check_bool("pretrained_strict", cfg.get("pretrained_strict", False))


# ---------------------------------------------------------------- transfer learning: pretrained, finetune, pretrain


def _finetune_spec(cfg: DictConfig) -> Any:
    """The ``finetune`` group's choice, validated (``finetune.<key>`` named in errors)."""
    from bpkit.finetune import FinetuneSpec

    node = cfg.get("finetune")
    if node is None:
        return FinetuneSpec()
    if not isinstance(node, DictConfig):
        raise BpkitConfigError("finetune", node, "a choice of the finetune group: none, scratch, freeze, backbone, "
                                                 "gradual, llrd")
    trainer_cfg = cfg.get("trainer")
    max_epochs = trainer_cfg.get("max_epochs") if isinstance(trainer_cfg, DictConfig) else None
    return FinetuneSpec.from_config(OmegaConf.to_container(node, resolve=True),
                                    max_epochs=max_epochs if isinstance(max_epochs, int) else None)


def _pretrained_path(value: Any) -> str:
    """``pretrained=<file>``: an existing file (relative paths from where the app started)."""
    if not isinstance(value, str) or not value.strip():
        raise BpkitConfigError("pretrained", value, "the path of a Lightning checkpoint or a state_dict file")
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = _original_cwd() / path
    from bpkit.finetune import read_state_dict

    read_state_dict(path, key="pretrained")  # fails now, in one line, on a missing, unreadable or foreign file
    return str(path)


def _pretrain_dir(cfg: DictConfig) -> Path:
    where = OmegaConf.select(cfg, "pretrain.cache_dir", default=None)
    if where:
        path = Path(os.path.expanduser(str(where)))
        return path if path.is_absolute() else _original_cwd() / path
    hc = _hydra_cfg()
    if hc is None or not hc.runtime.get("output_dir"):
        return _original_cwd() / "pretrained"
    base = sweep_dir_of_job(hc) if _is_multirun(hc) else Path(hc.runtime.output_dir)
    return Path(os.path.abspath(base)) / "pretrained"


def _source_data_cfg(cfg: DictConfig) -> DictConfig:
    return OmegaConf.merge(cfg.data, cfg.pretrain.get("data") or {})


def _ensure_pretrained(cfg: DictConfig) -> str:
    """The recipe's own pretrained weights: train the model on the source task (``pretrain``) once and keep its
    ``state_dict`` in ``<cache dir>/source-<hash>.pt`` (by default ``<sweep dir>/pretrained/`` in a multirun, so
    every job of the sweep reuses it, else ``<run dir>/pretrained/``); the hash covers everything that makes it."""
    import fcntl
    import hashlib

    import lightning.pytorch as pl
    import torch

    from bpkit.task import BackpropTask

    pre = cfg.pretrain
    epochs = check_int("pretrain.max_epochs", pre.get("max_epochs", 10), minimum=1)
    # a seed of its own: with the run's seed, the target model's new head would start where the source model's head
    # started, and the backbone learned its features for that very head (a fresh head would not be fresh)
    seed = pre.get("seed")
    seed = check_int("pretrain.seed", int(cfg.seed) + 1 if seed is None else seed, minimum=0)
    source_cfg = _source_data_cfg(cfg)
    what = {"model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": OmegaConf.to_container(source_cfg, resolve=True),
            "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True), "epochs": epochs, "seed": seed}
    digest = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = _pretrain_dir(cfg)
    _check_writable("pretrain.cache_dir", str(folder), folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"source-{digest}.pt"
    with open(folder / f".source-{digest}.lock", "w") as lock:  # parallel jobs of a sweep: one trains, all reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            print(f"bpkit-train: pretrained weights (source task) reused: {_show(path)}", flush=True)
            return str(path)
        pl.seed_everything(seed, workers=True, verbose=False)
        datamodule = _instantiate("pretrain.data", source_cfg)
        model_cls = hydra.utils.get_class(cfg.model._target_)
        datamodule.use_layout(getattr(model_cls, "input_kind", "flat"))
        shapes = datamodule.model_shapes()
        model = _instantiate("model", cfg.model, **_fill_model_kwargs(cfg.model, shapes))
        num_classes = shapes.get("num_classes")
        task = BackpropTask(model, datamodule.default_loss, _instantiate("optimizer", cfg.optimizer),
                            metrics=["acc"], num_classes=num_classes)
        accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto") or "auto"
        trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator=accelerator, devices=1,
                             default_root_dir=str(folder), num_sanity_val_steps=0)
        trainer.fit(task, datamodule=datamodule)
        acc = _accuracy(model, datamodule, None)
        tmp = folder / f".source-{digest}.pt.tmp"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    print(f"bpkit-train: pretrained on the source task ({epochs} epochs, source test acc {acc:.3f}): {_show(path)}",
          flush=True)
    return str(path)


def _accuracy(model: Any, datamodule: Any, classes: Any = None) -> float:
    """Test accuracy of ``model`` on ``datamodule``'s test split; with ``classes``, the prediction is the best of
    those classes' logits (a task-aware score: how much of the task the network still knows)."""
    import torch

    was = model.training
    model.eval()
    right = total = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            out = model(x.to(device))
            out = out[0] if isinstance(out, tuple) else out
            if classes is not None:
                mask = torch.full((out.shape[-1],), float("-inf"), device=out.device)
                mask[list(classes)] = 0.0
                out = out + mask
            right += int((out.argmax(-1).cpu() == y).sum())
            total += len(y)
    model.train(was)
    return right / max(total, 1)


def _source_eval(cfg: DictConfig, trainer: Any, task: Any, pretrained: str | None) -> dict[str, float]:
    """Forgetting: ``test/source_acc``, the accuracy of the fine-tuned backbone under the pretrained model's own head
    on the source task's test split (the best of the source classes' outputs). Nothing without pretrained weights
    (``finetune=scratch``)."""
    import torch

    from bpkit.callbacks import _sink
    from bpkit.finetune import with_pretrained_head

    if pretrained is None:
        return {}
    datamodule = _instantiate("pretrain.data", _source_data_cfg(cfg))
    datamodule.use_layout(getattr(task.model, "input_kind", "flat"))
    model = with_pretrained_head(task.model, pretrained)
    metrics = {"test/source_acc": _accuracy(model, datamodule, getattr(datamodule, "classes", None))}
    for k, v in metrics.items():
        trainer.callback_metrics[k] = torch.tensor(v)
    _sink.log_scalars(trainer, metrics, trainer.global_step)
    return metrics


# ---------------------------------------------------------------- resume: ckpt_path

_CKPT_EXPECTED = "the path of a checkpoint file (.ckpt) or 'last'"
_NOW = re.compile(r"\$\{now:[^}]*\}")


def _hydra_cfg() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _original_cwd() -> Path:
    hc = _hydra_cfg()
    cwd = hc.runtime.get("cwd") if hc is not None else None
    return Path(cwd) if cwd else Path.cwd()


def _check_ckpt_file(value: Any) -> str:
    """``ckpt_path=<file>``: an existing, readable checkpoint file (relative paths from where the app started)."""
    if not isinstance(value, str) or not value.strip():
        raise BpkitConfigError("ckpt_path", value, _CKPT_EXPECTED)
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = _original_cwd() / path
    if not path.exists():
        raise BpkitConfigError("ckpt_path", value, f"{_CKPT_EXPECTED}: {path} does not exist")
    if not path.is_file():
        raise BpkitConfigError("ckpt_path", value, f"{_CKPT_EXPECTED}: {path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as exc:
        raise BpkitConfigError("ckpt_path", value, f"a readable checkpoint file: {exc.strerror}") from None
    if not (zipfile.is_zipfile(path) or head == b"\x80"):  # torch.save's zip format, or a legacy pickle
        raise BpkitConfigError("ckpt_path", value, f"a checkpoint written by Lightning (torch.save): {path} is not one")
    return str(path)


def _previous_runs_pattern(ckpt_subdir: Path) -> str | None:
    """This job's run directory as a glob (its ``${now:...}`` parts as ``*``) + ``<ckpt_subdir>/last.ckpt``."""
    from hydra.types import RunMode

    hc = _hydra_cfg()
    if hc is None or not hc.runtime.get("output_dir"):
        return None
    try:
        if hc.get("mode") == RunMode.MULTIRUN:
            sweep = OmegaConf.to_container(hc.sweep, resolve=False)
            template = f"{sweep['dir']}/{sweep['subdir']}"
        else:
            template = str(OmegaConf.to_container(hc.run, resolve=False)["dir"])
    except Exception:  # a custom layout we cannot read: only this run's checkpoint directory is searched
        return None
    if not _NOW.search(template):
        return None
    starred = _NOW.sub(lambda m: "/".join("*" for _ in m.group(0).split("/")), template)
    base = Path(starred) if os.path.isabs(starred) else _original_cwd() / starred
    tparts = Path(os.path.normpath(base)).parts
    rparts = Path(os.path.normpath(hc.runtime.output_dir)).parts
    if len(tparts) != len(rparts):
        return None
    comps = []
    for t, r in zip(tparts, rparts):
        if "${" in t:  # another interpolation: this job's value, or anything when mixed with a time
            comps.append("*" if "*" in t else glob.escape(r))
        else:
            comps.append("*".join(glob.escape(piece) for piece in t.split("*")))
    return os.path.join(*comps, glob.escape(str(ckpt_subdir)), "last.ckpt")


def _show(path: str | Path) -> str:
    try:
        return os.path.relpath(path, _original_cwd()) if os.path.isabs(path) else str(path)
    except ValueError:
        return str(path)


def _find_last_checkpoint(ckpt_dirs: list[Path]) -> str:
    """``ckpt_path=last``: the newest ``last.ckpt`` of this run's checkpoint directory or of the previous runs."""
    hc = _hydra_cfg()
    run_dir = Path(os.path.realpath(hc.runtime.output_dir)) if hc is not None and hc.runtime.get("output_dir") \
        else None
    subdir = Path("checkpoints")  # the default dirpath's place inside the run directory
    for d in ckpt_dirs:
        if run_dir is not None and Path(os.path.realpath(d)).is_relative_to(run_dir):
            subdir = Path(os.path.realpath(d)).relative_to(run_dir)
            break
    candidates = [d / "last.ckpt" for d in ckpt_dirs if (d / "last.ckpt").is_file()]
    pattern = _previous_runs_pattern(subdir)
    if pattern:
        candidates += [Path(p) for p in glob.glob(pattern) if os.path.isfile(p)]
    if not candidates:
        places = ([pattern] if pattern else []) + [str(d / "last.ckpt") for d in ckpt_dirs
                                                   if not (pattern and fnmatch.fnmatch(str(d / "last.ckpt"), pattern))]
        where = " nor ".join(dict.fromkeys(_show(p) for p in places)) or "last.ckpt (no checkpoint directory)"
        raise BpkitConfigError("ckpt_path", "last", f"a previous run's checkpoint, but there is no {where}; "
                                                    "train once first (with callbacks.checkpoint) or give a path")
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def _resolve_ckpt_path(cfg: DictConfig, callbacks: list[Any]) -> str | None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    value = cfg.get("ckpt_path")
    if value is None:
        return None
    if value == "last":
        dirs = [Path(cb.dirpath) for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        return _find_last_checkpoint(dirs)
    return _check_ckpt_file(value)


# ---------------------------------------------------------------- hostile environments

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # never the training code's fault
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def _check_writable(key: str, value: Any, path: Path) -> None:
    """Fail now, not at the first checkpoint, on a directory that cannot be created or written (leaves nothing)."""
    probe = Path(os.path.abspath(os.path.expanduser(str(path))))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise BpkitConfigError(key, value, f"a directory that can be created: {probe} is not a directory")
    try:  # os.access() says yes to root on /proc and to read-only mounts: try it
        os.rmdir(tempfile.mkdtemp(prefix=".bpkit-write-check-", dir=probe))
    except OSError as exc:
        raise BpkitConfigError(key, value, f"a directory that can be created and written: writing in {probe} "
                                           f"fails ({exc.strerror or exc})") from None


class RunDirCheck(HydraCallback):
    """Hydra callback: one line and exit status 2, before Hydra writes anything, when the run directory
    (``hydra.run.dir``, or ``hydra.sweep.dir`` for a multirun) cannot be created or written.

    Enabled in ``conf/train.yaml`` under ``hydra.callbacks.run_dir_check`` (before ``sweep_summary``).
    """

    @override
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run")

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "sweep")

    @staticmethod
    def _check(config: DictConfig, node: str) -> None:
        try:
            value = str(config.hydra[node].dir)
        except Exception:  # interpolations that only resolve inside the job: Hydra reports those itself
            return
        try:
            _check_writable(f"hydra.{node}.dir", value, Path(value))
        except BpkitConfigError as err:
            print(f"bpkit-train: error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)


# ---------------------------------------------------------------- W&B identity of a run and of a sweep

_SWEEP_ENV = "BPKIT_SWEEP"  # set once per sweep by SweepClock (the main process), read by every job


class SweepClock(HydraCallback):
    """Hydra callback: fixes, once per sweep and in the main process, what every job of the sweep shares (the time
    the sweep started and the overrides it was launched with). Jobs read it to name their W&B group (the same for all
    jobs, e.g. ``vanishing_depth-2026-11-29_10-01-02``) and their W&B run (the overrides that vary across jobs).

    Enabled in ``conf/train.yaml`` under ``hydra.callbacks.sweep_clock``. Carried in the environment, which the
    launchers' workers inherit (joblib's processes, SLURM jobs with sbatch's default ``--export=ALL``).
    """

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            overrides = [str(o) for o in config.hydra.overrides.task]
        except Exception:
            overrides = None
        os.environ[_SWEEP_ENV] = json.dumps({"start": time.strftime("%Y-%m-%d_%H-%M-%S"), "overrides": overrides})


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_multirun(hc: Any) -> bool:
    from hydra.types import RunMode

    return hc is not None and hc.get("mode") == RunMode.MULTIRUN


def sweep_dir_of_job(hc: Any) -> Path:
    """The directory that holds this multirun job's directory (``hydra.sweep.dir`` as the job was placed)."""
    out = Path(str(hc.runtime.output_dir))
    try:
        sub = Path(str(hc.sweep.subdir))
    except Exception:
        sub = Path(out.name)
    n = len(sub.parts)
    if not sub.is_absolute() and 0 < n < len(out.parts) and out.parts[-n:] == sub.parts:
        return Path(*out.parts[:-n])
    return out.parent


def _sweep_info(hc: Any) -> dict[str, Any]:
    """What the sweep's main process fixed (SweepClock), else what its ``multirun.yaml`` says."""
    try:
        info = json.loads(os.environ.get(_SWEEP_ENV, ""))
        if isinstance(info, dict):
            return info
    except ValueError:
        pass
    info: dict[str, Any] = {"start": None, "overrides": None}
    saved = sweep_dir_of_job(hc) / "multirun.yaml"
    try:
        info["overrides"] = [str(o) for o in OmegaConf.load(saved).hydra.overrides.task]
        info["start"] = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(saved.stat().st_mtime))
    except Exception:
        pass
    return info


def _swept_overrides(hc: Any, launched: list[str] | None) -> list[str]:
    """The job's overrides that vary across the sweep: those swept on the command line (``model.depth=2,3`` gives
    ``model.depth=2``) and the sweeper's own parameters (a recipe's grid, Optuna's search space) unless the command
    line fixes them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    job = [str(o) for o in hc.overrides.task]
    if launched is None:
        return job
    parser = OverridesParser.create()
    try:
        given = parser.parse_overrides(launched)
        mine = parser.parse_overrides(job)
    except Exception:  # an override Hydra itself accepted but we cannot read: name the job by all of them
        return job
    swept = {o.get_key_element() for o in given if o.is_sweep_override()}
    fixed = {o.get_key_element() for o in given if not o.is_sweep_override()}
    params = hc.get("sweeper", {}).get("params") or {}
    swept |= {str(k) for k in params if str(k) not in fixed}
    return [text for text, o in zip(job, mine) if o.get_key_element() in swept]


def _choices(hc: Any) -> dict[str, str]:
    try:
        return {str(k): str(v) for k, v in hc.runtime.choices.items() if v is not None}
    except Exception:
        return {}


def wandb_identity(cfg: DictConfig) -> dict[str, Any]:
    """The W&B ``name``, ``group`` and ``tags`` of this job.

    A plain run is named by ``run_name``, else the recipe, else ``<model>-<data>`` (``mlp-digits``); its group is
    ``group``. A multirun job is named by the overrides that vary across the sweep (``model.depth=4,model.activation=
    relu``; prefixed by ``run_name`` when it is given on the command line) and grouped by ``<group or recipe or
    model-data>-<sweep start>``, the same for every job of the sweep. Tags: ``tags`` plus the config choices
    (``model:mlp``, ``data:digits``, ``optimizer:adam``, ``recipe:vanishing_depth``, ...).
    """
    hc = _hydra_cfg()
    choices = _choices(hc)
    model = choices.get("model") or str(OmegaConf.select(cfg, "model._target_", default="model")).rsplit(".")[-1]
    data = choices.get("data") or str(OmegaConf.select(cfg, "data._target_", default="data")).rsplit(".")[-1]
    recipe = choices.get("recipe")
    base = recipe or f"{model}-{data}"
    tags = [str(t) for t in (cfg.get("tags") or [])]
    for group in ("recipe", "hparams_search", "model", "data", "optimizer", "scheduler", "clipping", "finetune",
                  "debug"):
        value = choices.get(group)
        if value and value not in ("none", "null"):
            tags.append(f"{group}:{value}")
    tags = list(dict.fromkeys(t[:64] for t in tags))
    run_name, group = cfg.get("run_name"), cfg.get("group")
    if not _is_multirun(hc):
        return {"name": str(run_name) if run_name else base, "group": group, "tags": tags}
    info = _sweep_info(hc)
    swept = _swept_overrides(hc, info.get("overrides"))
    label = ",".join(swept) or f"{base}-{hc.job.get('num', 0)}"
    typed = {_override_key(str(o)) for o in hc.overrides.task}
    name = f"{run_name}:{label}" if run_name and "run_name" in typed else label
    start = info.get("start") or sweep_dir_of_job(hc).name
    group = str(group) if group and "group" in typed else f"{group or base}-{start}"
    return {"name": name, "group": group, "tags": [*tags, "sweep"] if "sweep" not in tags else tags}


def _apply_wandb_identity(cfg: DictConfig) -> None:
    """Fill ``run_name``/``group``/``tags``: the W&B logger's name, group and tags interpolate them."""
    from omegaconf import open_dict

    ident = wandb_identity(cfg)
    with open_dict(cfg):
        cfg.run_name, cfg.group, cfg.tags = ident["name"], ident["group"], ident["tags"]


def _wandb_run_dir(logger: Any) -> Path | None:
    """The local directory of a W&B logger's run (``.../wandb/offline-run-...``), once it has started."""
    run = getattr(logger, "_experiment", None)
    run_files = getattr(run, "dir", None) if run is not None else None
    return Path(run_files).parent if isinstance(run_files, str) and run_files else None


def _link_wandb_run(loggers: list[Any], job_dir: str) -> Path | None:
    """A multirun job's W&B run (``<job dir>/wandb/offline-run-...``) is linked from ``<sweep dir>/wandb/``, so
    ``wandb leet <sweep dir>/wandb`` browses and ``wandb sync <sweep dir>/wandb`` uploads the whole sweep.

    Returns the sweep's W&B directory, or None when there is no W&B run or the file system has no links.
    """
    hc = _hydra_cfg()
    shared = sweep_dir_of_job(hc) / "wandb"
    linked = None
    for logger in loggers:
        target = _wandb_run_dir(logger)
        if target is None:
            continue
        link = shared / target.name
        try:
            shared.mkdir(parents=True, exist_ok=True)
            if not os.path.lexists(link):
                os.symlink(os.path.relpath(target, shared), link, target_is_directory=True)
            linked = shared
        except OSError as exc:  # a file system without links: the job's own wandb/ still holds the run
            log.info("the W&B run %s is not linked from %s: %s", target, shared, exc)
    return linked


# ---------------------------------------------------------------- output of a run


def _quiet_logging() -> None:
    """Each Lightning line once, without Lightning's advertising tips.

    ``import lightning`` gives its logger a console handler of its own, and Hydra's job logging gives the root
    logger another: every Lightning line was printed twice. Lightning keeps its own console (the lines users know)
    and stops propagating; Hydra's log file (``<run dir>/<job>.log``) still receives them.
    """
    import lightning.pytorch  # noqa: F401  (its loggers and handlers exist from here on)

    import warnings

    # Lightning's own use of a torch API torch has deprecated: nothing a user of bpkit-train can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in tips.filters):
        tips.addFilter(_NoTips())
    root = logging.getLogger()
    if not root.handlers:  # no Hydra job logging (hydra/job_logging=none): nothing is doubled
        return
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if getattr(h, "_bpkit_job_file", False)]:
            lg.removeHandler(h)  # the previous job's log file (multirun in one process)
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in lg.handlers):
            continue
        lg.propagate = False
        for h in files:  # the same handler objects: Hydra closes them when the next job configures logging
            h._bpkit_job_file = True  # type: ignore[attr-defined]
            lg.addHandler(h)


class _NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger/litmodels" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in str(record.msg)


def _output_places(cfg: DictConfig, callbacks: dict[str, Any], logger: Any, run_dir: str | None) \
        -> list[tuple[str, Any, Path]]:
    """``(key, value, path)`` of everything the run writes, to name the key when writing fails."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    places = []
    for name, cb in callbacks.items():
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            places.append((f"{name}.dirpath", cb.dirpath, Path(cb.dirpath)))
    save_dir = getattr(logger, "save_dir", None) if logger else None
    if save_dir:
        places.append(("logger.save_dir", save_dir, Path(save_dir)))
    if run_dir:
        places.append(("hydra.run.dir", run_dir, Path(run_dir)))
    return places


def _environment_error(exc: BaseException, parts: dict[str, Any], cfg: DictConfig) -> BpkitConfigError | None:
    """The one-line error for a failure of the environment or the setup; None for the training code's errors."""
    import traceback

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS | _PATH_ERRNOS:
        places = parts.get("outputs", [])
        name = exc.filename if isinstance(exc.filename, (str, os.PathLike)) else None
        hit = None
        if name is not None:
            target = os.path.realpath(os.path.abspath(name))
            inside = [pl for pl in places if Path(target).is_relative_to(os.path.realpath(pl[2]))]
            hit = max(inside, key=lambda pl: len(str(pl[2])), default=None)
        if hit is None and exc.errno in _DISK_ERRNOS:
            frames = " ".join(f.filename for f in traceback.extract_tb(exc.__traceback__))
            saving_ckpt = "model_checkpoint" in frames or os.path.join("plugins", "io") in frames
            ckpt = [pl for pl in places if pl[0].startswith("callbacks.")]
            hit = ckpt[0] if saving_ckpt and ckpt else (places[-1] if places else ("hydra.run.dir", "?", Path(".")))
        if hit is None:
            return None  # a file of the user's own (data, ...): keep the traceback
        what = f"writing {name} failed" if name else "writing failed"
        return BpkitConfigError(hit[0], hit[1], f"a directory that can be written, with free space ({what}: "
                                                f"{exc.strerror or exc})")
    tb = traceback.extract_tb(exc.__traceback__)
    raised_by_lightning = bool(tb) and f"{os.sep}lightning{os.sep}" in tb[-1].filename
    if isinstance(exc, MisconfigurationException) or (isinstance(exc, ValueError) and raised_by_lightning):
        detail = " ".join(str(exc).split()) or type(exc).__name__
        found = [(m.start(), str(k)) for k in cfg.trainer if k != "_target_"
                 for m in [re.search(rf"\b{re.escape(str(k))}\b", detail)] if m]
        if found:  # Lightning names the setting first (then the ones that would help): so do we
            key = min(found)[1]
            return BpkitConfigError(f"trainer.{key}", cfg.trainer[key], f"a value Lightning accepts: {detail}")
        return BpkitConfigError("trainer", cfg.trainer.get("_target_", "?"), f"a setup Lightning accepts: {detail}")
    if parts.get("ckpt_path") and isinstance(exc, RuntimeError) and "Error(s) in loading state_dict" in str(exc):
        first = str(exc).strip().splitlines()
        detail = " ".join(ln.strip() for ln in first[:3])
        return BpkitConfigError("ckpt_path", cfg.ckpt_path, f"a checkpoint of this model and config ({detail})")
    return None


def _progress() -> Any:
    """A callback that notes the step training starts from (after a checkpoint is restored)."""
    import lightning.pytorch as pl

    class _Progress(pl.Callback):
        start: int | None = None

        # no @override here: under `python -m bpkit.train` a joblib worker rebuilds this function from __main__
        # by value, and a global used only inside a nested class body is not carried along (NameError)
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start = trainer.global_step

    return _Progress()


def _nothing_trained(cfg: DictConfig, trainer: Any, progress: Any) -> str | None:
    """Why this invocation made no optimizer step, naming the setting; None when it trained."""
    if progress.start is not None and trainer.global_step > progress.start:
        return None
    t = cfg.trainer
    if t.get("max_steps") == 0:
        return "trainer.max_steps=0"
    limit = t.get("limit_train_batches")
    if limit is not None and limit == 0:
        return f"trainer.limit_train_batches={limit}"
    if t.get("max_epochs") == 0:
        return "trainer.max_epochs=0"
    if cfg.get("ckpt_path") and trainer.global_step > 0:
        return (f"ckpt_path={cfg.ckpt_path} is already at step {trainer.global_step}, epoch {trainer.current_epoch}: "
                f"the limits are totals, raise trainer.max_steps or trainer.max_epochs")
    return "no training batch ran"


def build(cfg: DictConfig) -> dict[str, Any]:
    """Build every object of a run from a composed config, failing early with clear messages.

    Returns a dict with ``datamodule``, ``task``, ``trainer``, ``monitor``, ``loss``, ``ckpt_path`` (the checkpoint
    to resume from, resolved, or None), ``progress`` (notes the step training starts from) and ``outputs`` (the
    ``(key, value, path)`` of every directory the run writes).
    """
    import lightning.pytorch as pl
    import torch

    from bpkit.schedules import check_schedule_spec
    from bpkit.task import BackpropTask, check_loss_fits

    _check_config(cfg)
    if cfg.get("torch_threads") is not None:
        torch.set_num_threads(check_int("torch_threads", cfg.torch_threads, minimum=1))
    spec = _finetune_spec(cfg)
    pretrained = _pretrained_path(cfg.pretrained) if cfg.get("pretrained") is not None else None
    if spec.mode == "scratch":  # the baseline: the same run without the pretrained weights
        pretrained = None
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = _instantiate("data", cfg.data)
    model_cls = hydra.utils.get_class(cfg.model._target_)
    input_kind = getattr(model_cls, "input_kind", "flat")
    if input_kind not in datamodule.layouts:
        raise BpkitConfigError("model", cfg.model._target_.rsplit(".", 1)[-1],
                               f"a model that takes the inputs of data={type(datamodule).__name__} "
                               f"({', '.join(datamodule.layouts)}); this model takes '{input_kind}' inputs")
    if getattr(datamodule, "layout", "auto") != input_kind and cfg.data.get("layout", "auto") == "auto":
        datamodule.use_layout(input_kind)
    shapes = datamodule.model_shapes()
    model = _instantiate("model", cfg.model, **_fill_model_kwargs(cfg.model, shapes))
    if shapes.get("num_classes") and getattr(model, "output", "last") == "last" and \
            datamodule.target_kind == "sequence_multiclass":
        raise BpkitConfigError("model.output", "last", "all (this data has a target at every time step)")
    pretrained_report = None
    if pretrained is not None:
        from bpkit.finetune import load_pretrained

        skip = cfg.get("pretrained_skip")
        skip = OmegaConf.to_container(skip) if isinstance(skip, (DictConfig, ListConfig)) else skip
        pretrained_report = load_pretrained(model, pretrained, strict=bool(cfg.get("pretrained_strict", False)),
                                            skip=skip)
        print(f"bpkit-train: {pretrained_report.summary()}", flush=True)

    loss = cfg.task.loss if cfg.task.loss != "auto" else datamodule.default_loss
    check_loss_fits(loss, datamodule.target_kind, shapes.get("num_classes"))
    metrics = cfg.task.metrics if cfg.task.metrics != "auto" else METRICS_FOR_TARGET[datamodule.target_kind]
    optimizer = _instantiate("optimizer", cfg.optimizer)
    try:  # fail now, not after the sanity check, on a bad learning rate or momentum
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except Exception as exc:
        raise BpkitConfigError("optimizer", OmegaConf.to_container(cfg.optimizer), f"valid arguments: {exc}") from None
    if spec.mode not in ("none", "scratch"):
        from bpkit.finetune import model_blocks

        model_blocks(model)  # fails now on a model without a backbone and a head
        from bpkit.finetune import GroupedOptimizer

        optimizer = GroupedOptimizer(optimizer, model, spec)
    scheduler: Any = None
    if cfg.get("scheduler"):
        if "_target_" in cfg.scheduler:  # any torch scheduler as a _partial_ config
            scheduler = _instantiate("scheduler", cfg.scheduler)
        else:  # a bpkit schedule by name (bpkit.schedules)
            scheduler = OmegaConf.to_container(cfg.scheduler, resolve=True)
    num_classes = shapes.get("num_classes") or shapes.get("num_labels")
    task_kwargs = dict(model=model, loss=loss, optimizer=optimizer, scheduler=scheduler, metrics=list(metrics),
                       num_classes=num_classes, scheduler_interval=cfg.task.scheduler_interval)
    tbptt = cfg.task.get("tbptt_steps")
    try:
        if tbptt is not None:
            if input_kind != "sequence":
                raise BpkitConfigError("tbptt_steps", tbptt, "null for a model that does not read sequences "
                                       f"({cfg.model._target_.rsplit('.', 1)[-1]})")
            from bpkit.tbptt import TBPTTTask

            task = TBPTTTask(**task_kwargs, truncated_bptt_steps=tbptt,
                             backprop_steps=cfg.task.get("tbptt_backprop_steps"),
                             accumulate_chunks=cfg.task.get("tbptt_accumulate_chunks", 1),
                             carry_hiddens=cfg.task.get("tbptt_carry_hiddens", False),
                             scheduler_per=cfg.task.get("tbptt_scheduler_per", "chunk"))
        else:
            task = BackpropTask(**task_kwargs)
    except BpkitConfigError as err:
        raise err.with_prefix("task") from None

    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    named = {f"callbacks.{name}": _instantiate(f"callbacks.{name}", node)
             for name, node in (cfg.get("callbacks") or {}).items() if node is not None}
    if cfg.get("clipping"):
        named["clipping"] = _instantiate("clipping", cfg.clipping)
    if spec.mode == "backbone":
        from bpkit.callbacks.finetuning import BackboneUnfreeze

        named["finetune.unfreeze"] = BackboneUnfreeze(spec.unfreeze_epoch,
                                                      backbone_initial_ratio_lr=spec.backbone_lr_ratio)
    elif spec.mode == "gradual":
        from bpkit.callbacks.finetuning import GradualUnfreeze

        named["finetune.unfreeze"] = GradualUnfreeze(spec.unfreeze_epoch, spec.every_n_epochs, spec.lr_factor)
    if pretrained is not None or spec.mode not in ("none", "scratch"):
        from bpkit.callbacks.weight_drift import WeightDrift

        named["finetune.drift"] = WeightDrift()
    logger = _instantiate("logger", cfg.logger) if cfg.get("logger") else False
    wandb_init = getattr(logger, "_wandb_init", None)  # WandbLogger passes anonymous=None: wandb 0.31 warns on it
    if isinstance(wandb_init, dict) and "anonymous" in wandb_init and wandb_init["anonymous"] is None:
        del wandb_init["anonymous"]
    if not logger:  # Lightning's LearningRateMonitor refuses a run without a logger; the record keeps the LRs
        for key in [k for k, cb in named.items() if isinstance(cb, LearningRateMonitor)]:
            log.info("logger=none: %s is left out (it needs a logger; the run record keeps the learning rates)", key)
            del named[key]
    for key, cb in named.items():
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            _check_writable(f"{key}.dirpath", cb.dirpath, Path(cb.dirpath))
    callbacks = list(named.values())
    ckpt_path = _resolve_ckpt_path(cfg, callbacks)
    progress = _progress()
    trainer = _instantiate("trainer", cfg.trainer, callbacks=[*callbacks, progress], logger=logger)
    if isinstance(scheduler, dict):
        interval = scheduler.get("interval", cfg.task.scheduler_interval)
        total = estimate_total_steps(trainer, datamodule, interval)
        if total is not None and tbptt is not None and interval == "step" and \
                cfg.task.get("tbptt_scheduler_per", "chunk") == "chunk" and \
                datamodule.target_kind == "sequence_multiclass":
            length = getattr(datamodule, "seq_len", None) or getattr(datamodule, "window", None)
            if isinstance(length, int):  # one optimizer step per chunk (group of accumulated chunks)
                total *= -(-(-(-length // tbptt)) // cfg.task.get("tbptt_accumulate_chunks", 1))
        check_schedule_spec(scheduler, total_steps=total)
    monitor = cfg.monitor if cfg.monitor != "auto" else ("val/acc" if "acc" in metrics else "val/loss")
    hc = _hydra_cfg()
    run_dir = hc.runtime.get("output_dir") if hc is not None else None
    return {"datamodule": datamodule, "task": task, "trainer": trainer, "monitor": monitor, "loss": loss,
            "ckpt_path": ckpt_path, "progress": progress, "outputs": _output_places(cfg, named, logger, run_dir),
            "pretrained": pretrained_report}


def estimate_total_steps(trainer: Any, datamodule: Any, interval: str) -> int | None:
    """The run's length in scheduler steps, known before fit (for early schedule validation)."""
    if interval == "epoch":
        return trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    if not trainer.max_epochs or trainer.max_epochs < 0:
        return None
    batches = len(datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    if isinstance(limit, float):
        batches = int(batches * limit)
    elif isinstance(limit, int):
        batches = min(batches, limit)
    return int(trainer.max_epochs * math.ceil(batches / trainer.accumulate_grad_batches))


def wandb_commands(wandb_dir: str | Path) -> list[str]:
    """The lines that browse and upload the W&B runs of a ``wandb`` directory (a run's, or a sweep's), quoted for
    the shell: ``wandb leet DIR`` (wandb >= 0.31's terminal UI; a directory of runs lists them) and ``wandb sync DIR``
    (uploads every run in it)."""
    where = shlex.quote(str(wandb_dir))
    return [f"  view: wandb leet {where}", f"  upload: wandb sync {where}"]


def _summary(trainer: Any, run_dir: str, untrained: str | None = None) -> str:
    """The run's last lines: ``bpkit: <metrics> | run: <dir>``, then a command per logger that works when pasted
    (paths quoted for the shell): ``wandb leet``/``wandb sync`` of the W&B directory (the sweep's, in a multirun),
    ``tensorboard --logdir``, the CSV file."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
    parts = [f"{k}={v:.4g}" for k, v in sorted(metrics.items())]
    if untrained is not None:  # whatever validation ran scored the untrained (or restored) weights
        parts = [f"nothing was trained ({untrained})"]
    lines = ["bpkit: " + (" ".join(parts) or "no validation metrics") + f" | run: {shlex.quote(str(run_dir))}"]
    hc = _hydra_cfg()
    sweep = sweep_dir_of_job(hc) if _is_multirun(hc) else None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = _wandb_run_dir(logger)
            if run is not None:
                shared = sweep / "wandb" if sweep is not None else None
                where = shared if shared is not None and os.path.lexists(shared / run.name) else run.parent
                lines += wandb_commands(where)
        elif isinstance(logger, TensorBoardLogger):
            logdir = sweep if sweep is not None else Path(logger.root_dir)
            lines.append(f"  view: tensorboard --logdir {shlex.quote(str(logdir))}")
        elif isinstance(logger, CSVLogger):
            lines.append(f"  metrics: {shlex.quote(str(Path(logger.log_dir) / 'metrics.csv'))}")
    return "\n".join(lines)


def _finish_wandb() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception:  # never fail a finished run on W&B's teardown
        pass


def _looks_unstarted(run_dir: Path) -> bool:
    allowed = {".hydra", "train.log", "main.log"}
    return run_dir.is_dir() and all(p.name in allowed for p in run_dir.iterdir())


def run(cfg: DictConfig) -> float:
    """Train one job from a composed config; return the monitored metric (NaN when missing)."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir
    if cfg.get("print_config"):  # always saved in <run dir>/.hydra/config.yaml
        print(OmegaConf.to_yaml(cfg, resolve=False), flush=True)
    _quiet_logging()
    _apply_wandb_identity(cfg)
    try:
        if cfg.get("pretrain") and cfg.get("pretrained") is None and _finetune_spec(cfg).mode != "scratch":
            _check_config(cfg)  # a bad config fails before the source task is trained
            path = _ensure_pretrained(cfg)  # the recipe's source task, trained once (before this run is seeded)
            from omegaconf import open_dict

            with open_dict(cfg):
                cfg.pretrained = path  # the run's config (and W&B's) names the weights it started from
        parts = build(cfg)
    except BpkitConfigError as err:
        # nothing ran: do not leave a directory that looks like a run
        if _looks_unstarted(Path(run_dir)):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise err
    trainer, task, datamodule = parts["trainer"], parts["task"], parts["datamodule"]
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        for logger in trainer.loggers:  # the resolved config becomes the W&B run config
            logger.log_hyperparams(resolved)
        if _is_multirun(_hydra_cfg()):
            _link_wandb_run(trainer.loggers, run_dir)
        if cfg.get("lr_find"):
            _run_lr_find(cfg, trainer, task, datamodule, run_dir)
        if parts["ckpt_path"] and trainer.is_global_zero:
            print(f"bpkit-train: resuming from {parts['ckpt_path']}", flush=True)
        trainer.fit(task, datamodule=datamodule, ckpt_path=parts["ckpt_path"])
        untrained = _nothing_trained(cfg, trainer, parts["progress"])
        if cfg.get("test_after_fit"):
            trainer.test(task, datamodule=datamodule)
        if cfg.get("pretrain") and cfg.pretrain.get("evaluate", True) and untrained is None:
            report = parts.get("pretrained")
            _source_eval(cfg, trainer, task, report.path if report is not None else None)  # forgetting
        value = trainer.callback_metrics.get(parts["monitor"])
        result = float(value) if value is not None and untrained is None else math.nan
        if trainer.is_global_zero:
            if untrained is not None:
                print(f"bpkit-train: nothing was trained: {untrained}", file=sys.stderr, flush=True)
            elif cfg.get("report", True):
                _write_report(run_dir)
            print(_summary(trainer, run_dir, untrained), flush=True)
        return result
    except Exception as exc:
        err = _environment_error(exc, parts, cfg)
        if err is None:
            raise  # the training code's own error: keep its traceback
        raise err from exc
    finally:
        _finish_wandb()


def _write_report(run_dir: str) -> None:
    from bpkit.report import write_report

    try:
        print(f"bpkit report: {write_report(run_dir)}", flush=True)
    except BpkitConfigError as err:  # e.g. no bpkit callback wrote a record in this run
        log.warning("no bpkit report: %s", err)


def _run_lr_find(cfg: DictConfig, trainer: Any, task: Any, datamodule: Any, run_dir: str) -> None:
    from bpkit.callbacks._sink import log_image
    from bpkit.lr_find import find_lr

    from bpkit.finetune import GroupedOptimizer

    opts = cfg.lr_finder
    grouped = isinstance(getattr(task, "optimizer_factory", None), GroupedOptimizer)  # a finetune option's groups
    result = find_lr(trainer, task, datamodule, min_lr=opts.min_lr, max_lr=opts.max_lr, num_steps=opts.num_steps,
                     early_stop_threshold=opts.early_stop_threshold, rule=opts.rule, out_dir=run_dir,
                     apply=opts.apply and not grouped)
    if grouped and opts.apply and result.suggestion is not None:
        task.optimizer_factory.lr = float(result.suggestion)  # the head's LR; the other groups follow from it
    print(result.explain(), flush=True)
    if result.plot_path:
        print(f"LR range test plot: {result.plot_path}", flush=True)
        log_image(trainer, "lr_find/plot", result.plot_path, step=0, caption=result.explain())
    if opts.apply and result.suggestion is not None:
        print(f"training with the suggested lr={result.suggestion:.2e}", flush=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return run(cfg)
    except BpkitConfigError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep reports the failed job and goes on with the others
        print(f"bpkit-train: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    _hydra_main()


if __name__ == "__main__":
    main()
