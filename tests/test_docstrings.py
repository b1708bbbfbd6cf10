"""The runnable examples in the docstrings of the pure-torch engines run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "bpkit.stats.grads", "bpkit.stats.norms", "bpkit.stats.histograms", "bpkit.stats.readback",
    "bpkit.stats.step_rows", "bpkit.stats.updates",
    "bpkit.detect.exploding", "bpkit.detect.nonfinite", "bpkit.detect.spike", "bpkit.detect.vanishing",
    "bpkit.detect.activations",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
