"""Every docstring example (``>>>`` lines) of every module under ``bpkit/`` runs and prints what it says.

The modules are found by walking the package (``pkgutil.walk_packages``), so a new module's examples
are run without anyone adding it to a list. A module without examples passes; a module that cannot be
imported, or whose example raises or prints something else, fails with doctest's report.
"""

import doctest
import importlib
import io
import pkgutil

import pytest

import bpkit

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _module_names() -> list[str]:
    errors: list[str] = []
    names = [info.name for info in pkgutil.walk_packages(bpkit.__path__, prefix="bpkit.", onerror=errors.append)]
    # a subpackage whose __init__ fails to import is reported by walk_packages through onerror; keep it as a
    # name so that its test fails on the import with the real traceback
    return sorted(set(["bpkit", *names, *errors]))


MODULES = _module_names()


def _run_examples(name: str) -> tuple[int, int, str]:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out = io.StringIO()
    for test in finder.find(module, name, globs=vars(module).copy()):
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    return result.attempted, result.failed, out.getvalue()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    attempted, failed, report = _run_examples(name)
    assert failed == 0, f"{failed} of {attempted} docstring example(s) of {name} failed:\n{report}"


def test_the_walk_finds_the_package():
    """The discovery is not vacuous: it sees the engines, the callbacks and their examples."""
    for name in ["bpkit.stats.norms", "bpkit.detect.vanishing", "bpkit.clip.zclip", "bpkit.callbacks.gradient_monitor",
                 "bpkit.train", "bpkit.report.cli"]:
        assert name in MODULES
    assert not any(name.endswith("__main__") for name in MODULES)
    assert _run_examples("bpkit.stats.norms")[0] > 0


def test_a_failing_example_fails(tmp_path, monkeypatch):
    """The runner reports an example whose output differs (a module written here, never in bpkit/)."""
    (tmp_path / "bpkit_doctest_probe_mod.py").write_text('def f():\n    """\n    >>> 1 + 1\n    3\n    """\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    attempted, failed, report = _run_examples("bpkit_doctest_probe_mod")
    assert (attempted, failed) == (1, 1)
    assert "Expected:\n    3\nGot:\n    2" in report
