#!/usr/bin/env python3
"""Run the add-on's real-Blender tests in the older Blenders the manifest claims (4.2 LTS, 4.5 LTS).

    .venv/bin/python scripts/blender_versions.py --install          create/update .venv-bpy42, .venv-bpy45
    .venv/bin/python scripts/blender_versions.py [--zip Z] [4.2 4.5] run the add-on tests in each

Each Blender is the ``bpy`` wheel of that version (Python 3.11) in its own virtual environment next
to the main ``.venv``; only Blender's side runs there. The backend (scripted and real ``dreamflow
serve``, the extension builder) runs from the main ``.venv`` (``DREAMFLOW_BACKEND_PYTHON``).

The module builds of Blender misbehave at process exit: bpy 4.2 segfaults in its C exit handlers
once a load_post handler or a timer was registered, bpy 4.5 can hang there when a timer is left.
So the exit status of the Blender process decides nothing. The verdict comes from what pytest
wrote before exiting: the junit XML and a status file that :mod:`blender_exit_guard` (a pytest
plugin loaded into the run) writes after every report is out, before it leaves with ``os._exit``
(which skips those exit handlers). A run whose status file is missing failed, whatever its exit
status; a run that wrote it but then crashes or hangs is judged by it, after a bounded wait.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Blender series -> the bpy wheel tested (the newest of that LTS series on the package index).
VERSIONS: dict[str, str] = {"4.2": "4.2.23", "4.5": "4.5.15"}
#: What each Blender environment holds besides bpy (the pins the extension bundles; numpy < 2 for bpy).
EXTRA_REQUIREMENTS = ("numpy<2", "pytest>=8", "pyzmq==27.3.0", "msgpack==1.2.4")
#: The add-on test files that run in every Blender (those that need no torch in Blender's process).
TEST_FILES = ("test_live_import.py", "test_panel.py", "test_jobs.py", "test_errors.py", "test_saved_blend.py",
              "test_real_backend.py")
#: Seconds a process may take to exit after its results are written (bpy 4.5 can hang there).
EXIT_GRACE_S = 20.0
#: Seconds a whole run may take before it is stopped and failed.
RUN_TIMEOUT_S = 1200.0


def venv_dir(series: str) -> Path:
    """``.venv-bpy42`` for series ``4.2``."""
    return ROOT / f".venv-bpy{series.replace('.', '')}"


def requirements(series: str) -> list[str]:
    """Everything one Blender environment installs."""
    return [f"bpy=={VERSIONS[series]}", *EXTRA_REQUIREMENTS]


def install(series: str, python: str = sys.executable) -> Path:
    """Create or update the environment of ``series`` (idempotent: skipped when its pins are in place)."""
    env = venv_dir(series)
    stamp = env / "dreamflow-requirements.txt"
    wanted = "\n".join(requirements(series)) + "\n"
    if (env / "bin" / "python").is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return env
    base = subprocess.run([python, "-c", "import sys; print(getattr(sys, '_base_executable', sys.executable))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([base, "-m", "venv", str(env)], check=True)
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", *requirements(series)], check=True)
    stamp.write_text(wanted)
    return env


@dataclass
class Verdict:
    """How one run ended, decided from the results it wrote (never from its exit status alone)."""

    passed: bool
    summary: str
    returncode: int | None
    output: str = ""


def judge(junit: Path, status: Path, returncode: int | None, hung: bool) -> Verdict:
    """Pass only if the status file says pytest's exit status was 0 and the junit XML agrees."""
    tail = f" (then {'hung at exit and was killed' if hung else f'exit status {returncode}'})"
    if not status.is_file():
        how = "hung and was killed" if hung else f"exited with status {returncode}"
        return Verdict(False, f"no results: the run {how} before pytest reported", returncode)
    try:
        exitstatus = int(json.loads(status.read_text())["exitstatus"])
        suites = ET.parse(junit).getroot()
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as exc:
        return Verdict(False, f"unreadable results ({type(exc).__name__}: {exc})", returncode)
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    ran = count["tests"] - count["skipped"]
    text = (f"{ran} passed" if not (count["failures"] or count["errors"]) else
            f"{count['failures']} failed, {count['errors']} errors of {count['tests']}") + \
        (f", {count['skipped']} skipped" if count["skipped"] else "")
    ok = exitstatus == 0 and count["tests"] > 0 and not count["failures"] and not count["errors"]
    if exitstatus == 0 and not ok:
        text += "; pytest said 0 but the junit XML disagrees"
    return Verdict(ok, f"pytest exit status {exitstatus}: {text}" + (tail if returncode or hung else ""), returncode)


def run_judged(cmd: list[str], results: Path, env: dict | None = None, exit_grace_s: float = EXIT_GRACE_S,
               timeout_s: float = RUN_TIMEOUT_S) -> Verdict:
    """Run ``cmd`` (which writes ``results/junit.xml`` and ``results/status.json``) and judge it.

    Waits for the process; once the status file exists it gets ``exit_grace_s`` more seconds to
    exit before it is killed (a hang at exit after the results cannot block or fail the run).
    """
    results.mkdir(parents=True, exist_ok=True)
    junit, status, log = results / "junit.xml", results / "status.json", results / "output.log"
    for stale in (junit, status):
        stale.unlink(missing_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        start, reported_at, hung = time.monotonic(), None, False
        while proc.poll() is None:
            now = time.monotonic()
            if reported_at is None and status.is_file():
                reported_at = now
            if (reported_at is not None and now - reported_at > exit_grace_s) or now - start > timeout_s:
                hung = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.1)
    verdict = judge(junit, status, proc.returncode, hung)
    verdict.output = log.read_text(errors="replace")
    return verdict


def run_series(series: str, results: Path, extension_zip: Path | None = None, backend_python: str = sys.executable,
               pytest_args: tuple[str, ...] = ()) -> Verdict:
    """The add-on tests in Blender ``series`` (its environment must exist: :func:`install`)."""
    python = venv_dir(series) / "bin" / "python"
    if not python.is_file():
        return Verdict(False, f"{venv_dir(series).name} is missing: run `scripts/dev test` or "
                              f"`.venv/bin/python scripts/blender_versions.py --install`", None)
    tests = ROOT / "tests" / "addon"
    env = dict(os.environ)
    # The backend's children (scripted server, dreamflow serve) import this checkout's code too.
    paths = [ROOT / "backend", ROOT / "shared", ROOT / "scripts", tests]
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH")])])
    env["DREAMFLOW_BACKEND_PYTHON"] = backend_python
    if extension_zip is not None:
        env["DREAMFLOW_ADDON_ZIP"] = str(extension_zip)
    env["DREAMFLOW_RESULT_STATUS"] = str(results / "status.json")
    cmd = [str(python), "-m", "pytest", "-p", "blender_exit_guard", "-p", "no:cacheprovider",
           f"--confcutdir={tests}", f"--rootdir={ROOT}", f"--junitxml={results / 'junit.xml'}",
           *[str(tests / name) for name in TEST_FILES], *pytest_args]
    return run_judged(cmd, results, env)


def main(argv: list[str] | None = None) -> int:
    """Command line entry: install the environments, or run the tests in each and print the verdicts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("series", nargs="*", default=list(VERSIONS), help=f"Blender series (default: {' '.join(VERSIONS)})")
    p.add_argument("--install", action="store_true", help="create or update the environments, run nothing")
    p.add_argument("--zip", type=Path, default=None, help="an extension zip already built (else each run builds one)")
    p.add_argument("--results", type=Path, default=ROOT / "out" / "blender-versions", help="results folder")
    args = p.parse_args(argv)
    if args.install:
        for series in args.series:
            start = time.monotonic()
            print(f"Blender {series}: {install(series)} ready in {time.monotonic() - start:.0f} s", flush=True)
        return 0
    failed = 0
    for series in args.series:
        start = time.monotonic()
        verdict = run_series(series, args.results / series, args.zip)
        if not verdict.passed:
            failed += 1
            print(verdict.output[-6000:])
        print(f"Blender {VERSIONS[series]}: {'PASSED' if verdict.passed else 'FAILED'}: {verdict.summary} "
              f"[{time.monotonic() - start:.0f} s]", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
