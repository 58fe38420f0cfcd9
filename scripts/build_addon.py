#!/usr/bin/env python3
"""Build the DreamFlow Blender extension zip with Blender's own extension builder.

    .venv/bin/python scripts/build_addon.py [--offline] [--out DIR] [--cache DIR] [--split-platforms]

1. Resolves the bundled wheels: pyzmq and msgpack (pinned below) for CPython 3.11 (Blender
   4.2-5.0) and 3.13 (Blender 5.1+) on Linux x86_64, macOS arm64/x86_64 and Windows amd64,
   downloaded with ``pip download --only-binary=:all:`` into a local cache (``.cache/addon-wheels``)
   unless already there; ``--offline`` never downloads and lists what is missing instead.
2. Builds the protocol wheel from ``shared/`` (``pip wheel --no-deps --no-build-isolation``,
   works offline).
3. Copies the wheels into ``blender_addon/wheels/`` (git-ignored) and writes their names into
   the manifest's ``wheels = [...]`` list (unchanged when the pins are unchanged).
4. Runs ``blender_ext.py build`` and ``blender_ext.py validate`` from the installed ``bpy`` wheel
   (or ``--blender-ext PATH``) and prints the zip's path (the last line of output); with
   ``--split-platforms`` one zip per platform, each printed on its own line.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "blender_addon"
MANIFEST = ADDON / "blender_manifest.toml"
DEFAULT_CACHE = ROOT / ".cache" / "addon-wheels"
DEFAULT_OUT = ROOT / "dist"

#: Bundled third-party wheels, pinned so every build bundles the same files.
PINS: dict[str, str] = {"pyzmq": "27.3.0", "msgpack": "1.2.4"}
#: (Blender's Python, its CPython tag).
PYTHONS: tuple[tuple[str, int], ...] = (("3.11", 11), ("3.13", 13))


@dataclass(frozen=True)
class Platform:
    """A Blender platform and the pip platform tag that fetches its wheels."""

    blender: str
    pip_tag: str

    def accepts(self, wheel_platform: str) -> bool:
        """True if a wheel's platform tag (possibly compound, dot-separated) runs here."""
        for tag in wheel_platform.split("."):
            if self.blender == "linux-x64" and tag.startswith("manylinux") and tag.endswith("_x86_64"):
                return True
            if self.blender == "macos-arm64" and tag.startswith("macosx_") and tag.endswith(("_arm64", "_universal2")):
                return True
            if self.blender == "macos-x64" and tag.startswith("macosx_") and tag.endswith(("_x86_64", "_universal2")):
                return True
            if self.blender == "windows-x64" and tag == "win_amd64":
                return True
            if tag == "any":
                return True
        return False


PLATFORMS: tuple[Platform, ...] = (Platform("linux-x64", "manylinux_2_28_x86_64"),
                                   Platform("macos-arm64", "macosx_11_0_arm64"),
                                   Platform("macos-x64", "macosx_11_0_x86_64"),
                                   Platform("windows-x64", "win_amd64"))


def wheel_fits(filename: str, package: str, version: str, minor: int, platform: Platform) -> bool:
    """True if wheel ``filename`` is ``package==version`` usable by CPython 3.``minor`` on ``platform``."""
    parts = filename[:-4].split("-") if filename.endswith(".whl") else []
    if len(parts) not in (5, 6):
        return False
    name, ver, py_tag, abi_tag, plat_tag = parts[0], parts[1], parts[-3], parts[-2], parts[-1]
    if name.lower().replace("-", "_") != package.replace("-", "_") or ver != version:
        return False
    pythons = py_tag.split(".")
    if abi_tag == "abi3":
        ok = any(t.startswith("cp3") and t[3:].isdigit() and int(t[3:]) <= minor for t in pythons)
    else:
        ok = f"cp3{minor}" in pythons or "py3" in pythons
    return ok and platform.accepts(plat_tag)


def find_wheel(cache: Path, package: str, version: str, minor: int, platform: Platform) -> Path | None:
    """A cached wheel that fits, if any."""
    for path in sorted(cache.glob("*.whl")):
        if wheel_fits(path.name, package, version, minor, platform):
            return path
    return None


def resolve_wheels(cache: Path, offline: bool) -> list[Path]:
    """Every third-party wheel the extension bundles, downloading missing ones unless offline."""
    cache.mkdir(parents=True, exist_ok=True)
    found: set[Path] = set()
    missing: list[str] = []
    for package, version in PINS.items():
        for py, minor in PYTHONS:
            for platform in PLATFORMS:
                wheel = find_wheel(cache, package, version, minor, platform)
                if wheel is None and not offline:
                    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
                           "--platform", platform.pip_tag, "--python-version", py, "--implementation", "cp",
                           "--dest", str(cache), f"{package}=={version}"]
                    print("downloading", package, version, "for Python", py, platform.blender, flush=True)
                    subprocess.run(cmd, check=True)
                    wheel = find_wheel(cache, package, version, minor, platform)
                if wheel is None:
                    missing.append(f"{package}=={version} for CPython {py} on {platform.blender}")
                else:
                    found.add(wheel)
    if missing:
        raise SystemExit("missing wheels in " + str(cache) + (" (offline build)" if offline else "") + ":\n  "
                         + "\n  ".join(missing)
                         + "\nrun without --offline once (needs the package index) to fill the cache")
    return sorted(found)


def build_protocol_wheel(cache: Path) -> Path:
    """The dreamflow_protocol wheel built from shared/ (pure Python, no network needed)."""
    out = cache / "protocol"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT / "shared")], check=True)
    wheels = list(out.glob("dreamflow_protocol-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one protocol wheel in {out}, found {[w.name for w in wheels]}")
    # pip leaves a build/ folder inside shared/ when building in place; it is not ours to keep.
    shutil.rmtree(ROOT / "shared" / "build", ignore_errors=True)
    return wheels[0]


def write_manifest_wheels(names: list[str]) -> bool:
    """Put ``./wheels/<name>`` entries into the manifest's wheels list; True if the file changed."""
    text = MANIFEST.read_text()
    block = "wheels = [\n" + "".join(f'  "./wheels/{n}",\n' for n in sorted(names)) + "]"
    new, count = re.subn(r"(?ms)^wheels = \[.*?^\]", block, text)
    if count != 1:
        raise SystemExit(f"{MANIFEST} needs exactly one `wheels = [...]` list")
    if new != text:
        MANIFEST.write_text(new)
        return True
    return False


def blender_ext_script(explicit: str | None) -> Path:
    """Blender's extension builder: ``--blender-ext`` or the copy inside the installed bpy wheel."""
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bpy wheel is not installed; install it (pip install bpy) or pass --blender-ext "
                         "<blender>/<version>/scripts/addons_core/bl_pkg/cli/blender_ext.py")
    base = Path(list(spec.submodule_search_locations)[0])
    found = sorted(base.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    if not found:
        raise SystemExit(f"blender_ext.py not found under {base}")
    return found[-1]


def build(out: Path, cache: Path, offline: bool, blender_ext: str | None, split_platforms: bool = False) -> list[Path]:
    """Resolve wheels, stage them, build and validate the zip (one per platform if split); the paths."""
    wheels = resolve_wheels(cache, offline) + [build_protocol_wheel(cache)]
    target = ADDON / "wheels"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for wheel in wheels:
        shutil.copy2(wheel, target / wheel.name)
    if write_manifest_wheels([w.name for w in wheels]):
        print(f"updated the wheels list in {MANIFEST.relative_to(ROOT)} (commit it)")
    script = blender_ext_script(blender_ext)
    out.mkdir(parents=True, exist_ok=True)
    version = re.search(r'(?m)^version = "([^"]+)"', MANIFEST.read_text()).group(1)
    if split_platforms:
        before = set(out.glob(f"dreamflow-{version}-*.zip"))
        subprocess.run([sys.executable, str(script), "build", "--source-dir", str(ADDON), "--output-dir", str(out),
                        "--split-platforms"], check=True)
        zips = sorted(set(out.glob(f"dreamflow-{version}-*.zip")) | before)
    else:
        zips = [out / f"dreamflow-{version}.zip"]
        subprocess.run([sys.executable, str(script), "build", "--source-dir", str(ADDON), "--output-filepath",
                        str(zips[0])], check=True)
    for zip_path in zips:
        subprocess.run([sys.executable, str(script), "validate", str(zip_path)], check=True)
    return zips


def main(argv: list[str] | None = None) -> int:
    """Command line entry."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--offline", action="store_true", help="build only from wheels already in the cache")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="wheel cache folder")
    p.add_argument("--blender-ext", default=None, help="path to Blender's blender_ext.py (default: from the bpy wheel)")
    p.add_argument("--split-platforms", action="store_true",
                   help="one smaller zip per platform (each with only its wheels) instead of one for all")
    args = p.parse_args(argv)
    zips = build(args.out.resolve(), args.cache.resolve(), args.offline, args.blender_ext, args.split_platforms)
    for zip_path in zips:
        print(zip_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
