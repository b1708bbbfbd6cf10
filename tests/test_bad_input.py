"""Bad input, systematically (hypothesis): for every argument of every bpkit callback and for the main Hydra
overrides of ``bpkit-train``, an invalid value raises :class:`BpkitConfigError` naming the argument and the
value (nothing crashes deep inside with a TypeError), and a valid value constructs."""

import math
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpkit.callbacks import ActivationMonitor, GradientCheck, GradientClipping, GradientMonitor
from bpkit.callbacks.run_record import RunRecord
from bpkit.errors import BpkitConfigError

# ----------------------------------------------------------------------------- value strategies
words = st.text(string.ascii_letters + "_", min_size=1, max_size=6)
junk = st.one_of(words, st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(words, st.integers(),
                                                                                          max_size=1))
nan = st.just(float("nan"))


def ints(minimum, optional=False):
    bad = st.one_of(st.integers(max_value=minimum - 1), st.floats(0.5, 9.5).filter(lambda f: f != int(f)),
                    st.booleans(), junk, nan)
    good = st.integers(minimum, 10_000)
    return (st.one_of(good, st.none()) if optional else good), (bad if optional else st.one_of(bad, st.none()))


def floats(low=None, high=None, low_open=False, high_open=False, optional=False):
    lo = -1e6 if low is None else low
    hi = 1e6 if high is None else high
    good = st.floats(lo, hi, exclude_min=low_open, exclude_max=high_open, allow_nan=False, allow_infinity=False)
    bad = [nan, junk, st.booleans()]
    if low is not None:
        bad.append(st.floats(-1e6, low, exclude_max=not low_open, allow_nan=False) if low > -1e6 else st.nothing())
    if high is not None:
        bad.append(st.floats(high, 1e6, exclude_min=not high_open, allow_nan=False))
    bad = st.one_of(*bad)
    return (st.one_of(good, st.none()) if optional else good), (bad if optional else st.one_of(bad, st.none()))


def choice(options):
    return st.sampled_from(options), st.one_of(words.filter(lambda w: w not in options), st.integers(), st.none())


def flag():
    return st.booleans(), st.one_of(words, st.integers(2, 9), st.none(), st.lists(st.booleans(), min_size=1))


def pair(low=-20.0, high=20.0):
    def ordered(v):
        return (min(v), max(v)) if min(v) < max(v) else (v[0], v[0] + 1.0)

    good = st.tuples(st.floats(low, high), st.floats(low, high)).map(ordered)
    bad = st.one_of(st.tuples(st.floats(low, high)).map(lambda v: (v[0], v[0])),  # low == high
                    st.tuples(st.floats(0, high), st.floats(1, 5)).map(lambda v: (v[0] + v[1], v[0])),  # reversed
                    st.floats(low, high), words, st.tuples(words, words), st.just((1.0, 2.0, 3.0)), st.none(),
                    st.just((float("nan"), 1.0)))
    return good, bad


def globs():
    good = st.one_of(st.none(), st.just("*"), st.lists(st.just("*"), min_size=1, max_size=2))
    bad = st.one_of(st.integers(), st.just(""), st.lists(st.integers(), min_size=1, max_size=2), st.just([""]),
                    st.dictionaries(words, words, min_size=1, max_size=1))
    return good, bad


def detector(options):
    """True/False/None or a mapping of a detector's options."""
    good = st.one_of(st.booleans(), st.none(), st.just({}))
    bad = st.one_of(words, st.integers(2, 9), st.dictionaries(words.filter(lambda w: w not in options),
                                                              st.integers(), min_size=1, max_size=1))
    return good, bad


# ----------------------------------------------------------------------------- every argument of every callback
ARGS = {
    GradientMonitor: {
        "log_every_n_steps": ints(0, optional=True), "per_layer": flag(), "histograms": flag(),
        "update_ratio": flag(), "include": globs(), "exclude": globs(), "group_by": choice(["parameter", "module"]),
        "on_nonfinite": choice(["warn", "skip", "stop", "raise"]),
        "on_exploding": choice(["warn", "skip", "stop", "raise"]),
        "vanishing": detector(["rel_max", "rel_weight", "patience"]),
        "exploding": detector(["factor", "max_norm", "window", "warmup", "ema"]),
        "spike": detector(["z", "alpha", "warmup", "min_std"]), "check_every_n_steps": ints(1),
        "histogram_range": pair(), "bins_per_decade": ints(1), "histogram_samples": ints(1, optional=True),
    },
    ActivationMonitor: {
        "modules": (st.one_of(st.just("auto"), st.just("net.*"), st.lists(st.just("a*"), min_size=1, max_size=2)),
                    st.one_of(st.just(""), st.just([]), st.integers(), st.lists(st.integers(), min_size=1),
                              st.none(), st.just([""]))),
        "log_every_n_steps": ints(0, optional=True), "histograms": flag(), "bins": ints(1),
        "hist_range": pair(), "dead_threshold": floats(0.0, 1.0, high_open=True),
        "saturation_threshold": floats(0.5, 1.0, low_open=True, high_open=True),
        "saturated_fraction": floats(0.0, 1.0, high_open=True), "patience": ints(1), "gradients": flag(),
        "histogram_samples": ints(1, optional=True),
    },
    RunRecord: {"log_every_n_steps": ints(0, optional=True), "gradient_flow_image": flag(), "wandb_alerts": flag()},
    GradientCheck: {
        "mode": choice(["directional", "full"]), "every_n_steps": ints(1, optional=True),
        "n_directions": ints(1), "max_elements": ints(1), "eps": floats(0.0, low_open=True, optional=True),
        "rtol": floats(0.0, low_open=True, optional=True), "atol": floats(0.0, optional=True),
        "dtype": choice(["float64", "float32"]), "on_failure": choice(["warn", "raise"]),
        "batch_independence": flag(), "train": flag(), "seed": ints(0),
        "max_seconds": floats(0.0, low_open=True, optional=True),
        "progress": (st.sampled_from([True, False, "auto"]), st.one_of(words.filter(lambda w: w != "auto"),
                                                                       st.integers(2, 9), st.none())),
    },
}
CLIP_ARGS = {
    "norm": {"max_norm": floats(0.0, low_open=True),
             "norm_type": (st.one_of(floats(1.0)[0], st.sampled_from(["inf", "Infinity"])),  # "inf": the max norm
                           floats(1.0)[1].filter(lambda v: str(v).lower() not in ("inf", "infinity")))},
    "value": {"clip_value": floats(0.0, low_open=True)},
    "agc": {"clip_factor": floats(0.0, low_open=True), "eps": floats(0.0)},
    "autoclip": {"percentile": floats(0.0, 100.0), "history": ints(1)},
    "zclip": {"alpha": floats(0.0, 1.0, True, True), "z_thresh": floats(0.0, low_open=True), "warmup_steps": ints(1),
              "mode": choice(["zscore", "percentile"]), "clip_option": choice(["adaptive_scaling", "mean"]),
              "max_norm": floats(0.0, low_open=True, optional=True), "eps": floats(0.0)},
    "skip": {"z_thresh": floats(0.0, low_open=True), "alpha": floats(0.0, 1.0, True, True),
             "warmup_steps": ints(1), "skip_nonfinite": flag(), "eps": floats(0.0)},
}
CASES = [(cls.__name__, cls, {}, arg, strategies) for cls, args in ARGS.items() for arg, strategies in args.items()]
CASES += [(f"GradientClipping[{policy}]", GradientClipping, {"policy": policy}, arg, strategies)
          for policy, args in CLIP_ARGS.items() for arg, strategies in args.items()]
CASES += [("GradientClipping", GradientClipping, {}, "policy", choice(list(CLIP_ARGS))),
          ("GradientClipping", GradientClipping, {}, "log_every_n_steps", ints(0, optional=True))]
IDS = [f"{name}.{arg}" for name, _, _, arg, _ in CASES]
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _named(err: BpkitConfigError, arg: str) -> bool:
    return arg in str(err)


@pytest.mark.parametrize("name, cls, fixed, arg, strategies", CASES, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_invalid_argument_raises_naming_it(name, cls, fixed, arg, strategies, data):
    value = data.draw(strategies[1], label=arg)
    with pytest.raises(BpkitConfigError) as info:
        cls(**fixed, **{arg: value})
    assert _named(info.value, arg), f"{name}({arg}={value!r}): {info.value}"
    assert "is invalid: expected" in str(info.value)


@pytest.mark.parametrize("name, cls, fixed, arg, strategies", CASES, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_valid_argument_constructs(name, cls, fixed, arg, strategies, data):
    value = data.draw(strategies[0], label=arg)
    cls(**fixed, **{arg: value})


@SETTINGS
@given(policy=st.sampled_from(sorted(CLIP_ARGS)), key=words, value=st.integers())
def test_unknown_policy_argument_is_named(policy, key, value):
    if key in CLIP_ARGS[policy] or key in ("exclude", "log_every_n_steps", "policy"):
        return
    with pytest.raises(BpkitConfigError, match=rf"{policy}\.{key}=.*arguments of the '{policy}' policy"):
        GradientClipping(policy, **{key: value})


@SETTINGS
@given(kind=st.sampled_from(["exploding", "vanishing", "spike"]), value=st.one_of(st.just(-1), st.just(0),
                                                                                  nan, words))
def test_bad_detector_option_is_named_with_its_prefix(kind, value):
    option = {"exploding": "warmup", "vanishing": "patience", "spike": "warmup"}[kind]
    with pytest.raises(BpkitConfigError, match=rf"{kind}\.{option}="):
        GradientMonitor(**{kind: {option: value}})


# ----------------------------------------------------------------------------- the Hydra app's main overrides
def _render(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


OVERRIDES = {  # key -> (extra overrides, valid values, invalid values, words that the message must name)
    "model.depth": ([], st.integers(1, 4), st.one_of(st.integers(-5, 0), words, st.none()), "model.depth"),
    "model.width": ([], st.integers(1, 32), st.one_of(st.integers(-5, 0), words), "model.width"),
    "model.activation": ([], st.sampled_from(["relu", "tanh", "sigmoid", "gelu", "leaky_relu"]),
                         words.filter(lambda w: w not in ("relu", "tanh", "sigmoid", "gelu", "leaky_relu")),
                         "model.activation"),
    "data.batch_size": ([], st.integers(1, 256), st.one_of(st.integers(-5, 0), words), "data.batch_size"),
    "seed": ([], st.integers(0, 10**6), st.one_of(st.integers(-100, -1), words), "seed"),
    "task.loss": ([], st.just("cross_entropy"), words, "task.loss"),
    "optimizer.lr": ([], st.floats(1e-6, 1.0), st.floats(-10, -1e-6), "lr"),
    "callbacks.gradient_monitor.on_nonfinite": ([], st.sampled_from(["warn", "skip", "stop", "raise"]),
                                                words.filter(lambda w: w not in ("warn", "skip", "stop", "raise")),
                                                "callbacks.gradient_monitor.on_nonfinite"),
    "callbacks.gradient_monitor.check_every_n_steps": ([], st.integers(1, 100), st.integers(-5, 0),
                                                       "callbacks.gradient_monitor.check_every_n_steps"),
    "callbacks.activation_monitor.bins": ([], st.integers(1, 128), st.one_of(st.integers(-5, 0), words),
                                          "callbacks.activation_monitor.bins"),
    "callbacks.activation_monitor.dead_threshold": ([], st.floats(0.0, 0.99), st.floats(1.0, 5.0),
                                                    "callbacks.activation_monitor.dead_threshold"),
    "clipping.max_norm": (["clipping=norm"], st.floats(1e-3, 10.0), st.one_of(st.floats(-5, 0), words),
                          "clipping.max_norm"),
    "clipping.alpha": (["clipping=zclip"], st.floats(0.01, 0.99), st.one_of(st.floats(1.0, 3.0), st.floats(-3, 0)),
                       "clipping.alpha"),
    "clipping.policy": (["clipping=norm"], st.just("norm"), words.filter(lambda w: w not in CLIP_ARGS),
                        "clipping.policy"),
}


def _build(tmp_path, overrides):
    from bpkit.train import build
    from tests._hydra import compose_train

    return build(compose_train([*overrides, "logger=none", "trainer.enable_progress_bar=false"], str(tmp_path)))


HYDRA_SETTINGS = settings(max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@HYDRA_SETTINGS
@given(key=st.sampled_from(sorted(OVERRIDES)), data=st.data())
def test_invalid_override_fails_early_naming_it(tmp_path, key, data):
    extra, _, bad, named = OVERRIDES[key]
    value = data.draw(bad, label=key)
    with pytest.raises(BpkitConfigError) as info:
        _build(tmp_path, [*extra, f"{key}={_render(value)}"])
    assert named in str(info.value), f"{key}={value!r}: {info.value}"


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(OVERRIDES)), data=st.data())
def test_valid_override_builds(tmp_path, key, data):
    extra, good, _, _ = OVERRIDES[key]
    value = data.draw(good, label=key)
    parts = _build(tmp_path, [*extra, f"{key}={_render(value)}"])
    assert parts["trainer"] is not None and parts["task"] is not None

