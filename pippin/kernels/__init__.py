"""pippin's CPU kernels, compiled once on first use and cached under $PIPPIN_HOME/kernels.

`ops()` returns `torch.ops.pippin` (dense, LUT and int8 matvecs, RMSNorm, SwiGLU, RoPE, per-row LoRA; and
`torch.classes.pippin.DecodePlan`, a whole decode step; csrc/common.h indexes the C++ files that hold them; the int8
row kernels in csrc/act8_rows.inc are built for AVX2 and for AVX-512 VNNI, and the one the CPU supports runs) or None
where the kernels cannot be used:
no AVX2/FMA on this CPU, no C++ compiler, or PIPPIN_KERNELS=0. Callers then use the plain PyTorch
reference path, which every kernel is tested against. Built with torch.utils.cpp_extension (ninja, gcc);
the build takes about 20 s on 2 cores, once per machine, source and torch version, never at import time.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

from pippin.io import write_atomic

log = logging.getLogger(__name__)
_CSRC = Path(__file__).parent / "csrc"
_state: dict[str, object] = {}


def cpu_name() -> str:
    """The CPU's model name (what benchmarks and device profiles report beside the kernel variant)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))


def build_dir() -> Path:
    from pippin.model.checkpoint import pippin_home

    sources = b"".join(f.read_bytes() for f in sorted(_CSRC.iterdir()) if f.suffix in (".cpp", ".h", ".inc"))
    # The checkout's path is part of the key: the build file names each source by its absolute path, so two checkouts
    # sharing one folder would rebuild each other's kernels on every load.
    tag = hashlib.sha256(sources + torch.__version__.encode() + str(_CSRC.resolve()).encode()).hexdigest()[:12]
    return pippin_home() / "kernels" / tag


def ops(*, verbose: bool = False):  # noqa: ANN201 - returns torch.ops.pippin or None
    """Load (building if needed) the kernels; None if unavailable. Cached per process."""
    if "ops" in _state:
        return _state["ops"]
    result = None
    if os.environ.get("PIPPIN_KERNELS", "1") != "0" and _cpu_has_avx2():
        try:
            from torch.utils import cpp_extension

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            # One translation unit that includes every source file (torch's headers are parsed once: 20 s instead of
            # 50 s on 2 cores), built without semantic interposition: in a shared object the compiler may otherwise
            # not inline a function with external linkage into its callers, and the decode step, split over files
            # whose helpers have external linkage, ran about 10 % slower than when it was one file.
            unity = d / "pippin_ops.cpp"
            text = "".join(f'#include "{f}"\n' for f in sorted(_CSRC.glob("*.cpp")))
            if not unity.is_file() or unity.read_text() != text:
                write_atomic(unity, text.encode())  # atomic: a second process may be building at the same time
            # torch guards a build with a `lock` file that a killed build leaves behind, and the next load then waits
            # on it forever. An flock, which the OS drops when its holder dies, serializes pippin's builds instead:
            # whoever holds it is the only builder, so a `lock` file found then is stale and goes.
            with open(d / "build.flock", "a") as flock:
                fcntl.flock(flock, fcntl.LOCK_EX)
                (d / "lock").unlink(missing_ok=True)
                cpp_extension.load(
                    name="pippin_ops",
                    sources=[str(unity)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fno-semantic-interposition"],
                    build_directory=str(d),
                    is_python_module=False,
                    verbose=verbose,
                )
            result = torch.ops.pippin
        except Exception as e:  # no compiler, no ninja, ...: fall back, but say why once
            log.warning("pippin kernels unavailable, using the PyTorch reference path: %s", e)
    _state["ops"] = result
    return result


def variant() -> str:
    """Which kernel code runs the int8 (act8) dot products here, for benchmark reports: 'avx512-vnni' where the CPU
    has AVX-512 VNNI (batched rows; one row stays on AVX2, faster there on the AMD EPYC measured), else 'avx2-fma';
    'reference (PyTorch)' without kernels. `ops().set_kernel_variant(name)` picks one."""
    k = ops()
    if k is None:
        return "reference (PyTorch)"
    return "avx512-vnni (batched rows), avx2-fma (one row)" if k.kernel_variant() == "avx512-vnni" else "avx2-fma"
