"""`reflash deb`: the appliance side (recovery.core, recovery.updated, their commands and units) as a
Debian package, built by dpkg-buildpackage and debhelper from packaging/debian/ and checked by lintian.

The source tree is staged in a temporary directory, never in the repository: the packages' directories
as they are (whatever modules they hold at build time), the commands of pyproject.toml's
[project.scripts] that run the running system's code, every unit in recovery/updated/units/, and
packaging/debian/ as debian/ with a changelog for the project's version.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from recovery.core.errors import Failed, Rejected
from recovery.core.output import step
from recovery.core.run import run

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging/debian"
PACKAGE = "reflash-appliance"
SOURCE = "reflash"
# The programs the package carries; their commands are the [project.scripts] entries running them.
PROGRAMS = ("recovery.core", "recovery.updated")
UNITS = REPO / "recovery/updated/units"
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "lintian")

# PEP 440's pre- and post-releases in Debian's order: 1.0.0rc1 < 1.0.0 < 1.0.0.post1.
_PEP440 = re.compile(r"(?P<release>\d+(\.\d+)*)(?P<pre>(a|b|rc)\d+)?(\.(?P<post>post\d+))?(\.(?P<dev>dev\d+))?")


@dataclass(frozen=True)
class Deb:
    path: Path
    version: str
    lintian: tuple[str, ...]  # lintian's warnings and notes (errors fail the build)


def project_version(pyproject: Path = REPO / "pyproject.toml") -> str:
    with pyproject.open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def debian_version(version: str) -> str:
    """pyproject's version as a Debian version that sorts the same way."""
    m = _PEP440.fullmatch(version)
    if m is None:
        raise Rejected(f"project version {version!r} is not a PEP 440 release this packaging can map to Debian's")
    out = m["release"]
    if m["pre"]:
        out += "~" + m["pre"]
    if m["dev"]:
        out += "~" + m["dev"]
    if m["post"]:
        out += "+" + m["post"]
    return out


def dependencies(control: Path = PACKAGING / "control") -> tuple[str, ...]:
    """The Debian packages the package's Depends names (substitution variables and versions left out): a
    system root gets them from its mirror before the package is installed into it."""
    text = control.read_text()
    fields = re.search(rf"^Package: {PACKAGE}\n(?:.+\n)*?Depends:(?P<value>.*(?:\n[ \t].*)*)", text, re.MULTILINE)
    if fields is None:
        raise Failed(f"{control}: no Depends for {PACKAGE}")
    names = (part.split("(")[0].split(":")[0].strip() for part in fields["value"].replace("\n", " ").split(","))
    return tuple(name for name in names if name and not name.startswith("$"))


def commands(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """name -> module for each [project.scripts] entry whose code is in the package."""
    with pyproject.open("rb") as f:
        scripts = tomllib.load(f)["project"].get("scripts", {})
    found = {}
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        if function != "main":
            raise Rejected(f"pyproject.toml: script {name} = {target!r}: the packaging runs a module's main()")
        if any(module == p or module.startswith(p + ".") for p in PROGRAMS):
            found[name] = module
    return found


def build_deb(dest: Path) -> Deb:
    """Build `dest/reflash-appliance_<version>_all.deb` and run lintian on it; Failed on lintian errors."""
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise Failed(f"building the package needs {', '.join(missing)} (make setup installs debhelper, "
                     "dh-python, lintian and dpkg-dev)")
    version = debian_version(project_version())
    with step(f"Building the package {PACKAGE} {version}"), tempfile.TemporaryDirectory(prefix="reflash-deb-") as t:
        source = Path(t) / f"{SOURCE}-{version}"
        _stage(source, version)
        run(["dpkg-buildpackage", "--build=binary", "--no-sign", "--no-check-builddeps"], cwd=source)
        built = Path(t) / f"{PACKAGE}_{version}_all.deb"
        if not built.is_file():
            raise Failed(f"dpkg-buildpackage wrote no {built.name}")
        findings = lint(built)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, dest / built.name)
    return Deb(path=dest / built.name, version=version, lintian=findings)


def lint(deb: Path) -> tuple[str, ...]:
    """lintian's findings on `deb`; Failed naming the errors when there are any."""
    proc = run(["lintian", "--no-tag-display-limit", "--display-info", deb], check=False)
    lines = tuple(line for line in proc.stdout.decode(errors="replace").splitlines() if line.strip())
    errors = [line for line in lines if line.startswith("E: ")]
    if errors:
        raise Failed(f"lintian refuses {deb.name}: {'; '.join(errors)}")
    if proc.returncode:  # no error tags, yet a failure: lintian itself could not run
        # (as root it always warns on stderr that it should not run as root: not the reason)
        why = [line for line in proc.stderr.decode(errors="replace").splitlines() if "root privileges" not in line]
        raise Failed(f"lintian could not check {deb.name} (exit status {proc.returncode}): "
                     f"{why[-1] if why else 'no output'}")
    for line in lines:  # warnings shown, notes and pedantic tags only with --debug
        (log.warning if line.startswith("W: ") else log.debug)("lintian: %s", line)
    return lines


def _stage(source: Path, version: str) -> None:
    recovery = source / "recovery"
    recovery.mkdir(parents=True)
    shutil.copy2(REPO / "recovery/__init__.py", recovery / "__init__.py")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for program in PROGRAMS:
        name = program.split(".")[1]
        # The units are installed where systemd looks, not as package data.
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "units") if program == "recovery.updated" else skip
        shutil.copytree(REPO / program.replace(".", "/"), recovery / name, ignore=ignore)
    units = sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.timer")) + sorted(UNITS.glob("*.socket"))
    if not units:
        raise Failed(f"no systemd units in {UNITS}")
    (source / "units").mkdir()
    for unit in units:
        shutil.copy2(unit, source / "units" / unit.name)
    (source / "bin").mkdir()
    for name, module in commands().items():
        script = source / "bin" / name
        script.write_text(f"#!/usr/bin/python3\nimport sys\n\nfrom {module} import main\n\nsys.exit(main())\n")
        script.chmod(0o755)
    shutil.copytree(PACKAGING, source / "debian")
    (source / "debian/changelog").write_text(_changelog(version))


def _changelog(version: str) -> str:
    maintainer = next(line.split(":", 1)[1].strip() for line in (PACKAGING / "control").read_text().splitlines()
                      if line.startswith("Maintainer:"))
    return (f"{SOURCE} ({version}) unstable; urgency=medium\n\n"
            f"  * Built from the reflash repository, version {version} of pyproject.toml.\n\n"
            f" -- {maintainer}  {datetime.now(timezone.utc):%a, %d %b %Y %H:%M:%S +0000}\n")
