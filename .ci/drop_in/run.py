"""Drop-in check: optax's and flax's own Adam-family tests, run with optax and then with adamx in its place.

Usage (from the repository root, in the environment that has adamx, optax, flax and pytest):

    python .ci/drop_in/run.py [--json PATH] [--legs optax,flax] [--jobs 2] [--discover]

Each leg collects test files: for optax, the ``*_test.py`` files shipped inside the installed optax
package; for flax, whose wheel ships no tests, the ``tests/`` tree of the flax sdist of the installed
version, downloaded from PyPI with pip into a private temporary directory and checked against the
sha256 pinned in ``selection.json`` (pip's hash check; an unpinned version gets pip's check against
the index's hash, and its sha256 is printed). Every test file that mentions the Adam family is a
candidate; ``selection.json`` holds, per package version, the node ids of the candidates' tests that
call one of the substituted functions (found by ``--discover``, which runs the candidate files
whole with recording wrappers). A version that ``selection.json`` does not know is discovered on
the spot (slower), and the run says so.

Each test file runs twice in its own pytest subprocess (with a timeout): once with optax as it is,
once with ``dropin_plugin`` rebinding every optax module attribute that holds ``adam``, ``adamw``,
``nadam``, ``nadamw``, ``amsgrad``, ``adamax`` or ``scale_by_adam`` to adamx's function of that name,
before any test module is imported. A test that passes with optax and does not pass with adamx is a
regression; one that fails in both is pre-existing and ignored.

Exit status: 0 when every regression is in ``allowlist.json`` (node id and one of the documented
deviations), 1 when one is not, 2 when the check itself could not run.
"""

import argparse
import concurrent.futures
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SELECTION = os.path.join(HERE, "selection.json")
ALLOWLIST = os.path.join(HERE, "allowlist.json")
DEVIATIONS = ("state-layout", "bias-correction-precision", "float32-nu-for-16-bit-params", "complex-mu")
MENTIONS_ADAM = re.compile(r"adam|amsgrad", re.IGNORECASE)
PASSING = ("passed", "xpassed", "xfailed")


def log(message):
    print(message, flush=True)


def run_bounded(cmd, *, timeout, cwd, env=None, output=None):
    """Runs ``cmd`` in its own process group; kills the whole group past ``timeout`` seconds.

    Returns ``(exit status or None on timeout, CPU seconds of the process and its children)``.
    """
    with open(output or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        expired = threading.Event()

        def kill():
            expired.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended just now
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = round(usage.ru_utime + usage.ru_stime, 1)
        return (None if expired.is_set() else proc.returncode), cpu


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def candidates(root, under):
    """Test files below ``root/under`` that mention the Adam family, as paths relative to ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, under)):
        dirnames.sort()
        for name in sorted(filenames):
            if not (name.endswith("_test.py") or (name.startswith("test_") and name.endswith(".py"))):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                if MENTIONS_ADAM.search(f.read()):
                    found.append(os.path.relpath(path, root))
    return found


def optax_leg(work):
    spec = importlib.util.find_spec("optax")
    package = spec.submodule_search_locations[0]
    root = os.path.dirname(package)
    ini = os.path.join(work, "optax-pytest.ini")
    with open(ini, "w") as f:
        f.write("[pytest]\n")  # nothing from the repository's own pytest settings
    return {"name": "optax", "version": importlib.metadata.version("optax"), "root": root,
            "ini": ini, "files": candidates(root, "optax")}


def fetch_flax_tests(work, version, pinned, timeout):
    """Downloads the flax sdist with pip, checks its hash, and unpacks only tests/ and pyproject.toml."""
    download = tempfile.mkdtemp(prefix="flax-sdist-", dir=work)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", download]
    if pinned:
        requirements = os.path.join(work, "flax-requirement.txt")
        with open(requirements, "w") as f:
            f.write(f"flax=={version} --hash=sha256:{pinned}\n")
        base += ["--require-hashes", "-r", requirements]
    else:
        base += [f"flax=={version}"]
    pip_log = os.path.join(work, "pip-download.log")
    for extra in (["--no-build-isolation"], []):  # pip prepares the sdist's metadata after download
        if run_bounded(base + extra, timeout=timeout, cwd=work, output=pip_log)[0] == 0:
            break
    else:
        with open(pip_log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"pip could not download the flax {version} sdist:\n{tail}")
    archives = [name for name in os.listdir(download) if name.endswith((".tar.gz", ".zip"))]
    if len(archives) != 1 or not archives[0].endswith(".tar.gz"):
        raise RuntimeError(f"expected one flax-{version}.tar.gz from pip, got {archives}")
    archive = os.path.join(download, archives[0])
    digest = sha256(archive)
    if pinned and digest != pinned:
        raise RuntimeError(f"flax sdist sha256 {digest} is not the pinned {pinned}")
    root = os.path.join(work, "flax-src")
    os.mkdir(root)
    prefix = f"flax-{version}/"
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            name = member.name
            if not name.startswith(prefix) or ".." in name.split("/") or os.path.isabs(name):
                continue
            inner = name[len(prefix):]
            if not (inner == "pyproject.toml" or inner.startswith("tests/")):
                continue
            if not (member.isfile() or member.isdir()):
                continue
            member.name = inner
            members.append(member)
        if not any(m.name.startswith("tests/") for m in members):
            raise RuntimeError(f"the flax {version} sdist has no tests/ directory")
        tar.extractall(root, members=members)
    return root, digest


def flax_leg(work, pinned_sdist, timeout):
    version = importlib.metadata.version("flax")
    pinned = pinned_sdist.get(version)
    root, digest = fetch_flax_tests(work, version, pinned, timeout)
    if not pinned:
        log(f"flax {version}: sdist sha256 {digest} (pip checked it against the index; not pinned "
            "in selection.json: run with --discover to pin it)")
    return {"name": "flax", "version": version, "root": root, "sdist_sha256": digest,
            "ini": os.path.join(root, "pyproject.toml"), "files": candidates(root, "tests")}


def run_file(leg, path, mode, select, work, timeout):
    """One pytest subprocess over one test file; returns the plugin's record (or a failure record)."""
    tag = f"{leg['name']}-{mode}-{re.sub(r'[^A-Za-z0-9]+', '_', path)}"
    report = os.path.join(work, tag + ".json")
    output = os.path.join(work, tag + ".log")
    env = dict(os.environ)
    env.update({
        "ADAMX_DROPIN_MODE": mode, "ADAMX_DROPIN_REPORT": report, "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": os.pathsep.join([HERE] + [p for p in [env.get("PYTHONPATH")] if p]),
    })
    env.pop("ADAMX_DROPIN_SELECT", None)
    if select is not None:
        select_path = os.path.join(work, tag + ".select.json")
        with open(select_path, "w") as f:
            json.dump(sorted(select), f)
        env["ADAMX_DROPIN_SELECT"] = select_path
    cwd = tempfile.mkdtemp(prefix="cwd-", dir=work)  # whatever the tests write lands here
    cmd = [sys.executable, "-m", "pytest", "-p", "dropin_plugin", "-p", "no:cacheprovider",
           "-c", leg["ini"], "--rootdir", leg["root"], "-q", "--tb=short", "-rN",
           os.path.join(leg["root"], path)]
    started = time.time()
    status, cpu = run_bounded(cmd, timeout=timeout, cwd=cwd, env=env, output=output)
    seconds = round(time.time() - started, 1)
    record = {"tests": {}, "calls": {}, "collect_errors": {}}
    if os.path.exists(report):
        with open(report) as f:
            record = json.load(f)
    with open(output, errors="replace") as f:
        tail = f.read()[-3000:]
    record.update({"file": path, "mode": mode, "status": status, "wall_s": seconds, "cpu_s": cpu,
                   "log_tail": tail})
    return record


def run_many(jobs, tasks):
    """Runs ``run_file(*task)`` for each task, ``jobs`` subprocesses at once."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda task: run_file(*task), tasks))


def selected_from(record):
    """The node ids that called a substituted function; all of the file's tests if collection did."""
    if "<collection>" in record["calls"]:
        return sorted(record["tests"])
    return sorted(k for k in record["calls"] if k != "<collection>")


def compare(leg, path, base, new, select):
    rows = []
    for nodeid in select:
        b = base["tests"].get(nodeid)
        n = new["tests"].get(nodeid)
        if b is None:
            b = {"outcome": "not-run", "reason": _why_missing(base)}
        if n is None:
            n = {"outcome": "not-run", "reason": _why_missing(new)}
        if b["outcome"] in PASSING:
            kind = "same" if n["outcome"] in PASSING else "regression"
        elif b["outcome"] == "skipped":
            kind = "skipped-with-optax"
        else:
            kind = "fixed" if n["outcome"] in PASSING else "pre-existing"
        rows.append({"leg": leg["name"], "file": path, "nodeid": nodeid, "kind": kind,
                     "optax": b["outcome"], "adamx": n["outcome"],
                     "reason": n["reason"] if kind == "regression" else b.get("reason", ""),
                     "failures": n.get("failures", []) if kind == "regression" else b.get("failures", []),
                     "adamx_calls": new["calls"].get(nodeid, [])})
    return rows


def _why_missing(record):
    if record["status"] is None:
        return "the pytest subprocess ran past its timeout"
    if record["collect_errors"]:
        return "collection failed: " + "; ".join(record["collect_errors"].values())
    return f"not reported (pytest exit {record['status']})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the machine-readable summary here")
    parser.add_argument("--legs", default="optax,flax", help="comma-separated: optax, flax")
    parser.add_argument("--jobs", type=int, default=2, help="pytest subprocesses at once")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one pytest subprocess")
    parser.add_argument("--discover", action="store_true",
                        help="run the candidate files whole to find the Adam-relevant tests, and "
                             "write them to selection.json")
    parser.add_argument("--files", default="", help="only files whose path contains this text")
    parser.add_argument("--keep", action="store_true", help="keep the private work directory")
    args = parser.parse_args(argv)
    started = time.time()
    legs = [name for name in args.legs.split(",") if name]
    work = tempfile.mkdtemp(prefix="adamx-drop-in-")
    try:
        return _main(args, legs, work, started)
    finally:
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _main(args, legs, work, started):
    probe = os.path.join(work, "import.log")
    if run_bounded([sys.executable, "-c", "import adamx, optax, pytest"], timeout=300, cwd=work,
                   output=probe)[0] != 0:
        with open(probe) as f:
            log("drop-in: cannot import adamx, optax and pytest:\n" + f.read()[-2000:])
        return 2
    selection = {}
    if os.path.exists(SELECTION):
        with open(SELECTION) as f:
            selection = json.load(f)
    with open(ALLOWLIST) as f:
        allowed = {entry["nodeid"]: entry["deviation"] for entry in json.load(f)["allowed"]}
    bad = {k: v for k, v in allowed.items() if v not in DEVIATIONS}
    if bad:
        log(f"drop-in: allowlist.json names deviations not in {DEVIATIONS}: {bad}")
        return 2

    rows, legs_out, changed = [], {}, False
    for name in legs:
        leg_started = time.time()
        known = selection.get(name, {})
        try:
            leg = optax_leg(work) if name == "optax" else flax_leg(
                work, known.get("sdist_sha256", {}), args.timeout)
        except (RuntimeError, OSError) as error:
            log(f"drop-in: {name}: {error}")
            return 2
        files = [p for p in leg["files"] if args.files in p]
        discover = args.discover or known.get("version") != leg["version"]
        if discover and not args.discover:
            log(f"{name} {leg['version']}: selection.json has {known.get('version')}; discovering "
                "the Adam-relevant tests now (run with --discover to record them)")
        base = {}
        if discover:
            records = run_many(args.jobs, [(leg, p, "optax", None, work, args.timeout) for p in files])
            for record in records:
                if record["status"] not in (0, 1) or not record["tests"]:
                    log(f"drop-in: {name} {record['file']}: the optax run failed (exit "
                        f"{record['status']}):\n{record['log_tail']}")
                    return 2
                base[record["file"]] = record
            chosen = {r["file"]: selected_from(r) for r in records}
            chosen = {p: ids for p, ids in chosen.items() if ids}
            if args.discover and not args.files:
                entry = {"version": leg["version"], "tests": chosen,
                         "seconds": {r["file"]: r["wall_s"] for r in records}}
                if name == "flax":
                    entry["sdist_sha256"] = dict(known.get("sdist_sha256", {}))
                    entry["sdist_sha256"][leg["version"]] = leg["sdist_sha256"]
                selection[name] = entry
                changed = True
        else:
            chosen = {p: ids for p, ids in known["tests"].items() if p in files}
        order = sorted(chosen, key=lambda p: -known.get("seconds", {}).get(p, len(chosen[p])))
        modes = ["adamx"] if discover else ["adamx", "optax"]
        tasks = [(leg, p, mode, chosen[p], work, args.timeout) for mode in modes for p in order]
        records = run_many(args.jobs, tasks)
        new = {r["file"]: r for r in records if r["mode"] == "adamx"}
        base.update({r["file"]: r for r in records if r["mode"] == "optax"})
        broken = [r for r in records if r["status"] not in (None, 0, 1, 2, 5)]
        if broken:  # 3: pytest's internal error (adamx failed to import); 4: usage error
            r = broken[0]
            log(f"drop-in: {name} {r['file']} ({r['mode']}): pytest exit {r['status']}; "
                f"the check itself failed:\n{r['log_tail']}")
            return 2
        for path in order:
            if not base[path]["tests"]:
                log(f"drop-in: {name} {path}: the optax run reported no test (exit "
                    f"{base[path]['status']}):\n{base[path]['log_tail']}")
                return 2
            rows += compare(leg, path, base[path], new[path], chosen[path])
        timings = {p: {mode: {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]}
                       for mode, r in (("optax", base[p]), ("adamx", new[p]))} for p in order}
        legs_out[name] = {
            "version": leg["version"], "files": len(order), "selected": sum(map(len, chosen.values())),
            "seconds": round(time.time() - leg_started, 1),
            "cpu_seconds": round(sum(t[m]["cpu_s"] for t in timings.values() for m in t), 1),
            "timings": timings,
            "patched": next(iter(new.values()), {}).get("patched", []),
            "unpatched_references": next(iter(new.values()), {}).get("unpatched_references", []),
            **({"sdist_sha256": leg["sdist_sha256"]} if "sdist_sha256" in leg else {}),
        }
    if changed:
        with open(SELECTION, "w") as f:
            json.dump(selection, f, indent=1, sort_keys=True)
            f.write("\n")
        log(f"wrote {os.path.relpath(SELECTION)}")
    return report(rows, legs_out, allowed, args, started)


def report(rows, legs_out, allowed, args, started):
    for row in rows:
        row["allowed_as"] = allowed.get(row["nodeid"]) if row["kind"] == "regression" else None
    regressions = [r for r in rows if r["kind"] == "regression"]
    unallowed = [r for r in regressions if not r["allowed_as"]]
    stale = sorted(set(allowed) - {r["nodeid"] for r in regressions})
    by_file = {}
    for row in rows:
        by_file.setdefault((row["leg"], row["file"]), []).append(row)
    for (leg, path), file_rows in by_file.items():
        counts = {}
        for row in file_rows:
            counts[row["kind"]] = counts.get(row["kind"], 0) + 1
        log(f"\n{leg}: {path}  " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for row in file_rows:
            if row["kind"] in ("regression", "pre-existing", "fixed"):
                label = row["kind"] if not row["allowed_as"] else f"allowed ({row['allowed_as']})"
                short = row["nodeid"].split("::", 1)[-1]
                log(f"  {label:<14} {short} [{row['optax']} -> {row['adamx']}]: {row['reason']}")
    seconds = round(time.time() - started, 1)
    cpu = round(sum(leg["cpu_seconds"] for leg in legs_out.values()), 1)
    summary = {
        "seconds": seconds, "cpu_seconds_of_pytest_runs": cpu, "legs": legs_out,
        "counts": {"compared": len(rows), "regressions": len(regressions),
                   "unallowed_regressions": len(unallowed),
                   "pre_existing": sum(r["kind"] == "pre-existing" for r in rows),
                   "fixed": sum(r["kind"] == "fixed" for r in rows),
                   "skipped_with_optax": sum(r["kind"] == "skipped-with-optax" for r in rows)},
        "regressions": regressions, "stale_allowlist_entries": stale,
        "pre_existing": [r for r in rows if r["kind"] == "pre-existing"],
        "fixed": [r for r in rows if r["kind"] == "fixed"],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    files = len({(r["leg"], r["file"]) for r in regressions})
    log(f"\ndrop-in: {len(rows)} tests compared in {seconds} s ({cpu} CPU s in pytest); "
        f"{len(regressions)} regressions in "
        f"{files} files ({len(regressions) - len(unallowed)} allowed), "
        f"{summary['counts']['pre_existing']} pre-existing")
    if stale:
        log(f"drop-in: allow-list entries that no longer regress: {stale}")
    return 1 if unallowed else 0


if __name__ == "__main__":
    sys.exit(main())
