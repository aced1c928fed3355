"""The C copy worker library (csrc/copy_worker.c): compiled on first use, loaded with ctypes.

Compiled with the system C compiler into ``$PIE_CACHE/native/copy_worker-<sha256 of the source>.so`` (default
``~/.cache/pie``); ``native_available()`` says whether that worked (the reason is logged once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc") / "copy_worker.c"
_lib: tuple[ctypes.CDLL, ctypes.PyDLL] | None = None  # the loaded library
_unavailable: str | None = None  # why it could not be built or loaded (then it is not tried again)


def _build() -> Path:
    """Compile the worker (once per source version); a temp file and an atomic rename make concurrent builds safe."""
    src = _SRC.read_bytes()
    out_dir = Path(os.environ.get("PIE_CACHE", Path.home() / ".cache" / "pie")) / "native"
    so = out_dir / f"copy_worker-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if so.exists():
        return so
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = f"{so}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        # NOTE: compiled from the bytes that were hashed, so the name always matches the code.
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-x", "c", "-o", tmp, "-"], input=src,
                           capture_output=True, timeout=120, check=False)
        if r.returncode:
            raise RuntimeError(f"{cc} failed: {r.stderr.decode(errors='replace').strip()[-2000:]}")
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


def _declare(lib: ctypes.CDLL) -> None:
    p, u64, i, sz = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_size_t
    pre = [i, u64, i, u64, u64, p]  # two prerequisites (direction, seq), min_ns, result buffer
    sigs: dict[str, tuple[list, type | None]] = {
        "pie_cw_create": ([u64, u64], p), "pie_cw_submit_span": ([p, i, p, p, sz, p, p, sz, *pre], u64),
        "pie_cw_submit_rows": ([p, i, p, p, p, p, sz, p, sz, u64, *pre], u64), "pie_cw_wait": ([p, i, u64], None),
        "pie_cw_submit_step": ([p, p, sz, sz, sz, p, sz, u64, u64, u64, p, p], i), "pie_cw_advance": ([p, u64], None),
        "pie_cw_counters": ([p], p), "pie_cw_copy_ns": ([p, i], u64), "pie_cw_destroy": ([p], None)}
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


def load() -> tuple[ctypes.CDLL, ctypes.PyDLL]:
    """(nogil, gil): CDLL releases the GIL around a call (``wait``, ``destroy`` block); PyDLL keeps it, which is
    cheaper for the calls that never block (submit, counters), and no other Python thread can cut in."""
    global _lib, _unavailable
    if _lib is None and _unavailable is None:
        try:
            so = str(_build())
            libs = ctypes.CDLL(so), ctypes.PyDLL(so)
            for lib in libs:
                _declare(lib)
            _lib = libs
        except Exception as e:  # noqa: BLE001 - any failure means "use the thread engine"
            _unavailable = f"{type(e).__name__}: {e}"
            log.warning("native KV copy engine unavailable (%s); using ThreadCopyEngine", _unavailable)
    if _lib is None:
        raise RuntimeError(f"native KV copy engine unavailable: {_unavailable}")
    return _lib


def unavailable_reason() -> str | None:
    """Why the library could not be built or loaded (None: it loaded, or nobody tried yet)."""
    return _unavailable


def native_available() -> bool:
    """Whether the C copy worker builds and loads here (a failure is logged once, at warning level)."""
    try:
        load()
        return True
    except RuntimeError:
        return False
