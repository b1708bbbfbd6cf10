"""The one output path of every bpkit callback.

A callback reads its statistics back to the host once per log interval and hands plain Python
numbers and numpy histograms to :func:`log_scalars`, :func:`log_histograms` and
:func:`log_alert`. These fan out to every logger of the Trainer (scalars to any logger,
histograms to W&B and TensorBoard) and append to the local run record
(``<log dir>/bpkit_record.jsonl``, in the format :mod:`bpkit.record` defines) that ``bpkit-report`` reads.
Only rank 0 writes. A logger that raises (W&B unreachable, disk full) never stops training: the problem is
warned about once and that logger is skipped for the rest of the run.

Loggers are told apart by type (``isinstance`` against ``lightning.pytorch.loggers``' classes), so a subclass of
``WandbLogger`` or ``TensorBoardLogger`` gets the histograms, images, tables and ``wandb.alert`` its base class gets.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np

from bpkit.alert import Alert
from bpkit.record import ENTRY_ALERT, ENTRY_HISTOGRAMS, ENTRY_IMAGE, ENTRY_SCALARS, RECORD_NAME, append_entry

__all__ = ["RECORD_NAME", "is_csv", "is_tensorboard", "is_wandb", "log_alert", "log_histograms", "log_image",
           "log_record", "log_scalars", "log_table", "record_path", "wandb_alert", "wandb_is_online", "wandb_loggers"]

# per Trainer (held weakly): the outputs that failed once and are skipped for the rest of its runs
_BROKEN: "WeakKeyDictionary[Any, set[Any]]" = WeakKeyDictionary()


def _is_rank_zero(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_global_zero", True))


@functools.lru_cache(maxsize=None)
def _logger_class(name: str) -> type | None:
    """``lightning.pytorch.loggers.<name>``, or ``None`` where it cannot be imported."""
    try:
        from lightning.pytorch import loggers
    except ImportError:  # pragma: no cover - Lightning is a dependency; an odd install must not break the sink
        return None
    cls = getattr(loggers, name, None)
    return cls if isinstance(cls, type) else None


def _is_logger(logger: Any, name: str) -> bool:
    # the real class (and so any subclass of it); a stand-in of that exact class name (a test double, a proxy that
    # only mimics the logger) is taken at its word, as before
    cls = _logger_class(name)
    return (cls is not None and isinstance(logger, cls)) or type(logger).__name__ == name


def is_wandb(logger: Any) -> bool:
    """Whether ``logger`` is a Lightning ``WandbLogger`` (or a subclass of it)."""
    return _is_logger(logger, "WandbLogger")


def is_tensorboard(logger: Any) -> bool:
    """Whether ``logger`` is a Lightning ``TensorBoardLogger`` (or a subclass of it)."""
    return _is_logger(logger, "TensorBoardLogger")


def is_csv(logger: Any) -> bool:
    """Whether ``logger`` is a Lightning ``CSVLogger`` (or a subclass of it)."""
    return _is_logger(logger, "CSVLogger")


def record_path(trainer: Any) -> str:
    """Where this run's local record lives: the first logger's directory, else ``default_root_dir``.

    Not ``trainer.log_dir``: that broadcasts (a collective) and only rank 0 gets here.
    """
    loggers = getattr(trainer, "loggers", None) or []
    base = None
    if loggers:
        first = loggers[0]
        if is_csv(first) or is_tensorboard(first):
            base = getattr(first, "log_dir", None)
        else:
            base = getattr(first, "save_dir", None)
    return os.path.join(base or trainer.default_root_dir, RECORD_NAME)


def _broken(trainer: Any) -> set[Any]:
    try:
        return _BROKEN.setdefault(trainer, set())
    except TypeError:  # an object that cannot be weakly referenced (a test double): no memory
        return set()


def _safe(trainer: Any, target: Any, what: str, fn) -> None:
    # a logger is known by its id (it lives as long as the Trainer), the record by ("record", path)
    key = target if isinstance(target, tuple) else id(target)
    broken = _broken(trainer)
    if key in broken:
        return
    try:
        fn()
    except Exception as exc:  # a broken logger must not kill training
        broken.add(key)
        warnings.warn(f"bpkit: {what} failed and is skipped for the rest of the run: {exc!r}", RuntimeWarning,
                      stacklevel=3)


_CHECKED_ENDS: set[str] = set()  # record files whose last line was checked for completeness in this process


def _append_record(trainer: Any, entry_type: str, step: int, data: dict[str, Any]) -> None:
    path = record_path(trainer)

    def write() -> None:
        # a run killed mid-write left a partial last line: the first write of this process ends it, so this run's
        # first entry stays whole. The file is opened with this module's ``open`` (a test stands in a full disk).
        check_end = path not in _CHECKED_ENDS
        _CHECKED_ENDS.add(path)
        append_entry(path, entry_type, step, data, check_end=check_end, opener=open)

    _safe(trainer, ("record", path), f"writing the bpkit record {path}", write)


def log_scalars(trainer: Any, metrics: dict[str, float], step: int) -> None:
    """Send host-side scalars to every logger and to the run record."""
    if not metrics or not _is_rank_zero(trainer):
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in getattr(trainer, "loggers", []):
        _safe(trainer, logger, f"{type(logger).__name__}.log_metrics", lambda lg=logger: lg.log_metrics(clean, step))
    _append_record(trainer, ENTRY_SCALARS, step, clean)


def log_histograms(trainer: Any, hists: dict[str, tuple[np.ndarray, np.ndarray]], step: int) -> None:
    """Send histograms ``{key: (counts, edges)}`` (len(edges) == len(counts) + 1) to loggers and the record."""
    if not hists or not _is_rank_zero(trainer):
        return
    for logger in getattr(trainer, "loggers", []):
        if is_wandb(logger):
            _safe(trainer, logger, "W&B histogram logging", lambda lg=logger: _wandb_histograms(lg, hists, step))
        elif is_tensorboard(logger):
            _safe(trainer, logger, "TensorBoard histogram logging", lambda lg=logger: _tb_histograms(lg, hists, step))
    edges: dict[int, list[float]] = {}  # the histograms of one monitor share one edges array: converted once
    data = {k: {"counts": np.asarray(c).tolist(), "edges": edges[id(e)] if id(e) in edges else
                edges.setdefault(id(e), np.asarray(e).tolist())} for k, (c, e) in hists.items()}
    _append_record(trainer, ENTRY_HISTOGRAMS, step, data)


def log_alert(trainer: Any, alert: Alert, warn: bool = True) -> None:
    """Warn with the alert's plain message (unless ``warn=False``) and write it to the run record (rank 0 only)."""
    if not _is_rank_zero(trainer):
        return
    if warn:
        warnings.warn(str(alert), UserWarning, stacklevel=3)
    _append_record(trainer, ENTRY_ALERT, alert.step, alert.to_dict())


def log_record(trainer: Any, entry_type: str, step: int, data: dict[str, Any]) -> None:
    """Append any other JSON-serialisable entry (gradient-check tables, run metadata) to the record; ``entry_type``
    is one of :data:`bpkit.record.ENTRY_TYPES`."""
    if _is_rank_zero(trainer):
        _append_record(trainer, entry_type, step, data)


def _finite_edges(edges: np.ndarray) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64).copy()
    if not math.isfinite(e[0]):
        e[0] = e[1] - (e[2] - e[1] if len(e) > 2 else 1.0)
    if not math.isfinite(e[-1]):
        e[-1] = e[-2] + (e[-2] - e[-3] if len(e) > 2 else 1.0)
    return e


def _wandb_histograms(logger: Any, hists: dict[str, tuple[np.ndarray, np.ndarray]], step: int) -> None:
    import wandb

    payload: dict[str, Any] = {
        k: wandb.Histogram(np_histogram=(np.asarray(c, dtype=np.float64), _finite_edges(e))) for k, (c, e) in hists.items()
    }
    payload["trainer/global_step"] = step
    logger.experiment.log(payload)


def _tb_histograms(logger: Any, hists: dict[str, tuple[np.ndarray, np.ndarray]], step: int) -> None:
    writer = logger.experiment
    for key, (counts, edges) in hists.items():
        counts = np.asarray(counts, dtype=np.float64)
        edges = _finite_edges(edges)
        num = counts.sum()
        if num <= 0:
            continue
        centers = (edges[:-1] + edges[1:]) / 2
        writer.add_histogram_raw(key, min=float(edges[0]), max=float(edges[-1]), num=int(num),
                                 sum=float((centers * counts).sum()), sum_squares=float((centers**2 * counts).sum()),
                                 bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step)


def log_image(trainer: Any, key: str, path: str, step: int = 0, caption: str | None = None) -> None:
    """Log a saved PNG (a plot) to the loggers that show images (W&B, TensorBoard) and note it in the record."""
    if not _is_rank_zero(trainer):
        return
    for logger in getattr(trainer, "loggers", []):
        if is_wandb(logger):
            _safe(trainer, logger, "W&B image logging",
                  lambda lg=logger: lg.log_image(key=key, images=[path], step=step,
                                                 caption=[caption] if caption else None))
        elif is_tensorboard(logger):
            def tb(lg=logger) -> None:
                import matplotlib.image as mpimg

                img = mpimg.imread(path)
                lg.experiment.add_image(key, img[..., :3], global_step=step, dataformats="HWC")

            _safe(trainer, logger, "TensorBoard image logging", tb)
    _append_record(trainer, ENTRY_IMAGE, step, {"key": key, "path": str(path)})


def wandb_loggers(trainer: Any) -> list[Any]:
    """The Trainer's W&B loggers (``WandbLogger`` and its subclasses), in order."""
    return [lg for lg in getattr(trainer, "loggers", None) or [] if is_wandb(lg)]


def log_table(trainer: Any, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> int:
    """Log a table (``wandb.Table``) to every W&B logger of the Trainer (rank 0 only; other loggers have no
    tables). A failing W&B is warned about once and skipped. Returns to how many loggers it went."""
    if not _is_rank_zero(trainer):
        return 0
    sent = 0
    for logger in wandb_loggers(trainer):
        ok = []

        def table(lg=logger) -> None:
            import wandb

            payload: dict[str, Any] = {key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}
            if step is not None:
                payload["trainer/global_step"] = int(step)
            lg.experiment.log(payload)
            ok.append(True)

        _safe(trainer, logger, f"W&B table logging ({key})", table)
        sent += bool(ok)
    return sent


def wandb_is_online(logger: Any) -> bool:
    """Whether a W&B logger's run talks to the server (never ``offline``, ``disabled`` or ``dryrun``)."""
    run = logger.experiment
    settings = getattr(run, "settings", None)
    return not (getattr(run, "offline", True) or getattr(settings, "mode", None) in ("offline", "disabled", "dryrun"))


def wandb_alert(trainer: Any, title: str, text: str, level: str = "WARN") -> int:
    """``wandb.alert`` on every online W&B run of the Trainer (never in offline mode; rank 0 only). A failing W&B
    is warned about once and skipped. Returns on how many runs the alert was sent."""
    if not _is_rank_zero(trainer):
        return 0
    sent = 0
    for logger in wandb_loggers(trainer):
        key = ("wandb.alert", id(logger))
        if id(logger) in _broken(trainer):  # the logger failed elsewhere (_safe skips a failed `key` by itself)
            continue
        ok = []

        def alert(lg=logger) -> None:
            if wandb_is_online(lg):
                lg.experiment.alert(title=title, text=text, level=level)
                ok.append(True)

        _safe(trainer, key, "wandb.alert", alert)
        sent += bool(ok)
    return sent
