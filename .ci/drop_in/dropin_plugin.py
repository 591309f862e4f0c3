"""pytest plugin for the drop-in check: puts adamx's functions where optax's were, and records outcomes.

Loaded by ``run.py`` as ``-p dropin_plugin``, so it runs before any test module is imported.
Environment (set by run.py):
  ADAMX_DROPIN_MODE    "optax" (optax as it is) or "adamx" (adamx's functions in optax's place).
  ADAMX_DROPIN_REPORT  Where to write this run's JSON record.
  ADAMX_DROPIN_SELECT  Optional JSON file: the node ids to run (the rest are deselected).

In both modes every module attribute of optax that is bound to one of optax's Adam-family functions
is rebound to a recording wrapper, so the record says which test called which name (that is how
run.py's ``--discover`` picks the Adam-relevant tests). In "optax" mode the wrapper calls optax's
own function, so behaviour is unchanged; in "adamx" mode it calls adamx's function of that name.
"""

import functools
import importlib
import json
import os
import pkgutil
import sys
import time

NAMES = ("adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax", "scale_by_adam")

_current = {"test": None}  # the node id of the test running now; None during collection
_calls = {}  # node id (or "<collection> file") -> names called
_patched = []  # "module.attr" rebound
_leftovers = []  # references to optax's functions that could not be rebound (partials, containers)
_collect_errors = {}  # collector node id -> one-line reason
_tests = {}  # node id -> {"outcome", "reason", "failures"}


def _record(name):
    key = _current["test"]
    if key is None:
        key = "<collection>"
    _calls.setdefault(key, set()).add(name)


def _wrapper(name, target):
    @functools.wraps(target)
    def call(*args, **kwargs):
        _record(name)
        return target(*args, **kwargs)

    return call


def _import_all_optax():
    """Imports every optax submodule (tests excluded), so every binding exists before patching."""
    import optax

    for info in pkgutil.walk_packages(optax.__path__, "optax."):
        if info.name.endswith("_test") or ".tests" in info.name:
            continue
        try:
            importlib.import_module(info.name)
        except Exception:  # an optional dependency is missing: that module cannot be used anyway
            pass


def _substitute(mode):
    import optax

    _import_all_optax()
    originals = {name: getattr(optax, name) for name in NAMES}
    if mode == "adamx":
        import adamx

        missing = [name for name in NAMES if not hasattr(adamx, name)]
        if missing:
            raise RuntimeError(f"adamx does not export {missing}")
        targets = {name: getattr(adamx, name) for name in NAMES}
    else:
        targets = originals
    wrappers = {name: _wrapper(name, targets[name]) for name in NAMES}
    by_id = {id(fn): name for name, fn in originals.items()}
    for module_name, module in sorted(sys.modules.items()):
        if not (module_name == "optax" or module_name.startswith("optax.")) or module is None:
            continue
        for attr, value in list(vars(module).items()):
            name = by_id.get(id(value))
            if name is not None and value is originals[name]:
                setattr(module, attr, wrappers[name])
                _patched.append(f"{module_name}.{attr}")
            elif isinstance(value, functools.partial) and id(value.func) in by_id:
                if attr not in NAMES:
                    _leftovers.append(f"{module_name}.{attr}: partial of {by_id[id(value.func)]}")
            elif isinstance(value, (dict, list, tuple)) and not attr.startswith("__"):
                items = value.values() if isinstance(value, dict) else value
                try:
                    hits = [by_id[id(v)] for v in items if id(v) in by_id]
                except TypeError:
                    hits = []
                if hits:
                    _leftovers.append(f"{module_name}.{attr}: container holding {hits}")


def pytest_configure(config):
    mode = os.environ.get("ADAMX_DROPIN_MODE", "optax")
    if mode not in ("optax", "adamx"):
        raise RuntimeError(f"ADAMX_DROPIN_MODE must be 'optax' or 'adamx', got {mode!r}")
    config._dropin = {"mode": mode, "deselected": 0, "started": time.time()}
    _substitute(mode)


def pytest_collection_modifyitems(session, config, items):
    path = os.environ.get("ADAMX_DROPIN_SELECT")
    if not path:
        return
    with open(path) as f:
        wanted = set(json.load(f))
    keep = [item for item in items if item.nodeid in wanted]
    drop = [item for item in items if item.nodeid not in wanted]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    config._dropin["deselected"] = len(drop)


def pytest_collectreport(report):
    if report.failed:
        _collect_errors[report.nodeid or "<session>"] = _one_line(report)


def pytest_runtest_logstart(nodeid, location):
    _current["test"] = nodeid


def pytest_runtest_logfinish(nodeid, location):
    _current["test"] = None


def _one_line(report):
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    if crash is not None and crash.message:
        text = crash.message
    elif isinstance(getattr(report, "longrepr", None), tuple):  # a skip: (path, line, reason)
        text = str(report.longrepr[2])
    else:
        text = str(getattr(report, "longrepr", "") or "")
        text = text.strip().splitlines()[-1] if text.strip() else ""
    text = " ".join(text.split())
    return text[:400]


def pytest_runtest_logreport(report):
    entry = _tests.setdefault(report.nodeid, {"outcome": "passed", "reason": "", "failures": []})
    context = getattr(report, "context", None)
    if context is not None and hasattr(context, "kwargs"):  # a subtest's report
        if report.failed:
            entry["failures"].append(f"[{report.head_line}] {_one_line(report)}")
            if entry["outcome"] != "error":
                entry["outcome"] = "failed"
        return
    if report.when == "call":
        if report.failed:
            entry["outcome"] = "failed"
            entry["failures"].append(_one_line(report))
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            entry["reason"] = _one_line(report)
        elif report.passed and hasattr(report, "wasxfail"):
            entry["outcome"] = "xpassed"
    elif report.failed:  # setup or teardown
        entry["outcome"] = "error"
        entry["failures"].append(f"{report.when}: {_one_line(report)}")
    elif report.skipped and report.when == "setup":
        entry["outcome"] = "skipped"
        entry["reason"] = _one_line(report)
    if entry["failures"]:
        more = len(entry["failures"]) - 1
        entry["reason"] = entry["failures"][0] + (f" (+{more} more)" if more else "")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("ADAMX_DROPIN_REPORT")
    if not path:
        return
    info = session.config._dropin
    record = {
        "mode": info["mode"],
        "exitstatus": int(exitstatus),
        "seconds": round(time.time() - info["started"], 1),
        "patched": sorted(_patched),
        "unpatched_references": sorted(_leftovers),
        "deselected": info["deselected"],
        "collect_errors": _collect_errors,
        "tests": _tests,
        "calls": {key: sorted(names) for key, names in _calls.items()},
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
