"""Writing outputs without losing data: overwrite checks, atomic folders and files, strict JSON, provenance.

A folder is written into a temporary sibling `.NAME.tmp-PID-XXXX` and moved into place only when complete. Replacing
an existing folder swaps the two atomically (Linux `renameat2(RENAME_EXCHANGE)`), so at every instant NAME holds
either the old or the new copy. Where the swap is not available, the old copy is first renamed to `.NAME.old-PID`;
a crash between the two renames is repaired by the next `atomic_output` on the same path, which puts the `.old`
copy back. Leftovers of killed writers are removed at the same time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

EXCHANGE = True  # swap folders with renameat2(RENAME_EXCHANGE) where the OS offers it (False: two renames)
_TMP, _OLD = ".tmp-", ".old-"


def check_output(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raise `UserError` if `path` is a file or a non-empty folder and `overwrite` is false."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    if path.is_file():
        raise UserError(f"{path} exists; pass {flag} to replace it")
    if any(path.iterdir()):
        raise UserError(f"{path} exists and is not empty; pass {flag} to replace it")


def _owner_alive(leftover: Path) -> bool:
    """Whether the process named in a leftover's name (`.NAME.tmp-PID-...` / `.NAME.old-PID`) is still running."""
    tail = leftover.name.rsplit(_TMP if _TMP in leftover.name else _OLD, 1)[-1]
    try:
        pid = int(tail.split("-", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # this process is only starting to write this path
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_leftovers(path: str | os.PathLike) -> list[str]:
    """Repair what killed writers of `path` left beside it; returns one phrase per action.

    A `.NAME.old-PID` copy goes back to NAME if NAME is missing (a replace died between its two renames), else it
    is deleted; `.NAME.tmp-PID-*` folders are deleted. Leftovers of a writer that is still running are kept.
    """
    out = Path(path)
    if not out.parent.is_dir():
        return []
    done = []
    stem = glob.escape(f".{out.name}")
    for old in sorted(out.parent.glob(f"{stem}{_OLD}*")):
        if _owner_alive(old):
            continue
        if not out.exists():
            old.rename(out)
            done.append(f"restored {out} from {old.name}")
        else:
            _remove(old)
            done.append(f"removed {old.name}")
    for tmp in sorted(out.parent.glob(f"{stem}{_TMP}*")):
        if not _owner_alive(tmp):
            _remove(tmp)
            done.append(f"removed {tmp.name}")
    return done


def publish_permissions(folder: Path) -> None:
    """Give a finished folder the permissions the user's umask gives new files (mkdtemp makes it 0700, safetensors
    writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    if not EXCHANGE or not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def move_into_place(tmp: Path, out: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Move the finished folder `tmp` to `out`. A non-empty `out` is replaced only with `overwrite`; afterwards the
    old copy sits at `tmp` (swap) or is already deleted (two renames). Callers delete `tmp`."""
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if not occupied:
        tmp.rename(out)  # rename(2) replaces an empty folder atomically
        return
    if not overwrite:  # callers check first; checked again because loading can take minutes
        raise UserError(f"{out} appeared while writing; pass {flag} to replace it")
    if _exchange(tmp, out):
        return
    old = out.with_name(f".{out.name}{_OLD}{os.getpid()}")
    out.rename(old)
    tmp.rename(out)  # a crash before this line is repaired by the next recover_leftovers(out)
    _remove(old)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite"):
    """Yield a temporary folder beside `path`; on success move it into place as `path`.

    Before anything is written: leftovers of earlier crashes are cleaned or recovered (`recover_leftovers`) and an
    existing non-empty `path` is refused unless `overwrite`. An exception (or a kill) never touches the old copy.
    """
    out = Path(path)
    recover_leftovers(out)
    check_output(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP}{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        publish_permissions(tmp)
        move_into_place(tmp, out, overwrite, flag)
    finally:
        _remove(tmp)  # the unfinished folder, or the old copy after a swap


def strict(obj):
    """`obj` with every NaN or infinite float replaced by None (JSON has no such numbers); numpy scalars and
    arrays become Python numbers and lists, paths become strings."""
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":
        return strict(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj, indent: int | None = 2) -> str:
    """Strict JSON text (`strict` then `allow_nan=False`) ending in a newline."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False) + "\n"


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Write a file atomically: `write(tmp)` fills a temporary file in the same folder (with `path`'s suffix, so that
    e.g. matplotlib's `savefig` picks the format), then `os.replace` puts it in place. A failure leaves `path` alone."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (`write_file`)."""
    write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """Write `obj` as strict JSON (NaN and infinities become null), atomically."""
    write_text(path, dumps(obj, indent))


def command_line(argv: list[str] | None = None, prog: str | None = None) -> str:
    """The command as run, for provenance records: `prog` (default: how this Python process was started, e.g.
    `python -m finetune` or `python convert.py`) followed by `argv` (default: `sys.argv[1:]`), shell-quoted."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if prog is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
        if spec is not None and spec.name:
            prog = f"python -m {spec.name.removesuffix('.__main__')}"
        elif argv0.suffix == ".py":
            with contextlib.suppress(ValueError):
                argv0 = argv0.resolve().relative_to(Path.cwd())
            prog = shlex.join(["python", str(argv0)])
        else:
            prog = argv0.name
    return " ".join([prog, shlex.join(args)]).strip()
