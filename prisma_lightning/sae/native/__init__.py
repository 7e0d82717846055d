"""Fused elementwise CPU kernels for the dense SAE training nodes, compiled from C on first use.

The ReLU, JumpReLU and Gated training nodes (:mod:`prisma_lightning.sae.activations`) spend, besides their matmuls, a
dozen elementwise PyTorch passes over ``[batch, d_sae]`` matrices per step (masks, penalties, their gradients, row
and column sums). ``kernels.c`` does each direction's passes in one sweep over the matrix. It is compiled with the
system C compiler (``$CC``, else ``cc`` / ``gcc`` / ``clang``) the first time a node needs it, into
``$PRISMA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/prisma_lightning``, i.e. ``~/.cache/prisma_lightning``) under a
name that hashes the source, the flags and the compiler, written to a temporary file and renamed (concurrent
processes, e.g. DDP ranks, each end up loading a complete library), and loaded with :mod:`ctypes`.

Without a compiler, when compiling fails, or with ``PRISMA_NATIVE=0`` the nodes use their PyTorch passes: same
results (up to float rounding), slower. :func:`status` says which is in use and why. Only float32, contiguous CPU
tensors take the native path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-std=c11", "-fopenmp-simd", "-fno-trapping-math", "-fPIC", "-shared", "-pthread")
"""Compiler flags (``-march=native`` is tried first and dropped if the compiler rejects it). ``-fno-trapping-math``
lets the vectoriser turn the masks into selects; the kernels do not use floating-point exceptions."""
ENV_SWITCH = "PRISMA_NATIVE"
"""Set to ``0`` to use the PyTorch passes."""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}

_I64, _PTR, _F32, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "prisma_tanh": (None, [_I64, _PTR, _PTR]),
    "prisma_relu_forward": (_INT, [_I64, _I64] + [_PTR] * 6 + [_INT]),
    "prisma_relu_backward": (_INT, [_I64, _I64] + [_PTR] * 6 + [_INT]),
    "prisma_jumprelu_forward": (_INT, [_I64, _I64, _PTR, _PTR, _PTR, _F32, _PTR, _PTR, _PTR, _PTR, _PTR, _INT]),
    "prisma_jumprelu_backward": (_INT, [_I64, _I64] + [_PTR] * 10 + [_INT]),
    "prisma_gated_forward": (_INT, [_I64, _I64] + [_PTR] * 9 + [_INT]),
    "prisma_gated_backward": (_INT, [_I64, _I64] + [_PTR] * 11 + [_INT]),
}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$PRISMA_CACHE_DIR``, else ``$XDG_CACHE_HOME/prisma_lightning``, else
    ``~/.cache/prisma_lightning``."""
    if os.environ.get("PRISMA_CACHE_DIR"):
        return Path(os.environ["PRISMA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prisma_lightning"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()[0] if out.stdout else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def _build(cc: str) -> Path:
    """Compile (or find the cached) library; raises RuntimeError with the compiler's message on failure."""
    source, compiler = SOURCE.read_bytes(), _compiler_id(cc)
    errors = []
    for arch in (("-march=native",), ()):
        flags = (*FLAGS, *arch)
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), compiler.encode(), platform.machine().encode()])
        ).hexdigest()[:16]
        target = cache_dir() / f"sae_kernels-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sae_kernels-", suffix=".so.tmp", dir=target.parent)
        os.close(fd)
        try:
            cmd = [cc, *flags, "-o", tmp, str(SOURCE), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{' '.join(cmd)}:\n{done.stderr.strip()[-2000:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("\n".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (PyTorch passes) -- see :func:`status` for why."""
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        lib, why = None, ""
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            why = f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
        elif (cc := _compiler()) is None:
            why = "no C compiler found ($CC, cc, gcc, clang): using the PyTorch passes"
        else:
            try:
                path = _build(cc)
                lib = ctypes.CDLL(str(path))
                for name, (restype, argtypes) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = restype, argtypes
                why = f"compiled: {path}"
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
                lib = None
                why = (
                    f"compiling the kernels failed, using the PyTorch passes (set {ENV_SWITCH}=0 to skip them, or "
                    f"PRISMA_CACHE_DIR to a writable folder if {cache_dir()} is not): {err}"
                )
                log.warning("prisma_lightning SAE kernels: %s", why)
        _STATE["lib"], _STATE["why"] = lib, why
        return lib


def status() -> str:
    """Whether the native kernels are in use, and why not when they are not."""
    library()
    return str(_STATE["why"])


def reset() -> None:
    """Forget the loaded library (the next use looks again: after changing ``PRISMA_NATIVE``, for tests)."""
    with _LOCK:
        _STATE.clear()


def usable(*tensors: Tensor | None) -> bool:
    """True when the kernels are loaded and every given tensor is a contiguous float32 CPU tensor."""
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()):
            return False
    return library() is not None


def ptr(t: Tensor | None) -> int | None:
    """The data pointer of a contiguous tensor (None for None)."""
    return None if t is None else t.data_ptr()


def call(name: str, *args: object) -> None:
    """Call kernel ``name`` with the number of threads PyTorch uses appended; raises MemoryError if it could not
    allocate its accumulators."""
    fn = getattr(library(), name)
    if fn(*args, torch.get_num_threads()) != 0:
        raise MemoryError(f"{name}: could not allocate its per-thread accumulators")


def tanh(x: Tensor) -> Tensor:
    """The kernels' float32 tanh (for tests of its accuracy)."""
    x = x.detach().to(torch.float32).contiguous()
    out = torch.empty_like(x)
    library().prisma_tanh(x.numel(), ptr(x), ptr(out))  # type: ignore[union-attr]
    return out
