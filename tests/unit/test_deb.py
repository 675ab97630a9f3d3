"""The appliance side's Debian package (`reflash deb`): built once with debhelper, its contents, version
and dependencies read back with dpkg-deb, and lintian's verdict (errors fail the build)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from mkimage import deb as debpkg
from recovery.core.errors import Failed, Rejected

REPO = Path(__file__).resolve().parents[2]
SITE = "usr/lib/python3/dist-packages/recovery"

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in debpkg.BUILD_TOOLS),
    reason=f"building the package needs {', '.join(debpkg.BUILD_TOOLS)} (make setup installs them)",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> debpkg.Deb:
    return debpkg.build_deb(tmp_path_factory.mktemp("deb"))


def contents(deb: Path) -> dict[str, str]:
    """path (no leading ./) -> the mode column of `dpkg-deb -c`."""
    out = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].removeprefix("./").rstrip("/"): line.split()[0] for line in out.splitlines()}


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True).stdout.strip()


def test_the_name_and_version_come_from_pyproject(built: debpkg.Deb) -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert built.path.name == f"reflash-appliance_{version}_all.deb"
    assert (field(built.path, "Package"), field(built.path, "Version")) == ("reflash-appliance", version)
    assert field(built.path, "Architecture") == "all"


def test_it_carries_core_and_updated_whole_and_nothing_of_the_other_programs(built: debpkg.Deb) -> None:
    files = contents(built.path)
    for package in ("core", "updated"):
        source = sorted(str(p.relative_to(REPO / "recovery" / package)) for p in (REPO / "recovery" / package).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" and "units" not in p.parts)
        shipped = sorted(p.removeprefix(f"{SITE}/{package}/") for p, mode in files.items()
                         if p.startswith(f"{SITE}/{package}/") and not mode.startswith("d"))
        assert shipped == source, package
    assert f"{SITE}/__init__.py" in files
    assert not [p for p in files if p.startswith(f"{SITE}/os") or "mkimage" in p or "/vm/" in p or p.endswith(".pyc")]


def test_every_unit_is_installed_and_enabled_by_its_install_section(built: debpkg.Deb, tmp_path: Path) -> None:
    files = contents(built.path)
    units = sorted(p.name for p in (REPO / "recovery/updated/units").iterdir())
    assert units and [u for u in units if f"lib/systemd/system/{u}" not in files] == []
    subprocess.run(["dpkg-deb", "-e", built.path, tmp_path / "control"], check=True)
    postinst = (tmp_path / "control/postinst").read_text()
    for unit in units:
        assert f"deb-systemd-helper enable '{unit}'" in postinst, unit
    # Boot-time units: installing the package must not run a trial's checks or its reboot.
    assert "deb-systemd-invoke" not in postinst
    assert "py3compile -p reflash-appliance" in postinst


def test_every_unit_runs_a_command_the_package_ships(built: debpkg.Deb) -> None:
    files = contents(built.path)
    for unit in (REPO / "recovery/updated/units").iterdir():
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                argv = line.split("=", 1)[1].lstrip("-@+!:").split()
                if argv[0] == "/usr/bin/python3" and argv[1] == "-m":  # a dependency's interpreter, our module
                    shipped = f"{SITE}/{argv[2].removeprefix('recovery.').replace('.', '/')}.py"
                else:
                    shipped = argv[0].lstrip("/")
                assert shipped in files, f"{unit.name} runs {' '.join(argv)}, which the package does not ship"


def test_commands_run_the_running_systems_main(built: debpkg.Deb, tmp_path: Path) -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    expected = {name for name, target in scripts.items() if target.startswith("recovery.updated.")}
    files = contents(built.path)
    assert {p.removeprefix("usr/bin/") for p in files if p.startswith("usr/bin/")} == expected
    assert "reflashctl" in expected and all(files[f"usr/bin/{n}"] == "-rwxr-xr-x" for n in expected)
    subprocess.run(["dpkg-deb", "-x", built.path, tmp_path / "x"], check=True)
    script = (tmp_path / "x/usr/bin/reflashctl").read_text()
    assert script.startswith("#!/usr/bin/python3\n") and "from recovery.updated.cli import main" in script
    # The extracted tree runs with Debian's python3: reflashctl's usage, from the package's files.
    env = {"PYTHONPATH": str(tmp_path / f"x/{SITE}/.."), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["/usr/bin/python3", tmp_path / "x/usr/bin/reflashctl", "--help"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "reflashctl" in proc.stdout, proc.stderr
    where = subprocess.run(["/usr/bin/python3", "-c", "import recovery.updated.cli as m; print(m.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(tmp_path / "x")), where


def test_the_configuration_skeleton_is_a_conffile_naming_every_key(built: debpkg.Deb, tmp_path: Path) -> None:
    files = contents(built.path)
    assert "etc/recovery/system.toml" in files
    assert files["etc/recovery/keys"].startswith("d") and not [p for p in files if p.startswith("etc/recovery/keys/")]
    subprocess.run(["dpkg-deb", "-e", built.path, tmp_path / "control"], check=True)
    assert (tmp_path / "control/conffiles").read_text().split() == ["/etc/recovery/system.toml"]
    skeleton = (REPO / "packaging/debian/system.toml").read_text()
    tree = ast.parse((REPO / "recovery/updated/sysconfig.py").read_text())
    known = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "KNOWN")
    tables = {k for k in known if re.search(rf"^# \[{k}\]", skeleton, re.M)}
    assert [k for k in sorted(known - tables - {"os_release"}) if not re.search(rf"^# {k} = ", skeleton, re.M)] == []
    assert {"daemon", "fleet"} <= tables


def test_depends_on_debians_python3_packages_only(built: debpkg.Deb) -> None:
    depends = [d.strip() for d in field(built.path, "Depends").split(",")]
    names = {d.split()[0].split(":")[0] for d in depends}
    assert names <= {"python3", "python3-cryptography", "python3-psutil", "python3-aiohttp", "python3-libarchive-c"}
    assert "python3 (>= 3.11)" in depends
    assert set(debpkg.dependencies()) <= names  # what the image's root gets before dpkg installs the package


def test_lintian_reports_no_errors(built: debpkg.Deb) -> None:
    """build_deb ran lintian (and would have failed on an error); what it said is kept."""
    assert built.lintian and all(line[:3] in ("W: ", "I: ", "N: ", "P: ", "X: ") for line in built.lintian), built.lintian


def test_lintian_errors_fail_the_build(built: debpkg.Deb, tmp_path: Path) -> None:
    """A package with a lintian error (here: no copyright file) is refused, with the error named."""
    broken = tmp_path / "broken"
    subprocess.run(["dpkg-deb", "-R", built.path, broken], check=True)
    (broken / "usr/share/doc/reflash-appliance/copyright").unlink()
    bad = tmp_path / "bad.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", broken, bad], check=True, capture_output=True)
    with pytest.raises(Failed, match=r"^lintian refuses bad\.deb: E: .*E: reflash-appliance: no-copyright-file"):
        debpkg.lint(bad)


@pytest.mark.parametrize(("version", "debian"), [("0.1.0", "0.1.0"), ("1.0.0rc1", "1.0.0~rc1"),
                                                  ("2.1.dev3", "2.1~dev3"), ("1.0.post2", "1.0+post2")])
def test_versions_sort_as_pep440_says(version: str, debian: str) -> None:
    assert debpkg.debian_version(version) == debian


def test_a_version_debian_cannot_order_is_refused() -> None:
    with pytest.raises(Rejected, match=r"project version 'v1-final' is not a PEP 440 release"):
        debpkg.debian_version("v1-final")


def test_nothing_is_left_in_the_repository(built: debpkg.Deb) -> None:
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--", "packaging", "recovery"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    assert not [line for line in status.splitlines() if line.endswith((".deb", "debian/", ".buildinfo", ".changes"))
                or "debhelper" in line or "/debian/files" in line], status


def test_a_missing_build_tool_is_named_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which
    monkeypatch.setattr(debpkg.shutil, "which", lambda name: None if name == "dh_python3" else real(name))
    with pytest.raises(Failed, match=r"^building the package needs dh_python3 \(make setup installs"):
        debpkg.build_deb(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_line_says_what_it_wrote(built: debpkg.Deb, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from mkimage.cli import main

    monkeypatch.setattr("mkimage.cli.build_deb", lambda out: built)
    assert main(["deb", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {built.path}; lintian: no errors, ") and out.count("\n") == 1, out
