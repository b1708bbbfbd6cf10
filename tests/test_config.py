import pytest
import torch
from omegaconf import OmegaConf

from bpkit.errors import BpkitConfigError
from bpkit.train import build
from tests._hydra import compose_train, options

# a model that fits each data set, and a data set that fits each model
MODEL_FOR_DATA = {"digits": [], "regression": [], "multilabel": [], "adding": ["model=rnn"],
                  "copy": ["model=rnn", "model.output=all"], "charlm": ["model=rnn", "model.output=all"],
                  "streaming_text": ["model=rnn", "model.output=all"]}
DATA_FOR_MODEL = {"mlp": [], "resnet": [], "rnn": ["data=adding"], "deep_linear": []}


def _cases():
    cases = []
    for group in ("optimizer", "scheduler", "callbacks", "clipping", "logger", "trainer", "debug"):
        cases += [[f"{group}={name}"] for name in options(group)]
    cases += [[f"data={name}"] + MODEL_FOR_DATA[name] for name in options("data")]
    cases += [[f"model={name}"] + DATA_FOR_MODEL[name] for name in options("model")]
    cases += [[f"recipe={name}"] for name in options("recipe")]
    return cases


@pytest.mark.parametrize("overrides", _cases(), ids=lambda o: " ".join(o))
def test_every_config_composes_and_instantiates(overrides, tmp_path):
    cfg = compose_train(overrides, str(tmp_path))
    OmegaConf.resolve(cfg)
    if overrides in (["trainer=gpu"], ["recipe=mixed_precision"]) and not torch.cuda.is_available():
        with pytest.raises(BpkitConfigError, match=r"trainer='lightning.pytorch.Trainer'.*(No supported gpu backend|not available|CUDA)"):
            build(cfg)
        return
    parts = build(cfg)
    task, dm = parts["task"], parts["datamodule"]
    x, y = next(iter(dm.train_dataloader()))
    loss = task.compute_loss(task(x), y)
    assert torch.isfinite(loss)
    assert parts["trainer"] is not None


def test_callbacks_are_a_keyed_dict_that_can_lose_one(tmp_path):
    cfg = compose_train([], str(tmp_path))
    assert "checkpoint" in cfg.callbacks and "run_record" in cfg.callbacks
    cfg = compose_train(["~callbacks.checkpoint"], str(tmp_path))
    assert "checkpoint" not in cfg.callbacks and "run_record" in cfg.callbacks


def test_one_lr_series_by_default_lr_monitor_on_request(tmp_path):
    """RunRecord logs lr/group<j>; Lightning's LearningRateMonitor would log a second series (and momentum on the
    learning-rate axis): not in the defaults, still there to add."""
    assert "lr_monitor" not in compose_train([], str(tmp_path)).callbacks
    cfg = compose_train(["callbacks=[default,lr_monitor]"], str(tmp_path))
    assert {"lr_monitor", "run_record", "checkpoint"} <= set(cfg.callbacks)


@pytest.mark.parametrize("preset, expected", [
    ("fdr", {"fast_dev_run": 1}),
    ("overfit", {"overfit_batches": 1, "max_epochs": 40}),
    ("limit", {"limit_train_batches": 8, "limit_val_batches": 2, "limit_test_batches": 2, "max_epochs": 2}),
    ("profiler", {"max_epochs": 1, "limit_train_batches": 20}),
])
def test_debug_presets_set_the_trainer(preset, expected, tmp_path):
    from lightning.pytorch.profilers import PassThroughProfiler, SimpleProfiler

    trainer = build(compose_train([f"debug={preset}", "logger=none"], str(tmp_path)))["trainer"]
    assert {k: getattr(trainer, k) for k in expected} == expected
    if preset == "profiler":
        assert isinstance(trainer.profiler, SimpleProfiler) and trainer.profiler.dirpath == str(tmp_path)
    else:
        assert isinstance(trainer.profiler, PassThroughProfiler)
    default = build(compose_train(["logger=none"], str(tmp_path)))["trainer"]
    assert default.fast_dev_run is False and default.overfit_batches == 0.0


def test_recipe_is_global_and_overridable(tmp_path):
    cfg = compose_train(["recipe=vanishing_depth", "model.depth=6"], str(tmp_path))
    assert cfg.model.activation == "sigmoid" and cfg.model.depth == 6 and cfg.group == "vanishing_depth"


@pytest.mark.parametrize("overrides, match", [
    (["model.depth=-1"], r"model\.depth=-1 is invalid: expected an integer >= 1"),
    (["model.width=0"], r"model\.width=0 is invalid"),
    (["model=rnn", "data=adding", "model.hidden_size=0"], r"model\.hidden_size=0"),
    (["model.activation=swish"], r"model\.activation='swish'.*relu, leaky_relu, gelu, tanh, sigmoid"),
    (["task.loss=bce"], r"task\.loss='bce'.*multiclass targets with 10 classes: cross_entropy"),
    (["task.loss=hinge"], r"task\.loss='hinge'.*mse, mae, bce, cross_entropy, multilabel_bce"),
    (["data=charlm", "model=rnn", "model.output=all", "data.text_file=/nonexistent/t.txt"],
     r"data\.text_file='/nonexistent/t.txt'.*existing"),
    (["model=resnet", "data=adding"], r"model='ResNet'.*takes 'image' inputs"),
    (["data=copy", "model=rnn"], r"model\.output='last'.*all"),
    (["optimizer.lr=-0.1"], r"optimizer=.*lr.*-0\.1"),
    (["data.batch_size=0"], r"data\.batch_size=0"),
    (["seed=-5"], r"seed=-5"),
    (["scheduler=warmup_cosine", "scheduler.warmup_ratio=null", "scheduler.warmup_steps=100000"],
     r"scheduler\.warmup_steps=100000.*fewer warm-up steps than the 500 steps"),
    (["scheduler=cosine", "scheduler.min_lr_ratio=2"], r"scheduler\.min_lr_ratio=2"),
    (["lr_find=true", "lr_finder.rule=valley"], r"lr_finder\.rule='valley'"),
    (["task.tbptt_steps=10"], r"task\.tbptt_steps=10.*does not read sequences"),
    (["model=rnn", "data=adding", "task.tbptt_steps=0"], r"tbptt_steps=0|truncated_bptt_steps=0"),
])
def test_bad_configs_fail_early_naming_key_and_value(overrides, match, tmp_path):
    cfg = compose_train(overrides, str(tmp_path))
    with pytest.raises(BpkitConfigError, match=match):
        build(cfg)
