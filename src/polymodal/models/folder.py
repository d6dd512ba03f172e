"""A saved model is a folder: ``config.json``, ``model.safetensors`` and whatever else it needs
(a tokenizer). Folders are written beside the target and swapped in, so a crash never leaves
half a model."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from polymodal.errors import InputError
from polymodal.modalities.text import TOKENIZER_FILE, TextTokenizer

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


# ---- writing: unique temporaries beside the target, swapped in whole ----------------------------
#
# Every write goes to a temporary beside its target, named ``.<target>.<pid>.<host>.<random>.tmp``:
# unique, so two writers of one target never collide, and naming its writer, so that the next
# writer can remove what a killed one left (its process is gone) without touching what a live
# one is still writing. A folder is put in place by one atomic exchange of names (Linux
# ``renameat2(RENAME_EXCHANGE)``), so a reader or a crash sees the old folder or the new one,
# never a half-written one and never none at all.

TEMPORARY_SUFFIX = ".tmp"
FOREIGN_STALE_AFTER_S = 24 * 3600  # another host's processes cannot be asked: its leftovers wait a day
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _temporary_path(target: Path) -> Path:
    """A new name beside ``target`` that no other writer uses (not yet created)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{_host()}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")


def _temporary_owner(name: str, target_name: str) -> tuple[int, str] | None:
    """The (pid, host) that wrote the temporary ``name`` of ``target_name``; None if it is not one."""
    match = re.fullmatch(rf"\.{re.escape(target_name)}\.(\d+)\.([A-Za-z0-9-]+)\.[0-9a-f]+{re.escape(TEMPORARY_SUFFIX)}",
                         name)
    return (int(match[1]), match[2]) if match else None


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: keep the file, let age decide
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``target`` whose writers died (``kill -9``, a crash, a lost
    machine): those of this host whose process is gone, and other hosts' once a day old. A live
    writer's temporary, this process's included, is left alone. Returns what was removed."""
    target = Path(target)
    try:
        entries = list(os.scandir(target.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        owner = _temporary_owner(entry.name, target.name)
        if owner is None:
            continue
        pid, host = owner
        try:
            if host == _host():
                if pid == os.getpid() or _process_alive(pid):
                    continue
            elif time.time() - entry.stat(follow_symlinks=False).st_mtime < FOREIGN_STALE_AFTER_S:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another writer cleaned it first
            continue
        removed.append(Path(entry.path))
    return removed


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Push a file's (or a folder's list of names') bytes to the disk, so that a power cut after
    the rename cannot leave a renamed but empty file."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:  # folders cannot be opened on some systems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``target`` through ``write(temporary)`` and rename it into place: a reader or a crash
    sees the old file or the new one. A failed write removes its temporary; stale ones left by
    killed writers are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = _temporary_path(target)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # claimed; the umask applies
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(target.parent, directory=True)
    return target


@functools.cache
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux, or a C library without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step; False where the system or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(new: Path, directory: Path) -> None:
    """Put the folder ``new`` at ``directory``. Afterwards ``new`` holds the folder that was there
    (or nothing). Several writers may race: each attempt either lands or is retried."""
    while True:
        try:
            os.rename(new, directory)  # nothing there yet (or an empty folder)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        try:
            if _exchange(new, directory):
                return
            # no atomic exchange here: move the old folder aside, then the new one in (a reader
            # between the two renames finds no folder; a crash there leaves the old one aside)
            aside = _temporary_path(directory)
            os.rename(directory, aside)
        except FileNotFoundError:  # another writer moved it away meanwhile: try again
            continue
        try:
            os.rename(new, directory)
        except OSError as e:
            if not directory.exists():  # put the old one back rather than leave nothing
                os.rename(aside, directory)
                raise
            shutil.rmtree(aside, ignore_errors=True)  # another writer's folder landed first
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        os.rename(aside, new)
        return


def write_folder_atomically(directory: str | os.PathLike, fill: Callable[[Path], None],
                            replaceable: Callable[[Path], bool]) -> Path:
    """Write a folder through ``fill(temporary folder)`` and swap it in whole: readers and crashes
    see the old folder or the new one. An existing folder is replaced only if ``replaceable``
    says it is one of ours (or it is empty): a mistyped path never deletes a user's files."""
    directory = Path(directory)
    if directory.is_symlink():  # write where the link points, keep the link
        directory = directory.resolve()
    if directory.exists():
        if not directory.is_dir():
            raise InputError(directory, "exists and is not a folder")
        if any(directory.iterdir()) and not replaceable(directory):
            raise InputError(directory, "exists and holds other files; not replacing it (choose a new or empty folder)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    tmp = _temporary_path(directory)
    tmp.mkdir()
    try:
        fill(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(tmp, directory=True)
        _swap_in(tmp, directory)
        _fsync(directory.parent, directory=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old version after a swap, the new one after a failure
    return directory


def write_model_folder(directory: str | os.PathLike, config: dict, state: dict[str, torch.Tensor],
                       extra: Callable[[Path], None] | None = None) -> Path:
    """Write a model folder (``config.json``, ``model.safetensors``, and whatever ``extra`` adds
    to the folder it is given) atomically: see :func:`write_folder_atomically`. Two processes
    saving one folder both succeed; the folder is then the whole of one of their versions."""
    def fill(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        if extra is not None:
            extra(tmp)

    return write_folder_atomically(directory, fill, replaceable=lambda d: (d / CONFIG_FILE).is_file())


# ---- reading: nothing is trusted, nothing is allocated before it is checked ---------------------
#
# A model folder may come from anyone. Its files are read in this order, each bounded before it
# costs memory: the config (a small JSON object), the tokenizer (its size and what it may run),
# then the weights file's header (names, dtypes and shapes, read without the tensors), and only
# then the tensors the model needs. Every failure is one InputError naming the file.

MAX_CONFIG_BYTES = 16 << 20  # a config is a few kB; 16 MiB leaves room for long class lists
MAX_TOKENIZER_BYTES = 64 << 20  # the largest published vocabularies (250,000 tokens) are ~20 MB
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def one_line(error: object, limit: int = 300) -> str:
    """``error``'s message on one line, cut to ``limit`` characters (messages from libraries
    may span lines or quote a whole file)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: Path, max_bytes: int, what: str) -> object:
    """The JSON in ``path`` (at most ``max_bytes``), parsed strictly: no NaN or Infinity, no
    nesting deeper than Python's parser allows, no integers of thousands of digits."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(path, f"{what} of {size:,} bytes; the limit is {max_bytes:,}")
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except InputError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(path, f"not valid JSON: {one_line(e)}") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or one_line(e)}") from None


def read_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of a saved model folder, as a dict: the one reader of that file, so
    every caller gets the same clear error for a missing, unreadable or malformed config."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InputError(directory, f"no {CONFIG_FILE}: not a saved polymodal model")
    raw = read_json(path, MAX_CONFIG_BYTES, "a config")
    if not isinstance(raw, dict):
        raise InputError(path, f"a model config is a JSON object, not {type(raw).__name__}")
    return raw


def read_model_config(directory: str | os.PathLike, model_type: str) -> dict:
    """The config of the saved model of ``model_type`` in ``directory``, without ``model_type``
    (its settings are checked by :func:`polymodal.models.family.saved_config`)."""
    directory = Path(directory)
    raw = read_config(directory)
    found = raw.pop("model_type", None)
    if found != model_type:
        raise InputError(directory / CONFIG_FILE, f"a {found!r} model, not a {model_type!r} model")
    return raw


def weights_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's ``(shape, dtype)`` in the safetensors file ``path``, read from its header
    alone: no tensor is read. safetensors checks that the header is bounded and that its
    offsets cover the file exactly, so a truncated or padded file fails here."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path.parent, f"{path.name} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(path, f"unreadable weights: {one_line(e)}") from None


def _listed(names: list[str], most: int = 3) -> str:
    shown = ", ".join(repr(n) for n in sorted(names)[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_weights(path: str | os.PathLike, expected: Mapping[str, torch.Tensor], *,
                  extra_allowed: bool = False) -> None:
    """The weights file ``path`` holds exactly the tensors ``expected`` (a model's state dict,
    often of a model built on the meta device): the same names, shapes and kind of dtype
    (floating point or not). ``extra_allowed``: other tensors may be there too (they are not
    read). Checked from the header only: a mismatch costs no memory."""
    path = Path(path)
    header = weights_header(path)
    missing = [name for name in expected if name not in header]
    unexpected = [] if extra_allowed else [name for name in header if name not in expected]
    if missing or unexpected:
        parts = ([f"missing {_listed(missing)}"] if missing else []) + (
            [f"unexpected {_listed(unexpected)}"] if unexpected else [])
        raise InputError(path, f"weights do not fit the config: {'; '.join(parts)}")
    for name, tensor in expected.items():
        shape, dtype = header[name]
        if shape != tuple(tensor.shape):
            raise InputError(path, f"weights do not fit the config: {name!r} has shape {list(shape)}, "
                                   f"the config needs {list(tensor.shape)}")
        if (dtype in FLOAT_DTYPES) != tensor.dtype.is_floating_point:
            raise InputError(path, f"weights do not fit the config: {name!r} is {dtype}, the model holds "
                                   f"{str(tensor.dtype).removeprefix('torch.')}")


def read_weights(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (all of them by default) of the safetensors file ``path``; check
    them first with :func:`check_weights`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in (f.keys() if names is None else names)}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(path, f"unreadable weights: {one_line(e)}") from None


def _has_regex(node: object, depth: int = 0) -> bool:
    if depth > 64:  # deeper than any tokenizer component: treated as suspect
        return True
    if isinstance(node, dict):
        return "Regex" in node or any(_has_regex(v, depth + 1) for v in node.values())
    if isinstance(node, list):
        return any(_has_regex(v, depth + 1) for v in node)
    return False


def read_tokenizer(directory: str | os.PathLike) -> TextTokenizer:
    """The ``tokenizer.json`` of a saved model, checked before the model is sized from it: at
    most :data:`MAX_TOKENIZER_BYTES`, no regular expressions (the tokenizer library runs them
    with a backtracking engine, where one crafted pattern can take unbounded time; polymodal's
    byte-level BPE tokenizers use none), no padding of its own (polymodal pads batches itself;
    a fixed padding length pads every text to it), and every token id below the vocabulary
    size (an id past it would index outside the model's embedding table)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(path, "tokenizer file not found")
    spec = read_json(path, MAX_TOKENIZER_BYTES, "a tokenizer")
    if not isinstance(spec, dict):
        raise InputError(path, f"a tokenizer is a JSON object, not {type(spec).__name__}")
    if _has_regex({k: v for k, v in spec.items() if k != "model"}):
        raise InputError(path, "the tokenizer runs regular expressions; polymodal's tokenizers use none")
    if spec.get("padding") is not None:
        raise InputError(path, "the tokenizer pads texts itself; polymodal's tokenizers leave padding to the model")
    tokenizer = TextTokenizer.from_pretrained(path)
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    largest = max(vocab.values(), default=-1)
    if largest >= tokenizer.vocab_size:
        raise InputError(path, f"token id {largest} is outside the vocabulary of {tokenizer.vocab_size} tokens")
    return tokenizer


def read_model_folder(directory: str | os.PathLike, model_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config (without ``model_type``) and weights of a saved model of ``model_type``: the
    simple way for a family whose config cannot ask for much (the families in
    :data:`polymodal.models.FAMILIES` use :func:`polymodal.models.family.load_saved`, which
    checks the config and sizes the model before reading any tensor)."""
    directory = Path(directory)
    raw = read_model_config(directory, model_type)
    weights_header(directory / WEIGHTS_FILE)  # a missing, truncated or malformed file is named
    return raw, read_weights(directory / WEIGHTS_FILE)
