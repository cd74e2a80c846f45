"""Build lstm_ext: a C++ (and optionally CUDA) LSTM compiled against the torch in the build environment.

Environment variables:
  FORCE_CUDA=1         build the CUDA kernels even when no GPU is visible (needs nvcc and a CUDA torch)
  LSTM_EXT_NO_CUDA=1   never build the CUDA kernels
  DEBUG=1              -O0 -g instead of -O3
  MAX_JOBS=N           parallel compile jobs (read by torch.utils.cpp_extension)
  TORCH_CUDA_ARCH_LIST the CUDA architectures to build for (read by torch.utils.cpp_extension)
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_VERSION = torch.__version__
TORCH_PUBLIC_VERSION = TORCH_VERSION.split("+")[0]


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_decision():
    """Return (build_cuda, reason)."""
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if env_flag("LSTM_EXT_NO_CUDA"):
        return False, "LSTM_EXT_NO_CUDA=1"
    if not cuda_sources:
        return False, "no CUDA sources in csrc/cuda"
    if torch.version.cuda is None:
        return False, f"torch {TORCH_VERSION} is a CPU-only build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if env_flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    return False, "no GPU visible (set FORCE_CUDA=1 to build anyway)"


def pip_cuda_include_dirs():
    """Headers of the CUDA libraries that a pip-installed CUDA torch brings (nvidia/*/include):
    ATen's CUDA headers include cuBLAS and cuSPARSE, which a bare nvcc install lacks."""
    import site
    roots = site.getsitepackages() + [site.getusersitepackages()]
    return sorted({d for root in roots for d in glob.glob(os.path.join(root, "nvidia", "*", "include"))})


def write_build_info(build_cuda):
    # Read by lstm_ext/_ops.py *before* it loads the compiled module, so a torch mismatch is reported
    # as a clear ImportError instead of an undefined-symbol error or a crash.
    path = os.path.join(ROOT, "lstm_ext", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py; do not edit.\n")
        f.write(f"torch_version = {TORCH_VERSION!r}\n")
        f.write(f"cuda = {build_cuda!r}\n")


def extensions():
    build_cuda, reason = cuda_decision()
    debug = env_flag("DEBUG")
    print(f"lstm_ext setup: torch {TORCH_VERSION}, CUDA kernels: {'yes' if build_cuda else 'no'} "
          f"({reason}), DEBUG={int(debug)}, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')}")
    write_build_info(build_cuda)

    sources = ["csrc/lstm.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    define = [f'-DLSTM_EXT_TORCH_VERSION="{TORCH_VERSION}"']
    # -fopenmp: at::parallel_for is inline in ATen's headers and runs serially unless the extension
    # itself is compiled with OpenMP. At run time the libgomp that torch already loaded is used.
    # -fno-trapping-math -fno-math-errno (as torch itself is built): lets the compiler vectorise
    # the gate loops' selects and divisions.
    cxx = opt + ["-fvisibility=hidden", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"] + define
    link = ["-fopenmp"]
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return [CUDAExtension("lstm_ext._C", sources, include_dirs=pip_cuda_include_dirs(),
                              extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"],
                                                  "nvcc": opt + ["-DWITH_CUDA"]},
                              extra_link_args=link)]
    return [CppExtension("lstm_ext._C", sources, extra_compile_args={"cxx": cxx},
                         extra_link_args=link)]


setup(
    name="lstm_ext",
    version="0.1.0",
    description="A fused C++ LSTM for PyTorch: a drop-in replacement for torch.nn.LSTM",
    packages=find_packages(include=["lstm_ext", "lstm_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    # The compiled module is tied to the exact torch it was built against (C++ ABI).
    install_requires=[f"torch=={TORCH_PUBLIC_VERSION}", "numpy", "matplotlib"],
    entry_points={"console_scripts": ["lstm-sincos=lstm_ext.sincos:main"]},
    python_requires=">=3.9",
)
