"""A wheelhouse for the Ansible role, per node architecture: `make wheelhouse ARCH=aarch64`.

Writes DEST (default ansible/wheelhouse/ARCH) with our own wheel (pure Python, built from this
checkout) and every runtime dependency as a binary wheel for ARCH, for each Python the package
supports (3.9 to 3.13), nothing built for the node, so any controller can make any
architecture's wheelhouse. The dependencies differ by Python (typer 0.23 with click on 3.9,
tomli below 3.11, ...), and pip evaluates environment markers for the Python it runs on, not
for `--python-version`: so this walks the requirements itself, evaluating each marker for the
target (Python, linux, ARCH), and has pip fetch each one alone (`pip download --no-deps
--only-binary=:all: --python-version X --platform manylinux2014_ARCH`). Then it checks the
result the same way offline: only ARCH or pure (`none-any`) wheels, and every requirement of
spegel-node, for every Python, has a wheel there. The role installs from
`spegel_node_wheelhouse/<ansible_architecture>/` (docs/rollout.md).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import (  # type: ignore[no-redef]
        canonicalize_name,
        parse_wheel_filename,
    )
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
ARCHES = ("x86_64", "aarch64")
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
OWN = "spegel-node"


def _platform_args(arch: str) -> list[str]:
    return ["--platform", f"manylinux2014_{arch}", "--platform", f"manylinux_2_17_{arch}"]


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"wheelhouse: pip {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def marker_env(python: str, arch: str, extra: str = "") -> dict[str, str]:
    return {
        "python_version": python, "python_full_version": f"{python}.0",
        "platform_machine": arch, "sys_platform": "linux", "platform_system": "Linux",
        "os_name": "posix", "implementation_name": "cpython",
        "platform_python_implementation": "CPython", "extra": extra,
    }  # fmt: skip


def _metadata(wheel: Path) -> dict[str, list[str]]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(zf.read(name).decode())
    return {
        "requires": msg.get_all("Requires-Dist") or [],
        "requires_python": [msg.get("Requires-Python") or ""],
    }


def requirements_of(
    wheel: Path, python: str, arch: str, extras: frozenset[str] = frozenset()
) -> list[Requirement]:
    """The wheel's Requires-Dist whose markers hold on (python, linux, arch) for these extras."""
    out = []
    for line in _metadata(wheel)["requires"]:
        req = Requirement(line)
        envs = [marker_env(python, arch, e) for e in ("", *sorted(extras))]
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            out.append(req)
    return out


def wheel_fits(wheel: Path, python: str) -> bool:
    """The wheel installs on CPython `python` (tags and Requires-Python; platform aside)."""
    want = Version(python)
    spec = _metadata(wheel)["requires_python"][0]
    if spec and not SpecifierSet(spec).contains(want):
        return False
    _name, _version, _build, tags = parse_wheel_filename(wheel.name)
    for tag in tags:
        if tag.interpreter.startswith("py3"):
            return True
        if tag.interpreter.startswith("cp"):
            tagged = Version(f"{tag.interpreter[2]}.{tag.interpreter[3:]}")
            if (tag.abi == "abi3" and want >= tagged) or want == tagged:
                return True
    return False


def find(dest: Path, req: Requirement, python: str) -> Path | None:
    """A wheel in `dest` that satisfies `req` on `python`."""
    for wheel in sorted(dest.glob("*.whl")):
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
        if name != canonicalize_name(req.name):
            continue
        if req.specifier.contains(version, prereleases=True) and wheel_fits(wheel, python):
            return wheel
    return None


def closure(dest: Path, python: str, arch: str, *, fetch: bool) -> list[str]:
    """Walk spegel-node's requirements for (python, arch) over the wheels in `dest`; with
    `fetch`, download each missing one first. Returns what is still missing."""
    own = find(dest, Requirement(OWN), python)
    if own is None:
        return [OWN]
    queue = [(own, frozenset[str]())]
    done: set[tuple[str, frozenset[str]]] = set()
    missing = []
    while queue:
        wheel, extras = queue.pop()
        if (wheel.name, extras) in done:
            continue
        done.add((wheel.name, extras))
        for req in requirements_of(wheel, python, arch, extras):
            found = find(dest, req, python)
            if found is None and fetch:
                with tempfile.TemporaryDirectory() as tmp:
                    _pip("download", "-q", "--no-deps", "--dest", tmp, "--only-binary=:all:",
                         "--python-version", python, *_platform_args(arch),
                         f"{req.name}{req.specifier}")  # fmt: skip
                    for got in Path(tmp).glob("*.whl"):
                        shutil.move(str(got), dest / got.name)
                found = find(dest, req, python)
            if found is None:
                missing.append(f"{req} (Python {python})")
            else:
                queue.append((found, frozenset(req.extras)))
    return missing


def foreign_wheels(dest: Path, arch: str) -> list[str]:
    """Wheels in `dest` that are neither pure nor for `arch`."""
    bad = []
    for wheel in sorted(dest.glob("*.whl")):
        platforms = {tag.platform for tag in parse_wheel_filename(wheel.name)[3]}
        if not all(p == "any" or p.endswith(f"_{arch}") for p in platforms):
            bad.append(wheel.name)
    return bad


def check(dest: Path, arch: str) -> list[str]:
    """Every problem with `dest` as the wheelhouse of `arch` nodes (empty: none)."""
    problems = [f"not {arch} or pure: {name}" for name in foreign_wheels(dest, arch)]
    for python in PYTHONS:
        problems += [f"no wheel for {m}" for m in closure(dest, python, arch, fetch=False)]
    return problems


def build(arch: str, dest: Path) -> list[str]:
    if arch not in ARCHES:
        raise SystemExit(f"wheelhouse: ARCH must be one of {', '.join(ARCHES)}, not {arch!r}")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    _pip("wheel", "-q", "--no-deps", "--wheel-dir", str(dest), str(REPO))
    for python in PYTHONS:
        missing = closure(dest, python, arch, fetch=True)
        if missing:
            raise SystemExit(f"wheelhouse: cannot get {', '.join(missing)} for {arch}")
    problems = check(dest, arch)
    if problems:
        raise SystemExit("wheelhouse: " + "; ".join(problems))
    return sorted(p.name for p in dest.glob("*.whl"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=platform.machine(), help="x86_64 or aarch64")
    parser.add_argument("--dest", type=Path, help="default: ansible/wheelhouse/ARCH")
    parser.add_argument("--check", action="store_true", help="only check an existing DEST")
    args = parser.parse_args()
    if args.check:
        problems = check(args.dest or REPO / "ansible" / "wheelhouse" / args.arch, args.arch)
        for line in problems:
            print(f"wheelhouse: {line}", file=sys.stderr)
        return 1 if problems else 0
    dest = args.dest or REPO / "ansible" / "wheelhouse" / args.arch
    wheels = build(args.arch, dest)
    print(f"wheelhouse {args.arch}: {len(wheels)} wheels in {dest}")
    for name in wheels:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
