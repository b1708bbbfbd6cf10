"""``bpkit-train``: the Hydra training app (also ``python -m bpkit.train``).

Composes a model, data, optimizer, scheduler, callbacks, clipping policy, logger and trainer from
``conf/`` (and an experiment from ``recipes/`` with ``recipe=<name>``), validates the choices
before anything runs, trains, prints one summary line and returns the monitored metric (for
sweepers such as Optuna).

Example::

    bpkit-train                                    # MLP on digits, W&B offline
    bpkit-train model=rnn data=adding trainer.max_epochs=3
    bpkit-train -m recipe=vanishing_depth model.depth=4,16 model.activation=sigmoid,relu
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

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


def build(cfg: DictConfig) -> dict[str, Any]:
    """Build every object of a run from a composed config, failing early with clear messages.

    Returns a dict with ``datamodule``, ``task``, ``trainer``, ``monitor`` and ``loss``.
    """
    import lightning.pytorch as pl
    import torch

    from bpkit.schedules import check_schedule_spec
    from bpkit.task import BackpropTask, check_loss_fits

    _check_config(cfg)
    if cfg.get("torch_threads") is not None:
        torch.set_num_threads(check_int("torch_threads", cfg.torch_threads, minimum=1))
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

    loss = cfg.task.loss if cfg.task.loss != "auto" else datamodule.default_loss
    check_loss_fits(loss, datamodule.target_kind, shapes.get("num_classes"))
    metrics = cfg.task.metrics if cfg.task.metrics != "auto" else METRICS_FOR_TARGET[datamodule.target_kind]
    optimizer = _instantiate("optimizer", cfg.optimizer)
    try:  # fail now, not after the sanity check, on a bad learning rate or momentum
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except Exception as exc:
        raise BpkitConfigError("optimizer", OmegaConf.to_container(cfg.optimizer), f"valid arguments: {exc}") from None
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

    callbacks = [_instantiate(f"callbacks.{name}", node) for name, node in (cfg.get("callbacks") or {}).items()
                 if node is not None]
    if cfg.get("clipping"):
        callbacks.append(_instantiate("clipping", cfg.clipping))
    logger = _instantiate("logger", cfg.logger) if cfg.get("logger") else False
    trainer = _instantiate("trainer", cfg.trainer, callbacks=callbacks, logger=logger)
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
    return {"datamodule": datamodule, "task": task, "trainer": trainer, "monitor": monitor, "loss": loss}


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


def _summary(trainer: Any, run_dir: str) -> str:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
    parts = [f"{k}={v:.4g}" for k, v in sorted(metrics.items())]
    line = "bpkit: " + (" ".join(parts) or "no validation metrics") + f" | run: {run_dir}"
    wandb_dir = Path(run_dir) / "wandb"
    runs = sorted(wandb_dir.glob("offline-run-*")) if wandb_dir.is_dir() else []
    if runs:
        line += f" | view: wandb leet {runs[-1]} | upload: wandb sync {runs[-1]}"
    return line


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
    print(OmegaConf.to_yaml(cfg, resolve=False))
    try:
        parts = build(cfg)
    except BpkitConfigError as err:
        # nothing ran: do not leave a directory that looks like a run
        if _looks_unstarted(Path(run_dir)):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise err
    trainer, task, datamodule = parts["trainer"], parts["task"], parts["datamodule"]
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:  # the resolved config becomes the W&B run config
        logger.log_hyperparams(resolved)
    try:
        if cfg.get("lr_find"):
            _run_lr_find(cfg, trainer, task, datamodule, run_dir)
        trainer.fit(task, datamodule=datamodule)
        if cfg.get("test_after_fit"):
            trainer.test(task, datamodule=datamodule)
        value = trainer.callback_metrics.get(parts["monitor"])
        result = float(value) if value is not None else math.nan
        if trainer.is_global_zero:
            if cfg.get("report", True):
                _write_report(run_dir)
            print(_summary(trainer, run_dir), flush=True)
        return result
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

    opts = cfg.lr_finder
    result = find_lr(trainer, task, datamodule, min_lr=opts.min_lr, max_lr=opts.max_lr, num_steps=opts.num_steps,
                     early_stop_threshold=opts.early_stop_threshold, rule=opts.rule, out_dir=run_dir,
                     apply=opts.apply)
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
