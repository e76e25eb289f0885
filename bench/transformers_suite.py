"""transformers' own model tests with our kernels plugged in: a pytest plugin and a junit-xml differ.

transformers' tests/models/{unispeech,unispeech_sat,wav2vec2,hubert} stay outside this repository (they
are transformers' code); ``make transformers-tests TRANSFORMERS_TESTS=<dir with tests/> MODE=...`` runs
them with this plugin (``-p bench.transformers_suite --kernels-mode MODE``):
- ``plain``: nothing of ours is imported (the baseline);
- ``patched``: every model of the four types the tests build is passed through ``patch_model`` once its
  outermost constructor returns (a head's inner base model is patched with the head, not on its own);
- ``triton``: every such model whose config asks for no attention implementation is built with
  ``attn_implementation="triton"``; a test that asks for one (eager, sdpa) gets what it asked for.
Triton runs under its interpreter on a CPU machine. ``--kernels-log FILE`` appends each test's outcome to
FILE (json lines) as it finishes, for a run stopped before its junit xml is written.
``python -m bench.transformers_suite diff A B`` (junit xml or json lines) lists the tests that pass in A and
do not in B, with B's message.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import threading
import xml.etree.ElementTree as ET

MODES = ("plain", "patched", "triton")
MODEL_MODULES = ("unispeech", "unispeech_sat", "wav2vec2", "hubert")
_log_path = [None]  # --kernels-log
_depth = threading.local()  # nesting of wrapped constructors: a head builds its base model inside its own


def pytest_addoption(parser):
    parser.addoption("--kernels-mode", choices=MODES, default="plain",
                     help="plain: transformers alone; patched: patch_model on every model built; "
                          'triton: attn_implementation="triton" where the test asks for none')
    parser.addoption("--kernels-log", default=None, help="append each test's outcome to this json-lines file")


def pytest_configure(config):
    mode = config.getoption("--kernels-mode")
    _log_path[0] = config.getoption("--kernels-log")
    if mode == "plain":
        return
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit import
    import unispeech_kernels
    for cls in _model_classes():
        cls.__init__ = _wrapped_init(cls.__init__, mode, unispeech_kernels.patch_model)


def pytest_runtest_logreport(report):
    path = _log_path[0]
    failed_setup = report.when == "setup" and not report.passed
    if path is None or not (report.when == "call" or failed_setup):
        return
    outcome = {"failed": "error" if failed_setup and report.failed else "failed"}.get(report.outcome, report.outcome)
    message = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
    if report.failed:
        message = str(getattr(report.longrepr, "reprcrash", None) and report.longrepr.reprcrash.message)
    test_id = report.nodeid.replace("/", ".").replace(".py::", ".", 1)
    with open(path, "a") as f:
        f.write(json.dumps({"id": test_id, "outcome": outcome, "message": message[:300],
                            "seconds": round(report.duration, 2)}) + "\n")


def _model_classes():
    """Every PreTrainedModel subclass defined in the four model families' modeling modules."""
    from transformers import PreTrainedModel
    for name in MODEL_MODULES:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj.__module__ == module.__name__:
                yield obj


def _wrapped_init(init, mode, patch_model):
    @functools.wraps(init)
    def __init__(self, config, *args, **kwargs):
        outermost = getattr(_depth, "n", 0) == 0
        if outermost and mode == "triton" and config._attn_implementation_internal is None:
            config._attn_implementation = "triton"
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            init(self, config, *args, **kwargs)
        finally:
            _depth.n -= 1
        if outermost and mode == "patched" and _depth.n == 0:
            patch_model(self)
    return __init__


def outcomes(path: str) -> dict:
    """{test id: (outcome, message)} of a junit xml or --kernels-log file; outcome: passed, failed, error or
    skipped."""
    result = {}

    def record(test_id, outcome, message):  # subtests report under their test's id: the last in _RANK wins
        parts = test_id.split(".")  # ids from the folder holding tests/, whatever pytest's rootdir was
        test_id = ".".join(parts[parts.index("tests"):]) if "tests" in parts else test_id
        if test_id not in result or _RANK[outcome] > _RANK[result[test_id][0]]:
            result[test_id] = (outcome, message)

    if not path.endswith(".xml"):
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                record(entry["id"], entry["outcome"], entry["message"])
        return result
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
                break
        record(test_id, outcome, message)
    return result


_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}  # junit xml too keeps a skipped subtest


def counts(results: dict) -> dict:
    tally = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for outcome, _ in results.values():
        tally[outcome] += 1
    return tally


def main(argv) -> int:
    if len(argv) < 3 or argv[0] != "diff":
        print("usage: python -m bench.transformers_suite diff BASELINE.xml OTHER.xml [...]", file=sys.stderr)
        return 2
    baseline = outcomes(argv[1])
    print(f"{argv[1]}: {counts(baseline)}")
    for path in argv[2:]:
        other = outcomes(path)
        worse = {t: other[t] for t in sorted(other) if baseline.get(t, ("?",))[0] == "passed"
                 and other[t][0] != "passed"}
        better = [t for t in sorted(other) if other[t][0] == "passed" and baseline.get(t, ("?",))[0] != "passed"]
        print(f"\n{path}: {counts(other)}; passed in the baseline, not here: {len(worse)}; "
              f"the reverse: {len(better)}")
        for test_id, (outcome, message) in worse.items():
            print(f"  {outcome:7s} {test_id}\n          {message}")
        for test_id in better:
            print(f"  better  {test_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
