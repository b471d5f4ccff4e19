"""Where slmkit writes: checks on an output path before any work, and the cleanup of what killed writes leave.

Every command that writes a model directory, a GGUF file, a run, a data dir or a report calls
:func:`check_output` first, so a file given where a directory is meant (or one under a file), an
unwritable place, or something of the user's that would be replaced ends in one `error:` line before
minutes of work. Replacing an existing output needs `overwrite=True` (`--overwrite`), and even then a
file never replaces a directory, nor a directory a file.

Atomic writes (`slmkit.interop.checkpoint.atomic_directory`, the GGUF writer) go through temporaries
named `.NAME.tmp-*` / `.NAME.*.tmp` and, while replacing, `.NAME.old-PID`. A process killed mid-write
leaves them behind; :func:`clean_stale_temporaries` removes those of processes no longer alive and puts a
lone `.NAME.old-PID` back as NAME.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from slmkit.errors import UserError

OVERWRITE_HINT = "pass --overwrite to replace it"

# a temporary of one of our atomic writes, and the PID it carries where it carries one
_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")
_TMP_DIR = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<rand>[A-Za-z0-9_-]+)$")
_TMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<rand>[A-Za-z0-9_-]+)\.tmp$")
_PID_PREFIX = "p"  # temporaries name their writer's PID as .NAME.tmp-pPID-... so a live writer's are kept


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_output(
    path: str | Path,
    kind: Literal["dir", "file"],
    overwrite: bool = False,
    option: str = "--out",
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Check that `path` can be written as a `kind` ("dir" or "file") before any work is done.

    Refused, as a :class:`UserError`: a path that lies under a file; a file where a directory is meant or
    the reverse (whatever `overwrite` says); a place this process cannot write; and, without `overwrite`,
    an existing file or non-empty directory, unless `replaceable(path)` says it is ours to replace (e.g.
    a run being resumed). Returns the path.
    """
    path = Path(path).expanduser()
    existing = _nearest_existing(path)
    if existing != path and not existing.is_dir():
        raise UserError(f"{option} {path} lies under {existing}, which is a file; choose another {option}")
    if os.path.lexists(path):
        if kind == "dir" and not path.is_dir():
            raise UserError(f"{option} {path} is a file, not a directory; choose another {option}")
        if kind == "file" and path.is_dir():
            raise UserError(f"{option} {path} is a directory; give a file name like {path / 'model.gguf'}")
        in_use = path.is_file() or any(path.iterdir())
        if in_use and not overwrite and not (replaceable is not None and replaceable(path)):
            what = "file" if path.is_file() else "directory"
            raise UserError(f"{option} {path}: {what} already exists ({OVERWRITE_HINT})")
    check_writable(path if path.is_dir() else existing if existing != path else path.parent, option)
    return path


def check_writable(directory: Path, option: str = "--out") -> None:
    """UserError unless this process can create files in `directory` (tried, not inferred from mode bits:
    root ignores them, and a read-only mount does not show in them)."""
    try:
        probe = tempfile.mkdtemp(prefix=".slmkit-write-check-", dir=directory)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UserError(f"{option}: cannot write into {directory} ({reason}); choose another {option}") from None
    os.rmdir(probe)


# ---- temporaries left by killed writes --------------------------------------------------------------
def temp_prefix(name: str) -> str:
    """The prefix of this process's temporaries for the output NAME (`.NAME.tmp-pPID-`)."""
    return f".{name}.tmp-{_PID_PREFIX}{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _temp_pid(rand: str) -> int | None:
    """The writer's PID carried in a temporary's random part (`pPID-...` / `pPID_...`), None if it has none."""
    m = re.match(rf"^{_PID_PREFIX}(\d+)[-_]", rand)
    return int(m.group(1)) if m else None


def clean_stale_temporaries(directory: str | Path, name: str | None = None) -> None:
    """Remove from `directory` the temporaries of writes to NAME (every name when None) by processes no
    longer alive, and put a lone `.NAME.old-PID` (a kill between the two renames of an atomic replace) back
    as NAME. A live process's temporaries are kept: it may be writing beside us."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        match = _OLD.match(entry.name)
        if match and (name is None or match.group("name") == name):
            pid = int(match.group("pid"))
            if pid != os.getpid() and pid_alive(pid):
                continue
            final = directory / match.group("name")
            if not os.path.lexists(final):
                os.replace(entry, final)  # the previous output, whole: the kill came before the new one went in
            else:
                _remove(entry)
            continue
        # a scan of every name takes only directory temporaries (runs write nothing else): a stray user file
        # named like `.a.b.tmp` is not ours to delete
        match = _TMP_DIR.match(entry.name) or (_TMP_FILE.match(entry.name) if name is not None else None)
        if match and (name is None or match.group("name") == name):
            pid = _temp_pid(match.group("rand"))
            # one without a PID (written before temporaries carried one) is taken as stale
            if pid is not None and (pid == os.getpid() or pid_alive(pid)):
                continue
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


def use_umask(path: Path, directory: bool = False) -> None:
    """Give a file or directory created private (0600/0700: `tempfile`, safetensors' writer) the permissions a
    plain open()/mkdir() would have, so what replaces the final path can be read by others as usual (a GGUF
    file served by another user's llama.cpp or ollama, a model directory on a shared disk)."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod((0o777 if directory else 0o666) & ~mask)


def files_per_umask(directory: Path) -> None:
    """Every plain file under `directory` gets the permissions its umask gives a new file."""
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) & 0o077 == 0:
            use_umask(path)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` in one rename.

    On any exception the temporary directory is removed and `final` is untouched. Temporaries of earlier
    writes that were killed are cleaned up first (see `clean_stale_temporaries`). Torch-free, so commands that write
    no model (`slm data clean`) use it too.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), dir=final.parent))
    try:
        use_umask(tmp, directory=True)
        yield tmp
        _fsync_dir_files(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # the previous directory goes back under its name
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
