#!/usr/bin/env python3
"""Compiles every kernels/**/*.cu with NVRTC for each GPU architecture given (no GPU needed):
the check that the kernels the host emulator runs are also CUDA a GPU accepts.

    python kernels/nvrtc_check.py LIBNVRTC sm_80 sm_90

LIBNVRTC: the path of libnvrtc.so (PyPI's nvidia-cuda-nvrtc-cu12 ships one). Exits 1 naming
each file and architecture that fails, with NVRTC's log.
"""
import ctypes
import pathlib
import sys


def compile_one(nvrtc, source: pathlib.Path, arch: str, include: pathlib.Path):
    prog = ctypes.c_void_p()
    text = source.read_bytes()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text, str(source).encode(), 0, None, None)
    if rc != 0:
        return f"nvrtcCreateProgram returned {rc}"
    options = [f"--gpu-architecture={arch}", f"--include-path={include}", "-std=c++17"]
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = nvrtc.nvrtcCompileProgram(prog, len(options), argv)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return None if rc == 0 else log.value.decode(errors="replace")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    nvrtc = ctypes.CDLL(sys.argv[1])
    root = pathlib.Path(__file__).resolve().parent
    sources = sorted(p for p in root.rglob("*.cu"))
    failed = 0
    for arch in sys.argv[2:]:
        for source in sources:
            error = compile_one(nvrtc, source, arch, source.parent)
            name = source.relative_to(root.parent)
            if error is None:
                print(f"ok      {arch} {name}")
            else:
                failed += 1
                print(f"FAILED  {arch} {name}\n{error}")
    sys.exit(1 if failed else 0)


main()
