"""Build lstm_ext: a C++ (and optionally CUDA) LSTM compiled against the torch that is installed.

`pip install .` runs this through tools/build_backend.py, which makes the torch of the environment
being installed into importable here (or, where there is none, has pip fetch one): the module is
compiled against that torch and pins it exactly at run time, so pip leaves it as it is.

Environment variables:
  FORCE_CUDA=1         build the CUDA kernels even when no GPU is visible (needs nvcc and a CUDA torch)
  LSTM_EXT_NO_CUDA=1   never build the CUDA kernels
  DEBUG=1              -O0 -g instead of -O3
  LSTM_EXT_SANITIZE=address,undefined
                       build the C++ with AddressSanitizer and/or UndefinedBehaviorSanitizer
                       (-O1 -g); run with gcc's runtimes preloaded: tools/sanitize.sh does both
  MAX_JOBS=N           parallel compile jobs (read by torch.utils.cpp_extension)
  TORCH_CUDA_ARCH_LIST the CUDA architectures to build for (read by torch.utils.cpp_extension)
"""

import glob
import os
import re
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from build_backend import MIN_TORCH, NEXT_UNTESTED_TORCH  # noqa: E402  (the supported range)

TORCH_VERSION = torch.__version__
TORCH_PUBLIC_VERSION = TORCH_VERSION.split("+")[0]


def check_torch_version():
    release = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", TORCH_VERSION).groups())
    where = os.path.dirname(torch.__file__)
    if release < MIN_TORCH:
        sys.exit(f"lstm_ext needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, but the torch it would be "
                 f"built against is {TORCH_VERSION} ({where}). Upgrade torch first "
                 f"(https://pytorch.org/get-started), then install lstm_ext again.")
    if release >= NEXT_UNTESTED_TORCH:
        print(f"lstm_ext setup: warning: torch {TORCH_VERSION} is newer than the releases lstm_ext "
              f"is tested with ({MIN_TORCH[0]}.{MIN_TORCH[1]} to {NEXT_UNTESTED_TORCH[0]}."
              f"{NEXT_UNTESTED_TORCH[1] - 1}); building anyway")


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
    ATen's CUDA headers include cuBLAS and cuSPARSE, which a bare nvcc install lacks. Those next
    to torch itself (in pip's build environment, that folder is not among the site folders)."""
    import site
    for root in [os.path.dirname(os.path.dirname(torch.__file__))] + site.getsitepackages() + [
            site.getusersitepackages()]:
        found = sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
        if found:
            return found
    return []


SANITIZERS = ("address", "undefined")


def sanitizers():
    """The sanitizers LSTM_EXT_SANITIZE asks for (comma-separated), checked."""
    wanted = [name.strip() for name in os.environ.get("LSTM_EXT_SANITIZE", "").split(",")
              if name.strip()]
    unknown = [name for name in wanted if name not in SANITIZERS]
    if unknown:
        sys.exit(f"lstm_ext setup: LSTM_EXT_SANITIZE={os.environ['LSTM_EXT_SANITIZE']!r}: "
                 f"unknown sanitizer {', '.join(unknown)}; choose from {', '.join(SANITIZERS)}")
    return wanted


class BuildWithInfo(BuildExtension):
    """torch's BuildExtension that always rebuilds and records what it built against.

    Always: setuptools skips an extension whose module is newer than its sources, and so reused a
    module built against another torch (which then failed to import). With ninja only the
    objects whose compile command or inputs changed are rebuilt; the command names torch's
    headers and version, so a change of torch rebuilds everything."""

    build_cuda = False
    sanitize = ""
    configuration = ""  # torch version, CUDA or not, sanitizers, debug: see extensions()

    def finalize_options(self):
        super().finalize_options()
        self.force = True
        # Objects kept apart per configuration (build/temp...-torch2.13.0-cpu): going back to a
        # torch (or a sanitizer setting) built before recompiles nothing with ninja, only what
        # changed since; a build for another configuration never overwrites them.
        self.build_temp = f"{self.build_temp}-{self.configuration}"

    def run(self):
        super().run()
        # Read by lstm_ext/_ops.py *before* it loads the compiled module, so a torch mismatch is
        # reported as a clear ImportError instead of an undefined-symbol error or a crash. Written
        # next to the module: into the wheel, or into the source tree for an editable install.
        folder = os.path.dirname(self.get_ext_fullpath("lstm_ext._C"))
        with open(os.path.join(folder, "_build_info.py"), "w") as f:
            f.write("# Written by setup.py; do not edit.\n")
            f.write(f"torch_version = {TORCH_VERSION!r}\n")
            f.write(f"cuda = {self.build_cuda!r}\n")
            f.write(f"sanitize = {self.sanitize!r}\n")


def extensions():
    check_torch_version()
    build_cuda, reason = cuda_decision()
    BuildWithInfo.build_cuda = build_cuda
    debug = env_flag("DEBUG")
    sanitize = ",".join(sanitizers())
    BuildWithInfo.sanitize = sanitize
    BuildWithInfo.configuration = re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(
        [f"torch{TORCH_VERSION}", "cuda" if build_cuda else "cpu"]
        + (["debug"] if debug else []) + ([sanitize] if sanitize else [])))
    print(f"lstm_ext setup: torch {TORCH_VERSION} ({os.path.dirname(torch.__file__)}), "
          f"CUDA kernels: {'yes' if build_cuda else 'no'} ({reason}), DEBUG={int(debug)}, "
          f"LSTM_EXT_SANITIZE={sanitize or 'none'}, "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')}")

    sources = ["csrc/ops.cpp", "csrc/python_module.cpp", "csrc/autograd.cpp", "csrc/module.cpp",
               "csrc/autocast.cpp"] + sorted(
        glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O1", "-g"] if sanitize else ["-O3"]
    define = [f'-DLSTM_EXT_TORCH_VERSION="{TORCH_VERSION}"']
    # -fopenmp: at::parallel_for is inline in ATen's headers and runs serially unless the extension
    # itself is compiled with OpenMP. At run time the libgomp that torch already loaded is used.
    # -fno-trapping-math -fno-math-errno (as torch itself is built): lets the compiler vectorise
    # the gate loops' selects and divisions.
    # -Wno-psabi (as torch is built): the vector helpers of csrc/cpu/blas.h return AVX vectors,
    # always inlined into the variant of their instruction set, so no call's ABI changes.
    cxx = opt + ["-fvisibility=hidden", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
                 "-Wno-psabi"] + define
    link = ["-fopenmp"]
    if sanitize:
        # Reports stop the process (halt_on_error in tools/sanitize.sh's options); frame pointers
        # give whole stacks.
        cxx += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={sanitize}"]
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
    license="BSD-3-Clause",
    packages=find_packages(include=["lstm_ext", "lstm_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildWithInfo},
    # The compiled module is tied to the exact torch it was built against (C++ ABI): the torch
    # that is installed, which this pin therefore leaves as it is.
    install_requires=[f"torch=={TORCH_PUBLIC_VERSION}", "numpy", "matplotlib"],
    entry_points={"console_scripts": ["lstm-sincos=lstm_ext.sincos:main"]},
    python_requires=">=3.10",
)
