#!/usr/bin/env python3
"""Compiles every kernels/**/*.cu with NVRTC for each GPU architecture given (no GPU needed):
the check that the kernels the host emulator runs are also CUDA a GPU accepts.

    python kernels/nvrtc_check.py LIBNVRTC sm_80 sm_90 [--ptxas PTXAS --report FILE]

LIBNVRTC: the path of libnvrtc.so (PyPI's nvidia-cuda-nvrtc-cu12 ships one). Exits 1 naming
each file and architecture that fails, with NVRTC's log.

With --ptxas (PyPI's nvidia-cuda-nvcc-cu12 ships ptxas), each file is also compiled to PTX
for the LAST architecture given and assembled by `ptxas -v`: FILE gets every kernel's
registers per thread, spill bytes, shared memory and stack frame, and the run fails if a
product-key kernel (PRODUCT_KEY_FILES) uses local memory (spills, or a stack frame: an array
indexed at run time): those kernels are memory-bound, and local memory adds traffic to every
gathered row.
"""
import ctypes
import pathlib
import re
import subprocess
import sys
import tempfile

PRODUCT_KEY_FILES = {"router.cu", "experts.cu", "experts_backward.cu", "sort.cu"}


def compile_one(nvrtc, source: pathlib.Path, arch: str, include: pathlib.Path):
    """(None, PTX or None) on success, (NVRTC's log, None) on failure. A compute_XX
    architecture gives PTX; an sm_XX one a cubin, whose PTX is not asked for."""
    prog = ctypes.c_void_p()
    text = source.read_bytes()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text, str(source).encode(), 0, None, None)
    if rc != 0:
        return f"nvrtcCreateProgram returned {rc}", None
    options = [f"--gpu-architecture={arch}", f"--include-path={include}", "-std=c++17"]
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = nvrtc.nvrtcCompileProgram(prog, len(options), argv)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    ptx = None
    if rc == 0 and arch.startswith("compute_"):
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return (None, ptx) if rc == 0 else (log.value.decode(errors="replace"), None)


def kernel_name(mangled: str) -> str:
    """The source name of a mangled entry (`_Z<len><name>...`), else the entry as it is."""
    m = re.match(r"_Z(\d+)", mangled)
    return mangled[m.end() : m.end() + int(m.group(1))] if m else mangled


def ptxas_usage(ptxas: str, ptx: bytes, arch: str):
    """[(kernel, registers, spill stores, spill loads, shared bytes, stack bytes)] from
    `ptxas -v`, whose lines per entry read: Compiling entry function '_Z...' for 'sm_90' /
    N bytes stack frame, N bytes spill stores, N bytes spill loads / Used N registers, ..."""
    with tempfile.NamedTemporaryFile(suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", f.name, "-o", "/dev/null"],
            capture_output=True, text=True, check=True,
        ).stderr
    rows, cur = [], None
    for line in out.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            cur = {"name": kernel_name(m.group(1)), "stack": 0, "stores": 0, "loads": 0,
                   "regs": 0, "smem": 0}
            rows.append(cur)
        elif cur is not None:
            if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                              r"(\d+) bytes spill loads", line):
                cur["stack"], cur["stores"], cur["loads"] = map(int, m.groups())
            if m := re.search(r"Used (\d+) registers", line):
                cur["regs"] = int(m.group(1))
            if m := re.search(r"(\d+) bytes smem", line):
                cur["smem"] = int(m.group(1))
    return rows


def main():
    args = sys.argv[1:]
    ptxas = report = None
    if "--ptxas" in args:
        i = args.index("--ptxas")
        ptxas, args = args[i + 1], args[:i] + args[i + 2:]
    if "--report" in args:
        i = args.index("--report")
        report, args = args[i + 1], args[:i] + args[i + 2:]
    if len(args) < 2 or (ptxas is None) != (report is None):
        sys.exit(__doc__)
    nvrtc = ctypes.CDLL(args[0])
    archs = args[1:]
    root = pathlib.Path(__file__).resolve().parent
    sources = sorted(p for p in root.rglob("*.cu"))
    failed = 0
    for arch in archs:
        for source in sources:
            error, _ = compile_one(nvrtc, source, arch, source.parent)
            name = source.relative_to(root.parent)
            if error is None:
                print(f"ok      {arch} {name}")
            else:
                failed += 1
                print(f"FAILED  {arch} {name}\n{error}")
    if ptxas and not failed:
        failed += register_report(nvrtc, ptxas, archs[-1], root, sources, pathlib.Path(report))
    sys.exit(1 if failed else 0)


def register_report(nvrtc, ptxas, arch, root, sources, report: pathlib.Path) -> int:
    lines = [f"# Registers and spills of kernels/*.cu for {arch} (ptxas -v)", "",
             "| file | kernel | registers | spill stores B | spill loads B | smem B | stack B |",
             "|---|---|---|---|---|---|---|"]
    spills = []
    for source in sources:
        _, ptx = compile_one(nvrtc, source, arch.replace("sm_", "compute_"), source.parent)
        for r in ptxas_usage(ptxas, ptx, arch):
            lines.append(f"| {source.relative_to(root)} | {r['name']} | {r['regs']} | "
                         f"{r['stores']} | {r['loads']} | {r['smem']} | {r['stack']} |")
            if source.name in PRODUCT_KEY_FILES and r["stores"] + r["loads"] + r["stack"] > 0:
                spills.append(f"{source.name}: {r['name']} uses local memory: spills "
                              f"{r['stores']} B stored, {r['loads']} B loaded, "
                              f"stack frame {r['stack']} B")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for s in spills:
        print(f"FAILED  {s}")
    return len(spills)


main()
