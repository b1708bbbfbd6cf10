"""Defaults have one source: every callback YAML under conf/callbacks/ and every clipping preset under conf/clipping/
agrees with the constructor it targets (inspect.signature), key by key.

A YAML key must be a constructor parameter (no typo slips through as an ignored or failing key), must hold the
constructor's default unless it is in ``NON_DEFAULT`` with the reason, and a bpkit constructor's parameter must
appear in its YAML (so ``callbacks.<name>.<key>=...`` overrides work without ``+``) unless it is in ``OMITTED``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from bpkit.clip import POLICIES
from bpkit.train import config_dir
from tests._hydra import compose_train

CONF = Path(config_dir())
CALLBACK_FILES = sorted(p.stem for p in (CONF / "callbacks").glob("*.yaml"))
CLIPPING_FILES = sorted(p.stem for p in (CONF / "clipping").glob("*.yaml"))
GROUPS = {"default", "none"}  # a defaults list and the empty choice, not callbacks

#: (file, key) -> why the YAML deliberately differs from the constructor's default
NON_DEFAULT: dict[tuple[str, str], str] = {
    ("callbacks/checkpoint", "dirpath"): "checkpoints go into the Hydra run directory, not Lightning's default root",
    ("callbacks/checkpoint", "save_last"): "bpkit-train's resume (ckpt_path=last) needs last.ckpt",
    ("callbacks/checkpoint", "save_top_k"): "no monitored metric to rank by: keep only last.ckpt",
    ("callbacks/lr_monitor", "logging_interval"): "per optimizer step, as run_record's lr/ series",
    ("callbacks/lr_monitor", "log_momentum"): "the reason to add lr_monitor next to run_record is its momentum series",
    ("clipping/agc", "exclude"): "NFNets' practice: leave the classifier (last Linear) unclipped; AGC() itself "
                                 "clips everything it is given",
    ("clipping/zclip_capped", "max_norm"): "the preset's point: the official ZClip code's fixed cap of 1.0",
}

#: (file, parameter) -> why a bpkit constructor parameter is not in its YAML
OMITTED: dict[tuple[str, str], str] = {}


def _plain(value: Any) -> Any:
    """YAML lists as the tuples the signatures use for sequence defaults."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _parameters(cls: type) -> tuple[dict[str, Any], bool]:
    """Named parameters with their defaults, and whether the constructor takes ``**kwargs``."""
    params = inspect.signature(cls).parameters
    named = {k: p.default for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


def _check(where: str, given: dict[str, Any], defaults: dict[str, Any], complete: bool) -> None:
    unknown = sorted(set(given) - set(defaults))
    assert not unknown, f"{where}: keys {unknown} are not parameters of the constructor ({sorted(defaults)})"
    drift = {k: (v, defaults[k]) for k, v in given.items()
             if (where, k) not in NON_DEFAULT and _plain(v) != _plain(defaults[k])}
    assert not drift, f"{where}: YAML value != constructor default (yaml, default): {drift}"
    for key in (k for w, k in NON_DEFAULT if w == where and k in defaults):
        assert key in given and _plain(given[key]) != _plain(defaults[key]), \
            f"{where}: NON_DEFAULT lists {key!r}, which now matches the default: drop it from the allow-list"
    if complete:
        missing = sorted(set(defaults) - set(given) - {k for w, k in OMITTED if w == where})
        assert not missing, f"{where}: constructor parameters {missing} missing from the YAML"


def _callback_nodes(name: str) -> dict[str, Any]:
    cfg = OmegaConf.load(CONF / "callbacks" / f"{name}.yaml")
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("name", [n for n in CALLBACK_FILES if n not in GROUPS])
def test_callback_yaml_matches_constructor(name):
    nodes = _callback_nodes(name)
    assert list(nodes) == [name], f"callbacks/{name}.yaml must hold one node named {name!r} (the keyed dict entry)"
    given = dict(nodes[name])
    cls = get_class(given.pop("_target_"))
    defaults, _ = _parameters(cls)
    bpkit_owned = cls.__module__.startswith("bpkit.")
    _check(f"callbacks/{name}", given, defaults, complete=bpkit_owned)
    if bpkit_owned:  # the YAML builds the callback it describes
        assert isinstance(instantiate(OmegaConf.create(nodes)[name]), cls)


def test_every_bpkit_callback_has_a_yaml():
    import bpkit.callbacks as cbs

    targets = {_callback_nodes(n)[n]["_target_"] for n in CALLBACK_FILES if n not in GROUPS}
    names = [n for n in ("GradientMonitor", "ActivationMonitor", "GradientCheck", "RunRecord") if hasattr(cbs, n)]
    assert {f"bpkit.callbacks.{n}" for n in names} <= targets
    default = OmegaConf.load(CONF / "callbacks" / "default.yaml")
    listed = [d for d in default.defaults if d != "_self_"]
    assert set(listed) <= set(CALLBACK_FILES)


def test_allow_lists_name_real_files():
    files = {f"callbacks/{n}" for n in CALLBACK_FILES} | {f"clipping/{n}" for n in CLIPPING_FILES}
    assert {w for w, _ in NON_DEFAULT} | {w for w, _ in OMITTED} <= files
    assert all(reason.strip() for reason in [*NON_DEFAULT.values(), *OMITTED.values()])


@pytest.mark.parametrize("name", [n for n in CLIPPING_FILES if n != "none"])
def test_clipping_preset_matches_policy_and_callback(name, tmp_path):
    from bpkit.callbacks import GradientClipping

    cfg = compose_train([f"clipping={name}"], str(tmp_path)).clipping  # as bpkit-train composes it (defaults lists)
    given = OmegaConf.to_container(cfg, resolve=False)
    assert get_class(given.pop("_target_")) is GradientClipping
    own, takes_kwargs = _parameters(GradientClipping)
    assert takes_kwargs and set(own) == {"policy", "log_every_n_steps"}
    policy = given.pop("policy")
    assert policy in POLICIES and name.split("_")[0] == policy, f"clipping/{name}: policy {policy!r}"
    _check(f"clipping/{name}", {"log_every_n_steps": given.pop("log_every_n_steps")},
           {"log_every_n_steps": own["log_every_n_steps"]}, complete=True)
    defaults, _ = _parameters(POLICIES[policy])
    _check(f"clipping/{name}", given, defaults, complete=True)
    clip = instantiate(cfg)
    assert isinstance(clip, GradientClipping) and clip.policy == policy


def test_no_clipping_by_default_and_none_is_empty(tmp_path):
    assert OmegaConf.to_container(OmegaConf.load(CONF / "clipping" / "none.yaml")) == {}
    cfg = compose_train([], str(tmp_path))
    assert not cfg.get("clipping")


def test_default_callbacks_compose_to_the_yaml_values(tmp_path):
    """The default config as bpkit-train composes it carries the same values as the files checked above."""
    cfg = compose_train([], str(tmp_path))
    for name, node in cfg.callbacks.items():
        assert OmegaConf.to_container(node, resolve=False) == _callback_nodes(name)[name]


def test_a_typo_would_be_caught():
    """The check itself: a misspelt key, a drifted value and a missing parameter each fail."""
    defaults = {"alpha": 0.97, "z_thresh": 2.5}
    with pytest.raises(AssertionError, match="not parameters"):
        _check("x", {"alpah": 0.97, "z_thresh": 2.5}, defaults, complete=False)
    with pytest.raises(AssertionError, match="!= constructor default"):
        _check("x", {"alpha": 0.9, "z_thresh": 2.5}, defaults, complete=False)
    with pytest.raises(AssertionError, match="missing from the YAML"):
        _check("x", {"alpha": 0.97}, defaults, complete=True)
    _check("x", {"alpha": 0.97, "z_thresh": [2.5][0]}, defaults, complete=True)


def test_a_recurrent_model_brings_the_temporal_monitor_and_it_can_be_removed(tmp_path):
    conf = Path(config_dir())
    model_copy = OmegaConf.load(conf / "model_callbacks" / "temporal_gradient_monitor.yaml")
    assert model_copy == OmegaConf.load(conf / "callbacks" / "temporal_gradient_monitor.yaml")
    rnn = compose_train(["model=rnn", "data=adding"], str(tmp_path))
    assert rnn.callbacks.temporal_gradient_monitor == model_copy.temporal_gradient_monitor
    assert {"gradient_monitor", "activation_monitor", "run_record"} <= set(rnn.callbacks)
    removed = compose_train(["model=rnn", "data=adding", "~callbacks.temporal_gradient_monitor"], str(tmp_path))
    assert "temporal_gradient_monitor" not in removed.callbacks and "gradient_monitor" in removed.callbacks
    assert "temporal_gradient_monitor" not in compose_train([], str(tmp_path)).callbacks
