"""The `>>>` examples in peftclip's docstrings run and print what they say, on the tiny base, in a temporary folder.

Examples that need a real pretrained model, the network, or a folder the reader trained or owns carry
`# doctest: +SKIP`; every other example runs here.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import peftclip

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _runnable_examples(name: str) -> int:
    """How many examples of module `name` are not skipped."""
    tests = doctest.DocTestFinder().find(importlib.import_module(name))
    return sum(not example.options.get(doctest.SKIP) for test in tests for example in test.examples)


MODULES = [info.name for info in pkgutil.walk_packages(peftclip.__path__, "peftclip.")]
WITH_EXAMPLES = sorted(name for name in MODULES if _runnable_examples(name))


def test_examples_are_found():
    assert {"peftclip.evaluate", "peftclip.io", "peftclip.models", "peftclip.synthetic"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples write relative paths
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PEFTCLIP_CACHE", str(tmp_path / "cache"))
    result = doctest.testmod(importlib.import_module(name), optionflags=FLAGS)
    assert result.attempted == _runnable_examples(name)
    assert result.failed == 0, capsys.readouterr().out
