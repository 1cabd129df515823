"""File I/O shared by every stage: the errors of bad input and how commands report them, atomic writes, readers that
name file and line."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from argparse import ArgumentError
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterator


class DataError(ValueError):
    """Bad input or an impossible setting. The message names the file, line and field, or the setting to change."""


class ConfigError(DataError):
    """A setting the command line or a config file gives that cannot be used; the message names the setting."""


def _chain(exc: BaseException | None) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _one_line(text: object) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def user_error(exc: BaseException) -> str | None:
    """The one-line message of a user error in `exc`'s chain, or None for a bug (which keeps its traceback).

    User errors: DataError (bad data or settings, also when jsonargparse wraps one raised by a config class),
    FloatingPointError (non-finite losses or embeddings), Lightning's MisconfigurationException (impossible trainer
    settings), a command line jsonargparse rejects, an OS error on a path.
    """
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, (DataError, FloatingPointError)) or type(e).__name__ == "MisconfigurationException":
            return _one_line(e)
    parse_errors = [e for e in chain if isinstance(e, ArgumentError)]
    if parse_errors:  # nested "Parser key "a": ... Parser key "b.c": <why>" -> "a.b.c: <why>"
        keys = [m[1] for e in chain if (m := re.match(r'Parser key "([^"]+)":', str(e)))]
        keys = [k for i, k in enumerate(keys) if k not in keys[:i]]
        why = _one_line(chain[-1]) if keys else _one_line(parse_errors[0])
        return f"{'.'.join(keys)}: {why}" if keys else why
    if isinstance(exc, OSError):
        return _one_line(exc)
    return None


def run_command(command: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """`command(argv)` (argv defaults to sys.argv[1:]), with user errors (see `user_error`) printed as one
    `error: <message>` line on stderr and exit status 2. `--debug` in argv (removed before the call) or
    MINIREC_DEBUG=1 lets them through with their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MINIREC_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return command(argv)
    except Exception as e:
        message = None if debug else user_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def open_text(path: str | os.PathLike) -> Any:
    """Open a text file, transparently gunzipping `.gz` files. Raises DataError if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-empty line; a malformed line raises DataError naming file and line."""
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                yield lineno, record
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable file ({e})") from None


@cache
def _umask() -> int:
    """The process umask, read once: reading it means setting it, which would race with other threads' file creation."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temp path in the folder of `path` to write; when the block succeeds it becomes `path` by an atomic
    rename, with the permissions a plain `open` would give (mkstemp's are private); on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """The same for a folder: yield a hidden temp folder beside `path`; when the block succeeds it replaces `path`
    (see `atomic_replace_dir`) with the permissions of a plain `mkdir`; on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and an atomic rename."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def as_json(obj: Any) -> Any:
    """`obj` as `atomic_write_json` / `read_json` give it back (dataclasses -> dicts, tuples -> lists, keys -> str,
    other values -> str), so fresh settings compare equal to stored ones."""
    return json.loads(json.dumps(asdict(obj) if is_dataclass(obj) else obj, sort_keys=True, default=str))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises DataError naming it."""
    try:
        with open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def atomic_replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a completely written `tmp_dir` into place as `final_dir` (replacing an older one)."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, final_dir)


def allow_in_checkpoints(*classes: type) -> None:
    """Let Lightning's `weights_only` checkpoint loading rebuild these config dataclasses from saved hyper-parameters."""
    import torch

    torch.serialization.add_safe_globals(list(classes))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint, loaded on the CPU with `weights_only=True` (tensors, plain containers and the config
    classes of `allow_in_checkpoints`, nothing else is unpickled); a foreign, truncated or unsafe file: DataError."""
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            raise DataError(f"{path}: refused to unpickle {unsafe[1]}: checkpoints are loaded with weights_only=True, "
                            "which allows only tensors and the MiniRec configs of allow_in_checkpoints") from None
        raise DataError(f"{path}: not a checkpoint ({str(e).strip().splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise DataError(f"{path}: unreadable checkpoint ({str(e).strip().splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise DataError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return ckpt
