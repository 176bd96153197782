"""Build the Lambda layer and function packages without Docker, and compile the locks they and the host image use.

    python -m layers.build lock [--upgrade]          # layers/requirements-lambda.lock, tmux_host/requirements.lock,
                                                     # functions/<name>/requirements.lock (OWN_LAYERS)
    python -m layers.build layer OUT_DIR [--arch arm64|x86_64] [--python 3.12] [--function NAME]
    python -m layers.build function NAME OUT_DIR
    python -m layers.build all OUT_DIR [--arch ...] [--python ...]   # OUT_DIR/layer[-<name>] and OUT_DIR/<name>
    python -m layers.build digest DIR

The CDK app calls ``build(kind, out_dir, name=...)`` (local bundling). A layer is ``python/`` (Lambda puts
``/opt/python`` on ``sys.path``): the locked wheels for the target platform, installed by pip from the lock with
``--require-hashes`` and ``--only-binary`` (no compiler, no Docker, no code from an sdist runs), then the core package
``tmuxi``. A function is ``functions/__init__.py`` and ``functions/<name>/``: its handler is
``functions.<name>.handler.handler`` and everything else comes from the layer.

Reproducible: the same lock and sources give byte-identical trees (``tree_digest``): no bytecode, no installer
records (RECORD, INSTALLER, REQUESTED, direct_url.json name the machine or the pip that built them), no scripts
(``bin/``: their shebang is this machine's interpreter, and Lambda runs none), one file mode per kind and one mtime.

A function named in ``OWN_LAYERS`` (mcp) has a layer of its own in place of the core one, built the same way from
its own lock (``functions/<name>/requirements.lock``): the core dependencies it imports and its pyproject extra.

Not in the layer: boto3 and what only it needs (botocore, s3transfer, urllib3, python-dateutil, six). Lambda's
Python runtime provides boto3, and the budget (layer + largest function <= 50 MB unzipped, ``MAX_UNZIPPED_BYTES``)
does not hold it: measured on the arm64 build, the layer is 34.1 MB without it and 61.8 MB with it (botocore alone
is 25.0 MB). The code imports boto3 only on first use of S3 or the WebSocket management API, through APIs that have
been stable for years, so the runtime's version serves.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CORE = ROOT / "layers" / "tmuxi"
FUNCTIONS_DIR = ROOT / "functions"
# Paths relative to the root that ``lock`` writes under (the repository's, or a scratch copy for checks)
LAMBDA_LOCK = Path("layers/requirements-lambda.lock")
HOST_LOCK = Path("tmux_host/requirements.lock")
# Wheels downloaded for the layer, per target (gitignored with build/; hashes are checked on every install)
WHEEL_CACHE = ROOT / "build" / "pip-cache"  # (not under .data: the local stack's data, which tests search)
LOCK_COMMAND = "python -m layers.build lock"  # the header of the locks (not uv's command line with its temp paths)

# The deployed target (cdk/functions.py: Runtime.PYTHON_3_12, Architecture.ARM_64)
LAMBDA_PYTHON = "3.12"
LAMBDA_ARCH = "arm64"
ARCHES = {"arm64": "aarch64", "x86_64": "x86_64"}  # Lambda's names -> the wheel platform's
# The newest glibc a wheel may need. Lambda's python3.12 runs on Amazon Linux 2023 (glibc 2.34); uv resolves for
# manylinux_2_28 and pip accepts 2_28 down to 2014 (2_17), so the lock only holds versions that have such wheels.
MANYLINUX_GLIBC_MINOR = 28
# The tmux host's image: Debian bookworm's python3 (3.11.2), on arm64 (Fargate) and x86_64 (developers): one
# universal lock fits both.
HOST_PYTHON = "3.11"
HOST_EXTRA = "host"
# Provided by Lambda's Python runtime, left out of the layer (see the module's docstring).
RUNTIME_PROVIDED = frozenset({"boto3"})
# Layer + the largest function package, unzipped (Lambda's own limit is 250 MB; this is the project's budget).
MAX_UNZIPPED_BYTES = 50_000_000
# Functions with a layer of their own, for dependencies no other function needs that would take the core layer past
# the budget: the mcp package needs cryptography (14.2 MB on arm64: the core layer with mcp was 54.0 MB; the mcp
# layer alone is 30.9 MB). name -> (its pyproject extra, the core dependencies it imports too).
OWN_LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mcp": ("mcp", ("mangum", "httpx", "sniffio", "pydantic", "pydantic-settings")),
}
# What a wheel's installer adds that varies with the machine or the installer, and Lambda never reads.
_INSTALLER_FILES = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})
# One mtime for every file: 1980-01-02, the first day a zip entry can hold in any time zone (CDK zips assets).
FIXED_MTIME = 315_619_200
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class BuildError(RuntimeError):
    """A build step failed; the message names the fix."""


@dataclass(frozen=True)
class Target:
    """The platform a layer is built for."""

    arch: str = LAMBDA_ARCH
    python: str = LAMBDA_PYTHON

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise BuildError(f"unknown arch {self.arch!r}: one of {', '.join(ARCHES)}")
        if not re.fullmatch(r"3\.\d+", self.python):
            raise BuildError(f"python must be a version like 3.12, not {self.python!r}")

    @property
    def machine(self) -> str:
        return ARCHES[self.arch]

    @property
    def platforms(self) -> list[str]:
        """pip's --platform values, newest first: pip does not expand manylinux_2_28 to the older tags itself."""
        minors = range(MANYLINUX_GLIBC_MINOR, 16 if self.machine == "aarch64" else 4, -1)
        tags = [f"manylinux_2_{m}_{self.machine}" for m in minors]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        return tags + [f"{legacy[m]}_{self.machine}" for m in minors if m in legacy]

    def __str__(self) -> str:
        return f"cp{self.python.replace('.', '')} manylinux_2_{MANYLINUX_GLIBC_MINOR} {self.machine}"


# --- helpers the CDK app and the tests use ---------------------------------------------------------------------
def function_names() -> list[str]:
    """Every function: a directory of functions/ with a handler.py."""
    return sorted(p.parent.name for p in FUNCTIONS_DIR.glob("*/handler.py"))


def handler(name: str) -> str:
    """The Lambda handler setting of function ``name``."""
    return f"functions.{name}.handler.handler"


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of everything under ``root``, sorted by that path."""
    entries = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*")]
    yield from sorted(entries)


def tree_digest(root: Path) -> str:
    """sha256 over the tree's sorted relative paths, kinds, modes and contents (not mtimes, not owners)."""
    h = hashlib.sha256()
    for rel, p in _walk(root):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            h.update(b"L\0%s\0%s\0" % (rel.encode(), os.readlink(p).encode()))
        elif stat.S_ISDIR(st.st_mode):
            h.update(b"D\0%s\0%o\0" % (rel.encode(), stat.S_IMODE(st.st_mode)))
        else:
            h.update(b"F\0%s\0%o\0%s\0" % (rel.encode(), stat.S_IMODE(st.st_mode),
                                            hashlib.sha256(p.read_bytes()).hexdigest().encode()))
    return h.hexdigest()


def tree_size(root: Path) -> int:
    """Bytes of the files under ``root``: what the package takes unzipped."""
    return sum(p.lstat().st_size for _, p in _walk(root) if not p.is_dir())


def _progress(message: str) -> None:
    print(f"[build] {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], what: str, *, cwd: Path | None = None, stdin: str | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout}{done.stderr}")
    return done.stdout


# --- locks -----------------------------------------------------------------------------------------------------
def project_name(requirement: str) -> str:
    """The normalised project name of a requirement line (PEP 503)."""
    m = _NAME.match(requirement)
    if m is None:
        raise BuildError(f"cannot read a project name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def core_requirements() -> list[str]:
    """pyproject's ``dependencies``: what the functions (and the host) import."""
    with PYPROJECT.open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def layer_requirements() -> list[str]:
    """The core requirements less what Lambda's runtime provides."""
    return [r for r in core_requirements() if project_name(r) not in RUNTIME_PROVIDED]


def own_lock(name: str) -> Path:
    """The lock of function ``name``'s own layer (``OWN_LAYERS``), relative to the root."""
    return Path("functions") / name / "requirements.lock"


def own_layer_requirements(name: str) -> list[str]:
    """What function ``name``'s own layer holds: the core dependencies it imports (pyproject's lines) and its
    extra."""
    extra, imported = OWN_LAYERS[name]
    with PYPROJECT.open("rb") as f:
        extras: dict[str, list[str]] = tomllib.load(f)["project"]["optional-dependencies"]
    core = [r for r in core_requirements() if project_name(r) in imported]
    if len(core) != len(imported):
        raise BuildError(f"OWN_LAYERS[{name!r}] names core dependencies pyproject does not have: "
                         f"{sorted(set(imported) - {project_name(r) for r in core})}")
    return core + extras[extra]


def locked(lock: Path) -> dict[str, str]:
    """name -> version pinned by a lock file."""
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            pins[project_name(m.group(1))] = m.group(2)
    return pins


def _uv() -> str:
    try:
        from uv import find_uv_bin  # the `uv` wheel (extra "infra")
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            raise BuildError("uv is needed to compile the locks: pip install -e '.[infra]'") from None
        return found
    return str(find_uv_bin())


def lock(root: Path = ROOT, *, upgrade: bool = False) -> list[Path]:
    """Compile both locks under ``root``. A lock that is already there keeps its pins unless pyproject needs
    others (uv prefers the versions of its output file), so re-locking changes only what pyproject changed;
    ``upgrade`` takes the newest versions instead. Under another root, the repository's locks seed the pins."""
    common = ["pip", "compile", "--generate-hashes", "--only-binary", ":all:", "--quiet",
              "--custom-compile-command", LOCK_COMMAND, *(["--upgrade"] if upgrade else [])]
    lambda_target = ["-", "--python-platform", f"{Target().machine}-manylinux_2_{MANYLINUX_GLIBC_MINOR}",
                     "--python-version", LAMBDA_PYTHON]
    jobs = [
        (LAMBDA_LOCK, lambda_target, "\n".join(layer_requirements()) + "\n",
         f"lambda layer (core dependencies less {', '.join(sorted(RUNTIME_PROVIDED))}; {Target()})"),
        *((own_lock(name), lambda_target, "\n".join(own_layer_requirements(name)) + "\n",
           f"{name} function's own layer ([{OWN_LAYERS[name][0]}] and the core dependencies it imports; {Target()})")
          for name in OWN_LAYERS),
        (HOST_LOCK, ["pyproject.toml", "--extra", HOST_EXTRA, "--universal", "--python-version", HOST_PYTHON], None,
         f"tmux host image (core + [{HOST_EXTRA}]; python {HOST_PYTHON}, universal: linux aarch64 and x86_64)"),
    ]
    written = []
    for rel, args, stdin, what in jobs:
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists() and (ROOT / rel).exists() and not upgrade:
            shutil.copyfile(ROOT / rel, out)
        t0 = time.monotonic()
        _run([_uv(), *common, *args, "-o", str(out)], f"uv pip compile ({what})", cwd=ROOT, stdin=stdin)
        _progress(f"lock {rel}: {len(locked(out))} pins for the {what} ({time.monotonic() - t0:.1f} s)")
        written.append(out)
    return written


def _check_lock(lock_file: Path, requirements: list[str] | None = None) -> dict[str, str]:
    """The lock's pins; it must pin every one of ``requirements`` (default: the core layer's)."""
    if not lock_file.exists():
        raise BuildError(f"{lock_file} is missing: run `{LOCK_COMMAND}`")
    pins = locked(lock_file)
    wanted = layer_requirements() if requirements is None else requirements
    missing = sorted({project_name(r) for r in wanted} - pins.keys())
    if missing:
        raise BuildError(f"{lock_file} does not pin {', '.join(missing)} (pyproject changed): run `{LOCK_COMMAND}`")
    provided = sorted(RUNTIME_PROVIDED & pins.keys())
    if provided:
        raise BuildError(f"{lock_file} pins {', '.join(provided)}, which Lambda's runtime provides: run "
                         f"`{LOCK_COMMAND}`")
    return pins


# --- packages --------------------------------------------------------------------------------------------------
def _prepare(out_dir: Path, expected: set[str]) -> None:
    """An empty ``out_dir``: a previous build there (only the ``expected`` entries) is removed; anything else is
    refused rather than deleted."""
    out_dir = out_dir.absolute()
    if out_dir == ROOT or out_dir in ROOT.parents:
        raise BuildError(f"refusing to build into {out_dir}: it holds the repository; choose e.g. build/lambda")
    if out_dir.exists():
        present = {p.name for p in out_dir.iterdir()}
        if present - expected:
            raise BuildError(f"{out_dir} holds {', '.join(sorted(present - expected))}, not a previous build: "
                             "choose an empty or new directory")
        for name in present:
            shutil.rmtree(out_dir / name)
    out_dir.mkdir(parents=True, exist_ok=True)


def _copy(src: Path, dest: Path, patterns: Iterable[str]) -> int:
    """Copy the files under ``src`` that match one of ``patterns`` (relative globs); the count."""
    files = sorted({p for pattern in patterns for p in src.glob(pattern) if p.is_file()})
    for p in files:
        target = dest / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
    return len(files)


def _normalise(root: Path) -> None:
    """One mode per kind (0755 directories and executables, 0644 the rest: Lambda runs the code as another user,
    so everything must be world-readable whatever the builder's umask) and one mtime (FIXED_MTIME)."""
    for _, p in sorted(_walk(root), reverse=True):  # children before their directory (its mtime last)
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = 0o755 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o644
        os.chmod(p, mode)
        os.utime(p, (FIXED_MTIME, FIXED_MTIME))
    os.chmod(root, 0o755)  # noqa: S103 - Lambda runs the code as another user, who must traverse it
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


def _strip(site: Path) -> int:
    """Remove what Lambda never reads and what varies by machine; bytes removed. Measured on the arm64 layer:
    bin/ (console scripts) 2 KB, installer records 121 KB; type stubs (*.pyi, 75 KB) and the one test
    directory (certifi's, 5 KB) stay: not worth a rule."""
    removed = 0
    doomed = [site / "bin"] if (site / "bin").exists() else []
    doomed += [p for p in site.rglob("__pycache__")]
    doomed += [p for d in site.glob("*.dist-info") for p in d.iterdir() if p.name in _INSTALLER_FILES]
    for p in doomed:
        if p.is_dir():
            removed += tree_size(p)
            shutil.rmtree(p)
        elif p.exists():
            removed += p.stat().st_size
            p.unlink()
    return removed


def _install(lock_file: Path, site: Path, target: Target) -> None:
    """pip-install the lock's wheels for ``target`` into ``site``, from the wheel cache (offline: CDK synthesises
    without the network once it has been filled); the wheels it lacks are downloaded into it first. pip's own
    HTTP cache is not enough: it caches only responses that carry cache headers, and a proxy may strip them
    (this machine's does, and every build downloaded the 33 MB again)."""
    cache = WHEEL_CACHE / f"cp{target.python.replace('.', '')}-manylinux_2_{MANYLINUX_GLIBC_MINOR}_{target.machine}"
    pip = [sys.executable, "-m", "pip"]
    select = ["--python-version", target.python, "--implementation", "cp", "--only-binary=:all:",
              "--require-hashes", "--no-deps", "--disable-pip-version-check", "--no-input", "--quiet",
              "-r", str(lock_file)]
    for platform in target.platforms:
        select += ["--platform", platform]
    offline = [*pip, "install", "--target", str(site), "--no-compile", "--no-index", "--find-links", str(cache),
               *select]
    try:
        _run(offline, "pip install (layer, from the wheel cache)")
        return
    except BuildError:
        shutil.rmtree(site, ignore_errors=True)
    _progress(f"layer: downloading the wheels the cache lacks into {cache}")
    _run([*pip, "download", "--dest", str(cache), *select], "pip download (layer)")
    _run(offline, "pip install (layer, from the wheel cache)")


def build_layer(out_dir: Path, target: Target = Target(), lock_file: Path | None = None,
                name: str | None = None) -> Path:
    """The core layer, or with ``name`` the own layer of that function (``OWN_LAYERS``)."""
    if name is not None and name not in OWN_LAYERS:
        raise BuildError(f"function {name!r} has no layer of its own: one of {', '.join(OWN_LAYERS)}")
    lock_file = lock_file or ROOT / (own_lock(name) if name is not None else LAMBDA_LOCK)
    pins = _check_lock(lock_file, own_layer_requirements(name) if name is not None else None)
    _prepare(out_dir, {"python"})
    site = out_dir / "python"
    t0 = time.monotonic()
    label = "layer" if name is None else f"layer {name}"
    _progress(f"{label}: pip install {len(pins)} locked wheels for {target} into {site}")
    _install(lock_file, site, target)
    installed = tree_size(site)
    stripped = _strip(site)
    n = _copy(CORE, site / "tmuxi", ["**/*.py", "db/migrations/*.sql"])  # as pyproject's package-data
    _normalise(out_dir)
    _progress(f"{label}: {installed / 1e6:.1f} MB installed, {stripped / 1e3:.0f} KB stripped, tmuxi ({n} files) "
              f"added: {tree_size(out_dir) / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s")
    return out_dir


def build_function(name: str, out_dir: Path) -> Path:
    if name not in function_names():
        raise BuildError(f"no function {name!r} (functions/<name>/handler.py): one of {', '.join(function_names())}")
    _prepare(out_dir, {"functions"})
    _copy(FUNCTIONS_DIR, out_dir / "functions", ["__init__.py", f"{name}/**/*.py"])
    _normalise(out_dir)
    _progress(f"function {name}: {tree_size(out_dir) / 1e3:.1f} KB")
    return out_dir


def build(kind: str, out_dir: Path, *, name: str | None = None, arch: str = LAMBDA_ARCH,
          python: str = LAMBDA_PYTHON, lock_file: Path | None = None, upgrade: bool = False) -> Path:
    """``kind``: "layer", "function" (with ``name``), "lock" (``out_dir`` is the root the locks go under), or
    "all" (``out_dir``/layer and ``out_dir``/<name> for every function; fails past MAX_UNZIPPED_BYTES)."""
    if kind == "layer":
        return build_layer(out_dir, Target(arch, python), lock_file, name)
    if kind == "function":
        if name is None:
            raise BuildError("a function build needs its name")
        return build_function(name, out_dir)
    if kind == "lock":
        lock(out_dir, upgrade=upgrade)
        return out_dir
    if kind == "all":
        names = function_names()
        out_dir.mkdir(parents=True, exist_ok=True)
        layers: dict[str | None, Path] = {None: build_layer(out_dir / "layer", Target(arch, python), lock_file),
                  **{n: build_layer(out_dir / f"layer-{n}", Target(arch, python), name=n) for n in OWN_LAYERS}}
        layer_sizes = {n: tree_size(path) for n, path in layers.items()}
        totals = {n: layer_sizes[n if n in OWN_LAYERS else None] + tree_size(build_function(n, out_dir / n))
                  for n in names}
        worst = max(totals, key=totals.__getitem__)
        total, layer = totals[worst], layers[worst if worst in OWN_LAYERS else None]
        _progress(f"all: the largest function with its layer ({worst}) = {total / 1e6:.2f} MB unzipped "
                  f"(budget {MAX_UNZIPPED_BYTES / 1e6:.0f} MB)")
        if total > MAX_UNZIPPED_BYTES:
            raise BuildError(f"{worst} with its layer is {total / 1e6:.2f} MB unzipped, over the "
                             f"{MAX_UNZIPPED_BYTES / 1e6:.0f} MB budget: see what grew with `du -sb "
                             f"{layer}/python/* | sort -n`")
        return out_dir
    raise BuildError(f"unknown build kind {kind!r}: layer, function, lock or all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layers.build", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p_lock = sub.add_parser("lock", help="compile layers/requirements-lambda.lock and tmux_host/requirements.lock")
    p_lock.add_argument("--root", type=Path, default=ROOT, help="write the locks under this directory")
    p_lock.add_argument("--upgrade", action="store_true", help="newest versions, not the current pins")
    for kind in ("layer", "all"):
        p = sub.add_parser(kind)
        p.add_argument("out_dir", type=Path)
        p.add_argument("--arch", choices=sorted(ARCHES), default=LAMBDA_ARCH)
        p.add_argument("--python", default=LAMBDA_PYTHON)
        if kind == "layer":
            p.add_argument("--function", dest="name", choices=sorted(OWN_LAYERS),
                           help="the own layer of this function (default: the core layer)")
    p_fn = sub.add_parser("function")
    p_fn.add_argument("name")
    p_fn.add_argument("out_dir", type=Path)
    p_digest = sub.add_parser("digest", help="print a tree's digest (tree_digest)")
    p_digest.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.kind == "digest":
            print(tree_digest(args.out_dir))
        elif args.kind == "lock":
            lock(args.root, upgrade=args.upgrade)
        elif args.kind == "function":
            build("function", args.out_dir, name=args.name)
        else:
            build(args.kind, args.out_dir, arch=args.arch, python=args.python, name=getattr(args, "name", None))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
