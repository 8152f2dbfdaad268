"""Start a process that cannot see the driver's disk, as an SDK worker on another machine could not.

The process runs in a private mount namespace (`unshare --mount --propagation private`; as non-root
inside a user namespace too), with a private, empty `/tmp`, `/var/tmp` and `/dev/shm` (tmpfs), and an empty
read-only tmpfs over each directory of the driver's working tree that a worker must not use: the checkout's directories
(`examples/`, `tests/`, `pipelines/`, ...) and the driver's working directory. What a worker needs
stays visible: the interpreter, its standard library and site-packages (the venv), and this
project's installed packages (`beam_pipeline`, `transforms`, `runners`), which on a cluster would be
installed on every worker. Its working directory is a fresh one in its private `/tmp`. Files directly
in the checkout's root (README.md, setup.py) and symbolic links stay visible: only directories are
covered, and a mount over a symlink would land on its target. System directories (`/usr`, `/etc`,
top-level directories) are never covered.

`portable-local` isolates its job service and each SDK worker this way by default. Opt out with
BEAM_PIPELINE_ISOLATE_WORKERS=0 (or `local_portable_services(isolate=False)`). When the kernel refuses
a private mount namespace the workers run unisolated and a warning says so, except with CI=true,
where asking for isolation that cannot be had is an error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Sequence

from runners.preflight import RunnerConfigError

ENV = "BEAM_PIPELINE_ISOLATE_WORKERS"
# Scratch space every process may write: private and empty in each namespace. Each would otherwise be
# a disk the driver and the workers share (/dev/shm also holds multiprocessing's semaphores).
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
PACKAGES = ("beam_pipeline", "transforms", "runners")
# Top-level directories of the OS: never covered, whatever the working directory is.
SYSTEM_DIRS = frozenset(
    "/" + d for d in "bin boot dev etc lib lib32 lib64 libx32 nix opt proc run sbin snap srv sys usr var".split()
)

log = logging.getLogger(__name__)
# A fallback to shared disk must be seen even where the CLI quiets library logging (root at ERROR).
log.setLevel(logging.WARNING)


class IsolationError(RunnerConfigError):
    """SDK worker isolation was asked for and cannot be set up here."""


@dataclasses.dataclass(frozen=True)
class Isolation:
    """How to start a process in its own mount namespace; `hidden` are the directories covered there,
    `rebind` the kept directories under a private one (a venv in /tmp), shown again on top of it."""

    unshare: tuple[str, ...]
    hidden: tuple[str, ...] = ()
    rebind: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.rebind) > len(_REBIND_FDS):
            raise IsolationError(
                f"{len(self.rebind)} directories the workers need are under {', '.join(PRIVATE_DIRS)} "
                f"({', '.join(self.rebind)}); at most {len(_REBIND_FDS)} can be shown there: move the venv "
                f"or the checkout out of them, or set {ENV}=0"
            )

    def command(self, argv: Sequence[str], workdir: str) -> list[str]:
        """`argv` run in a new private mount namespace, with a fresh /tmp and `workdir` (a name) in it as cwd."""
        if "/" in workdir or workdir in ("", ".", ".."):
            raise ValueError(f"workdir {workdir!r}: expected a plain directory name")
        rebind = list(zip(_REBIND_FDS, self.rebind, strict=False))
        # Kept directories under a private one are opened before it is covered, then bound back from the
        # open descriptor (mount would canonicalize a path, which then names the new, empty directory).
        steps = ["set -e"] + [f"exec {fd}<{shlex.quote(p)}" for fd, p in rebind]
        steps += [f"mount -t tmpfs -o mode=1777 beam-private {d}" for d in PRIVATE_DIRS if os.path.isdir(d)]
        for fd, p in rebind:
            steps += [f"mkdir -p {shlex.quote(p)}", f"mount --no-canonicalize --bind /proc/$$/fd/{fd} {shlex.quote(p)}"]
            steps.append(f"exec {fd}<&-")
        steps += [f"mount -t tmpfs -o ro,mode=0755 beam-hidden {shlex.quote(p)}" for p in self.hidden]
        steps += [f"mkdir -p /tmp/{workdir}", f"cd /tmp/{workdir}", 'exec "$@"']
        return [*self.unshare, "--", "/bin/sh", "-c", "; ".join(steps), "sh", *argv]

    def nested(self) -> Isolation:
        """Another namespace inside this one (it inherits the hidden directories), with its own /tmp."""
        return Isolation(self.unshare, rebind=self.rebind)


# Descriptors /bin/sh can redirect by number (a single digit), past stdin, stdout and stderr.
_REBIND_FDS = tuple(range(3, 10))


def for_workers(unshare: Sequence[str]) -> Isolation:
    """The isolation of an SDK worker started from inside an isolated process (the job service)."""
    return Isolation(tuple(unshare), rebind=tuple(rebinds(keep_paths())))


def rebinds(keep: Iterable[str], private: Iterable[str] = PRIVATE_DIRS) -> list[str]:
    """The kept directories that a private directory's fresh tmpfs would hide, outermost only."""
    private = [os.path.realpath(p) for p in private]
    under = sorted({os.path.realpath(k) for k in keep if any(_under(os.path.realpath(k), p) for p in private)})
    under = [k for k in under if os.path.isdir(k) and k not in private]
    return [k for k in under if not any(k != q and _under(k, q) for q in under)]


def requested(isolate: bool | None = None) -> bool:
    """`isolate` if given, else BEAM_PIPELINE_ISOLATE_WORKERS (default on; 0/false/no/off turn it off)."""
    if isolate is not None:
        return isolate
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def decide(isolate: bool | None = None) -> Isolation | None:
    """The isolation to use, or None when it is off or (outside CI) impossible; logs why it is off."""
    if not requested(isolate):
        log.info("SDK workers are not isolated (%s=0): they see the driver's disk", ENV)
        return None
    unshare, reason = probe()
    if unshare is None:
        if os.environ.get("CI", "").strip().lower() == "true":
            raise IsolationError(
                f"SDK worker isolation is on and impossible here: {reason}. CI=true, so this is an error; "
                f"run as root with util-linux's unshare, or set {ENV}=0 to let workers share the driver's disk"
            )
        log.warning("SDK workers are NOT isolated and share the driver's disk: %s (set %s=0 to silence)", reason, ENV)
        return None
    keep = keep_paths()
    return Isolation(tuple(unshare), tuple(paths_to_hide(keep, os.getcwd(), _checkout_root())), tuple(rebinds(keep)))


def probe() -> tuple[list[str] | None, str]:
    """An unshare command prefix that can mount a tmpfs in a private namespace here, or None and why not."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "`unshare` (util-linux) is not on PATH"
    variants = [[unshare, "--mount", "--propagation", "private"]]
    if os.geteuid() != 0:
        variants.insert(0, [unshare, "--user", "--map-root-user", "--mount", "--propagation", "private"])
    errors = []
    for prefix in variants:
        try:
            done = subprocess.run(
                [*prefix, "--", "mount", "-t", "tmpfs", "beam-probe", "/tmp"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{shlex.join(prefix)}: {e}")
            continue
        if done.returncode == 0:
            return prefix, ""
        errors.append(f"{shlex.join(prefix)} -- mount -t tmpfs: {done.stderr.strip() or f'exit {done.returncode}'}")
    return None, "the kernel refused a private mount namespace (" + "; ".join(errors) + ")"


def keep_paths() -> list[str]:
    """What a worker needs to see: the interpreter, its libraries, site-packages and this project's packages."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    paths += [p for p in sysconfig.get_paths().values() if p]
    paths += site.getsitepackages()
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            paths += list(spec.submodule_search_locations)
    return sorted({os.path.realpath(p) for p in paths})


def _checkout_root() -> str:
    """The directory this project's packages sit in: a source checkout, or site-packages when installed."""
    spec = importlib.util.find_spec("beam_pipeline")
    return os.path.dirname(os.path.realpath(next(iter(spec.submodule_search_locations))))


def paths_to_hide(keep: Iterable[str], cwd: str, checkout: str, private: Iterable[str] = PRIVATE_DIRS) -> list[str]:
    """Directories to cover so a worker sees none of the driver's files but still sees every `keep` path.

    The checkout and the working directory are covered whole when they hold nothing to keep, else
    directory by directory around what is kept. What is under a `private` directory (a fresh tmpfs
    in the namespace) is hidden already.
    """
    keep = [os.path.realpath(p) for p in keep]
    private = [os.path.realpath(p) for p in private]
    hidden: list[str] = []
    for root in dict.fromkeys(os.path.realpath(p) for p in (checkout, cwd)):
        if _is_system(root) or any(_under(root, p) for p in private):
            continue
        _cover(root, keep, hidden)
    hidden = sorted(set(hidden))
    return [p for p in hidden if not any(p != q and _under(p, q) for q in hidden)]


def _cover(path: str, keep: list[str], hidden: list[str]) -> None:
    if path in keep or os.path.islink(path) or not os.path.isdir(path):
        return
    if not any(_under(k, path) for k in keep):
        hidden.append(path)
        return
    for name in sorted(os.listdir(path)):
        _cover(os.path.join(path, name), keep, hidden)


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _is_system(path: str) -> bool:
    """The root, a top-level directory, or anything under the OS's own directories."""
    if path.count("/") < 2 or path == "/":
        return True
    return any(_under(path, d) for d in SYSTEM_DIRS)
