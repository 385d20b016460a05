"""The rehearsal's OS switch (`make rehearse OS=debian-13`, `--os`): each OS has its own
image recipe, mirror and apt sources; an unknown OS is refused naming the allowed ones
before anything exists; the chosen OS reaches image.ensure, the mirror stand-in, the
hosts' layout and the rehearsal's state. Fast: nothing is built or booted (debootstrap
and the later steps are stood in for)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rehearsal import __main__ as cli
from rehearsal import image, stack
from rehearsal.layout import build_layout


class Stop(Exception):
    """Raised by a stand-in to end a function where the test has seen enough."""


# ------------------------------------------------------------------ image recipes


def test_each_os_has_its_own_recipe_and_image_name(tally) -> None:
    tally.expect(3 * len(image.OSES))
    names = set()
    for os_name, spec in image.OSES.items():
        r = image.recipe(os_name, tiers=True)
        tally.check(r["os"] == os_name and r["suite"] == spec.suite, r)
        tally.check(image.image_name(os_name, True).startswith(f"{os_name}-tiers-"))
        names.add(image.image_name(os_name, True))
        tally.check(set(image.TIER_PACKAGES) <= set(r["packages"]), os_name)
    assert len(names) == len(image.OSES)


def test_debian_recipes_carry_no_distribution_keys_ubuntus_do() -> None:
    """Debian's recipe keys are those of before other distributions existed, so their
    cached images stay valid; Ubuntu's name its distribution and components."""
    keys = {"recipe_version", "os", "suite", "tiers", "packages", "files", "disabled", "masked"}
    assert set(image.recipe("debian-12")) == keys
    assert set(image.recipe("debian-13")) == keys
    u = image.recipe("ubuntu-24.04", tiers=True)
    assert u["suite"] == "noble" and u["distribution"] == "ubuntu" and u["components"] == ["main", "universe"]
    # Ubuntu's cloud-init would otherwise write its archive over the host's mirror stand-in.
    assert "preserve_sources_list: true" in u["files"]["etc/cloud/cloud.cfg.d/91-hpc-rehearsal-apt.cfg"]
    assert image.recipe("debian-12")["files"] == dict(sorted(image.IMAGE_FILES.items()))


def test_unknown_os_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(image.ImageError, match=r"unknown os 'centos-7': allowed debian-12, debian-13, ubuntu-24\.04"):
        image.recipe("centos-7")
    with pytest.raises(stack.RehearsalError, match=r"unknown OS 'centos-7' .*allowed debian-12, debian-13, ubuntu-24\.04"):
        stack.os_choice("centos-7")


# ------------------------------------------------------------------ mirrors and sources


def test_mirror_of_each_distribution_from_deb822_and_one_line_files(tmp_path: Path) -> None:
    ubuntu = tmp_path / "ubuntu"
    ubuntu.mkdir()
    # As on GitHub's ubuntu-24.04 runners (deb822, two stanzas, a second URI on one line).
    (ubuntu / "ubuntu.sources").write_text(
        "Types: deb\nURIs: http://azure.archive.ubuntu.com/ubuntu/\nSuites: noble noble-updates noble-backports\n"
        "Components: main universe restricted multiverse\nSigned-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://other.example/x http://azure.archive.ubuntu.com/ubuntu/\nSuites: noble-security\n"
        "Components: main universe restricted multiverse\n")
    assert image.mirror((ubuntu,), distribution="ubuntu") == "http://azure.archive.ubuntu.com/ubuntu"
    with pytest.raises(image.ImageError, match=r"no Debian mirror \(a URI ending in /debian\)"):
        image.mirror((ubuntu,), distribution="debian")

    debian = tmp_path / "debian"
    debian.mkdir()
    (debian / "sources.list").write_text("# local\ndeb [arch=amd64] http://deb.example/debian/ bookworm main\n"
                                         "deb http://deb.example/debian-security bookworm-security main\n")
    assert image.mirror((debian,)) == "http://deb.example/debian"
    # A Debian machine has no Ubuntu mirror: Ubuntu's own archive.
    assert image.mirror((debian,), distribution="ubuntu") == "http://archive.ubuntu.com/ubuntu"


def test_apt_sources_per_distribution() -> None:
    assert image.OSES["debian-12"].sources_list("http://deb.example/debian") == (
        "deb http://deb.example/debian bookworm main\n"
        "deb http://deb.example/debian bookworm-updates main\n"
        "deb http://deb.example/debian-security bookworm-security main\n")
    assert image.OSES["ubuntu-24.04"].sources_list("http://archive.ubuntu.com/ubuntu") == (
        "deb http://archive.ubuntu.com/ubuntu noble main universe\n"
        "deb http://archive.ubuntu.com/ubuntu noble-updates main universe\n"
        "deb http://archive.ubuntu.com/ubuntu noble-security main universe\n")


@pytest.mark.parametrize("os_name", ["debian-12", "ubuntu-24.04"])
def test_build_runs_debootstrap_for_the_os_and_writes_its_sources(
        os_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """debootstrap gets the OS's suite, mirror, keyring, components and script (Debian's
    command line as before: none of the three); the image's sources.list is the OS's."""
    runs: list[list[str]] = []

    def fake_run(argv: list[str], log: Any, **kw: Any) -> None:
        runs.append(argv)
        root = Path(argv[argv.index(image.OSES[os_name].suite) + 1])
        for d in ("etc/apt", "usr/sbin", "etc/systemd/system"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def stop(*a: Any, **kw: Any) -> None:
        raise Stop

    mirrors = {"debian": "http://deb.example/debian", "ubuntu": "http://ub.example/ubuntu"}
    monkeypatch.setattr(image, "mirror", lambda distribution="debian": mirrors[distribution])
    monkeypatch.setattr(image, "_run", fake_run)
    monkeypatch.setattr(image, "_in_root", stop)  # the first package install: far enough
    with pytest.raises(Stop):
        image._build(image.recipe(os_name), tmp_path, None, tmp_path / "debs")
    [argv] = runs
    spec = image.OSES[os_name]
    url = mirrors[spec.distribution]
    tail = [spec.suite, str(tmp_path / "root"), url]
    if os_name == "debian-12":
        assert argv == ["debootstrap", "--variant=minbase", "--include=ca-certificates",
                        f"--cache-dir={tmp_path / 'debs'}", *tail]
    else:
        assert argv[-4:] == [*tail, "gutsy"], argv
        assert "--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg" in argv
        assert "--components=main,universe" in argv
    assert (tmp_path / "root/etc/apt/sources.list").read_text() == spec.sources_list(url)


def test_tools_installs_the_keyring_an_ubuntu_build_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing keyring: installed when the package lists have it (Ubuntu, Debian 13),
    else an error that names it (Debian 12 without backports) and installs nothing."""
    runs: list[list[str]] = []
    monkeypatch.setattr(image, "_run", lambda argv, log, **kw: runs.append(argv))
    monkeypatch.setattr(image, "OSES", dict(image.OSES, **{"ubuntu-24.04": image.OsSpec(
        "noble", distribution="ubuntu", keyring=str(tmp_path / "absent.gpg"), keyring_package="ubuntu-keyring")}))
    monkeypatch.setattr(image, "_in_package_lists", lambda p: True)
    image._tools(None, "ubuntu-24.04")
    assert runs[-1][:2] == ["apt-get", "install"] and runs[-1][-1] == "ubuntu-keyring", runs
    runs.clear()
    monkeypatch.setattr(image, "_in_package_lists", lambda p: p != "ubuntu-keyring")
    with pytest.raises(image.ImageError, match=r"ubuntu-keyring \(for ubuntu-24\.04\) is not in this machine's "
                                               r"package lists \(Debian 12 has ubuntu-keyring only in bookworm-backports"):
        image._tools(None, "ubuntu-24.04")
    assert not any(a[:2] == ["apt-get", "install"] for a in runs)
    runs.clear()
    monkeypatch.setattr(image, "OSES", dict(image.OSES, **{"ubuntu-24.04": image.OsSpec(
        "noble", distribution="ubuntu", keyring=__file__, keyring_package="ubuntu-keyring")}))
    image._tools(None, "ubuntu-24.04")  # the keyring is there (as on an Ubuntu runner): nothing to do
    assert not any("ubuntu-keyring" in a for a in runs), runs


# ------------------------------------------------------------------ the CLI and the state


def test_cli_os_defaults_to_env_then_debian_12(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    class NoLock:
        def acquire(self, **kw: Any) -> None:
            pass

        def release(self) -> None:
            pass

    monkeypatch.setattr(cli, "preflight", lambda: None)
    monkeypatch.setattr(cli, "Lock", NoLock)
    monkeypatch.setattr(cli, "up", lambda stack_name, workdir, **kw: seen.append(kw))
    monkeypatch.delenv("OS", raising=False)
    assert cli.main(["up"]) == 0 and seen[-1]["os_name"] == "debian-12"
    monkeypatch.setenv("OS", "debian-13")
    assert cli.main(["up"]) == 0 and seen[-1]["os_name"] == "debian-13"
    assert cli.main(["up", "--os", "ubuntu-24.04"]) == 0 and seen[-1]["os_name"] == "ubuntu-24.04"
    monkeypatch.setenv("OS", "centos-7")
    n = len(seen)
    assert cli.main(["up"]) == 2 and len(seen) == n  # refused before `up`


def test_unknown_os_stops_up_before_anything_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "preflight", lambda: pytest.fail("preflight ran for an unknown OS"))
    with pytest.raises(stack.RehearsalError, match="allowed debian-12"):
        stack.up("prod", tmp_path / "work", os_name="centos-7")
    assert not (tmp_path / "work").exists()


def test_the_chosen_os_reaches_image_mirror_layout_and_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stack.up with --os debian-13, stopped once the state is written (before any
    namespace): the image and the mirror stand-in are trixie's, the state records both,
    and a layout rebuilt from the workdir (as `drill` does) names the OS for hosts.py."""
    from rehearsal import mirror, netns

    asked: dict[str, Any] = {}

    def fake_image(os_name: str, tiers: bool, progress: Any = None) -> Path:
        asked["image"] = (os_name, tiers)
        return tmp_path / "img"

    def fake_mirror(debs: Path) -> Path:
        asked["debs"] = debs
        return tmp_path / "mirror"

    def stop(layout: Any) -> None:
        raise Stop

    monkeypatch.setattr(stack, "preflight", lambda: None)
    monkeypatch.setattr(stack, "running", lambda workdir: False)
    monkeypatch.setattr(stack, "say", lambda msg: None)
    monkeypatch.setattr(image, "ensure", fake_image)
    monkeypatch.setattr(mirror, "ensure", fake_mirror)
    monkeypatch.setattr(netns, "create", stop)
    work = tmp_path / "work"
    with pytest.raises(Stop):
        stack.up("prod", work, portal="standin", os_name="debian-13")
    assert asked["image"] == ("debian-13", True)
    assert asked["debs"] == image.CACHE_DIR.parent / "debs" / "trixie"
    state = json.loads((work / "state.json").read_text())
    assert (state["os"], state["suite"]) == ("debian-13", "trixie")
    assert build_layout("prod", work).os_name == "debian-13"
    assert build_layout("prod", tmp_path / "elsewhere").os_name == "debian-12"
