"""specdec's CPU kernels: C++ XLA FFI custom calls built at install time (`setup.py`).

`packed_matmul.cc` (the dense projections over column-tiled weights, `specdec.matmul`) and
`cache_attention.cc` (block attention over the KV cache prefix, `specdec.attention`). When the
extension is missing (no compiler at install, another CPU architecture) `available()` is False,
specdec uses XLA's own ops and says so once in the log.
"""

from __future__ import annotations

import functools
import logging
import os

import jax

PACKED_MATMUL = "specdec_packed_matmul"
CACHE_ATTENTION = "specdec_cache_attention"
CACHE_ATTENTION_LSE = "specdec_cache_attention_lse"
ISA_NAMES = ("scalar", "avx2", "avx512")
log = logging.getLogger("specdec")


@functools.cache
def isa() -> int | None:
    """The ISA the kernels run here (0 scalar, 1 AVX2+FMA, 2 AVX-512), or None when not built.

    The first call registers the custom calls with XLA.
    """
    try:
        from specdec import _cpu_kernels
    except ImportError as e:
        log.warning(
            "specdec: the CPU kernels are not built (%s); using XLA's matmul and attention, which make "
            "verification blocks of 2-16 tokens cost 1.5-4x a one-token step on CPU. Reinstall with "
            "`pip install -e .` on a machine with a C++ compiler.", e,
        )  # fmt: skip
        return None
    jax.ffi.register_ffi_target(PACKED_MATMUL, _cpu_kernels.packed_matmul(), platform="cpu")
    jax.ffi.register_ffi_target(CACHE_ATTENTION, _cpu_kernels.cache_attention(), platform="cpu")
    jax.ffi.register_ffi_target(CACHE_ATTENTION_LSE, _cpu_kernels.cache_attention_lse(), platform="cpu")
    return _cpu_kernels.best_isa()


def available() -> bool:
    return isa() is not None


def isa_cap() -> int:
    """`SPECDEC_CPU_ISA=scalar|avx2` caps the kernels' ISA (to test the narrower paths); -1 = none."""
    name = os.environ.get("SPECDEC_CPU_ISA", "")
    if name and name not in ISA_NAMES:
        raise ValueError(f"SPECDEC_CPU_ISA={name!r}: use one of {ISA_NAMES} (or leave it unset)")
    return ISA_NAMES.index(name) if name else -1
