"""The PEP 517 build backend of lstm_ext: setuptools' own, built against the torch already installed.

lstm_ext's compiled module works only with the torch it was compiled against (the C++ ABI differs
from one torch release, and one build, to the next). pip builds packages in an isolated
environment: with `torch` among the build requirements it would put a second torch there, whatever
its index offers, and then install that one over the user's (a CUDA build replaced by a CPU one,
say). This backend instead builds against the torch of the environment being installed into:

- torch importable by the build (pip install --no-build-isolation, or a build environment that
  has one): nothing to do;
- pip's isolated build, installing into an environment that has torch: the build does not ask for
  torch, and imports the installed one from that environment's site-packages (added at the end of
  sys.path, so the build environment's setuptools still comes first);
- no torch anywhere: the build asks for TORCH_REQUIREMENT, pip puts the newest it can find in that
  range into the build environment, and setup.py pins the same version at run time, so pip
  installs that one with lstm_ext.

setup.py pins the exact torch it built against (install_requires `torch==<version>`), which the
installed torch satisfies: pip neither up- nor downgrades it.
"""

import importlib.util
import os
import site
import sys
import sysconfig

from setuptools import build_meta as _setuptools

# The torch releases lstm_ext is tested against (CI: 2.11 and 2.14 at the ends, 2.13 in full).
# setup.py refuses older ones and warns about newer ones.
MIN_TORCH = (2, 11)
NEXT_UNTESTED_TORCH = (2, 15)
TORCH_REQUIREMENT = "torch>={}.{},<{}.{}".format(*MIN_TORCH, *NEXT_UNTESTED_TORCH)


def _target_site_packages():
    """The site-packages folders of the environment being installed into, which pip's isolated
    build removes from sys.path (the build runs that environment's interpreter)."""
    paths = sysconfig.get_paths()
    folders = [paths["purelib"], paths["platlib"]]
    if sys.prefix == sys.base_prefix:  # not a virtual environment: pip install --user is possible
        folders.append(site.getusersitepackages())
    unique = []
    for folder in folders:
        if folder not in unique and os.path.isdir(folder):
            unique.append(folder)
    return unique


def _expose_installed_torch():
    """Make the target environment's torch importable; False where it has none."""
    if importlib.util.find_spec("torch") is not None:
        return True
    for folder in _target_site_packages():
        if os.path.isfile(os.path.join(folder, "torch", "__init__.py")):
            sys.path.append(folder)
            importlib.invalidate_caches()
            return True
    return False


_HAS_TORCH = _expose_installed_torch()


def _requires():
    return [] if _HAS_TORCH else [TORCH_REQUIREMENT]


# setuptools' get_requires_* hooks run setup.py, which imports torch: without torch yet they
# cannot run, and setup.py declares no setup_requires, so these lists are all there is.
def get_requires_for_build_wheel(config_settings=None):
    return _requires()


def get_requires_for_build_editable(config_settings=None):
    return _requires()


def get_requires_for_build_sdist(config_settings=None):
    return _requires()


prepare_metadata_for_build_wheel = _setuptools.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_wheel = _setuptools.build_wheel
build_editable = _setuptools.build_editable
build_sdist = _setuptools.build_sdist
