"""Build fusedlm and its extension fusedlm._C.

CPU sources (csrc/cpu, csrc/torch without *_cuda.cpp) are always built. CUDA sources
(csrc/cuda/*.cu, csrc/torch/*_cuda.cpp) are built when torch is a CUDA build and nvcc is
found, or when FUSEDLM_CUDA=1; FUSEDLM_CUDA=0 skips them. Nothing here runs at import
of the package: this file only runs when pip builds.

Environment: MAX_JOBS (ninja parallelism, honoured by torch.utils.cpp_extension),
TORCH_CUDA_ARCH_LIST (default: the visible GPU's arch, or "8.0;9.0a" when none is visible),
FUSEDLM_CUDA (0/1), FUSEDLM_DEBUG=1 (-O0 -g).
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda(torch):
    flag = os.environ.get("FUSEDLM_CUDA", "")
    if flag == "0":
        return False, "FUSEDLM_CUDA=0"
    if flag == "1":
        return True, "FUSEDLM_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


def _gencode_flags(torch):
    """Explicit -gencode flags; torch adds none of its own when these are present."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs = f"{major}.{minor}" + ("a" if major == 9 else "")
        else:
            archs = "8.0;9.0a"
    flags = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return archs, flags


def _cxx_std(torch):
    """-std=c++20 when the installed torch's headers demand it (torch >= 2.14), else c++17."""
    from torch.utils.cpp_extension import include_paths

    for inc in include_paths():
        aten = os.path.join(inc, "ATen", "ATen.h")
        if os.path.exists(aten):
            with open(aten) as f:
                return "-std=c++20" if "202002L" in f.read() else "-std=c++17"
    return "-std=c++17"


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("FUSEDLM_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    std = _cxx_std(torch)
    cxx = opt + [std, "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    cpu_sources = glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    torch_sources = [
        s for s in glob.glob(os.path.join(ROOT, "csrc", "torch", "*.cpp")) if not s.endswith("_cuda.cpp")
    ]
    sources = _rel(cpu_sources + torch_sources)
    include_dirs = [os.path.join(ROOT, "csrc")]

    use_cuda, why = _want_cuda(torch)
    if use_cuda:
        archs, gencode = _gencode_flags(torch)
        cuda_sources = _rel(
            glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
            + glob.glob(os.path.join(ROOT, "csrc", "torch", "*_cuda.cpp"))
        )
        print(f"fusedlm: building CUDA sources ({why}) for {archs}: {', '.join(cuda_sources)}")
        nvcc = opt + [std, "--expt-relaxed-constexpr", "-lineinfo"] + gencode
        ext = CUDAExtension(
            "fusedlm._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("FUSEDLM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        print(f"fusedlm: skipping CUDA sources ({why})")
        ext = CppExtension(
            "fusedlm._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    print(f"fusedlm: building C++ sources: {', '.join(sources)}")
    return [ext]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=["fusedlm", "fusedlm.ops", "fusedlm.nn", "fusedlm.kernels", "fusedlm.benchmarks"],
    package_dir={
        "fusedlm": "python/fusedlm",
        "fusedlm.ops": "python/fusedlm/ops",
        "fusedlm.kernels": "kernels",
        "fusedlm.benchmarks": "benchmarks",
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
