"""The installed package: what it was built with, that it keeps the user's torch, that the README's
commands work from the repository root, and a clear ImportError under another torch."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lstm_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_records_this_torch():
    assert lstm_ext.build_info["torch_version"] == torch.__version__
    assert lstm_ext._C.torch_version == torch.__version__
    assert isinstance(lstm_ext.build_info["cuda"], bool)
    assert isinstance(lstm_ext.build_info["direct_blas"], bool)
    assert isinstance(lstm_ext.build_info["vector_math"], bool)


def test_ops_are_registered_with_a_cpu_kernel():
    for op in ("lstm_layer_forward", "lstm_layer_backward", "lstm_cell_forward",
               "lstm_cell_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_ext::{op}", "CPU"), op


def test_import_under_another_torch_is_a_clear_import_error():
    # Pretend the running torch is another release: the import must refuse before loading the
    # compiled module, naming both versions and the rebuild command.
    code = ("import torch; torch.__version__ = '0.0.1'\n"
            "try:\n"
            "    import lstm_ext\n"
            "except ImportError as e:\n"
            "    print('IMPORT-ERROR:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "IMPORT-ERROR:" in message
    assert f"built against torch {torch.__version__}" in message
    assert "torch 0.0.1 is installed" in message
    assert "pip install --force-reinstall --no-deps ." in message


def test_portable_fallback_without_mkl_matches_nn_lstm():
    """With LSTM_EXT_NO_MKL=1 the kernels use at::mm and scalar exp/tanh: still exact."""
    import os
    env = dict(os.environ, LSTM_EXT_NO_MKL="1")
    result = subprocess.run([sys.executable, "-m", "lstm_ext"], capture_output=True, text=True,
                            timeout=300, cwd="/", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "'direct_blas': False, 'vector_math': False" in result.stdout
    assert "match nn.LSTM" in result.stdout and ": OK" in result.stdout


def test_install_pins_the_torch_it_was_built_against():
    # What keeps pip from up- or downgrading the user's torch: the pin is the torch installed.
    requirements = importlib.metadata.requires("lstm_ext")
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements


# pip's isolated build runs the target environment's interpreter with its site-packages removed
# from sys.path and a build environment's (setuptools, ninja) added: the same here, with the
# build environment being a folder that links to this one's setuptools.
ISOLATED_BUILD = textwrap.dedent("""
    import os, sys, sysconfig, tempfile
    site_packages = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    build_env = tempfile.mkdtemp()
    import setuptools, _distutils_hack
    for module in (setuptools, _distutils_hack):
        folder = os.path.dirname(module.__file__)
        os.symlink(folder, os.path.join(build_env, os.path.basename(folder)))
    sys.path[:] = [p for p in sys.path if p not in site_packages] + [build_env]
    for name in [m for m in sys.modules if m.split(".")[0] in ("setuptools", "_distutils_hack")]:
        del sys.modules[name]
    TARGET_HAS_TORCH
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import build_backend
    print(build_backend.get_requires_for_build_wheel(), build_backend.get_requires_for_build_editable())
    import torch
    print(torch.__file__)
""")


def run_isolated_build(target_has_torch):
    code = ISOLATED_BUILD.replace("ROOT", repr(ROOT)).replace(
        "TARGET_HAS_TORCH", "" if target_has_torch else
        "sysconfig.get_paths = lambda: {'purelib': build_env, 'platlib': build_env}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd="/")


def test_isolated_build_uses_the_installed_torch():
    result = run_isolated_build(target_has_torch=True)
    assert result.returncode == 0, result.stderr
    requires, torch_file = result.stdout.splitlines()
    assert requires == "[] []"  # nothing for pip to put into the build environment
    assert torch_file == torch.__file__  # the build imports the target environment's torch


def test_isolated_build_asks_for_a_supported_torch_where_none_is_installed():
    result = run_isolated_build(target_has_torch=False)
    assert "No module named 'torch'" in result.stderr  # nothing to import until pip installs it
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import build_backend
    finally:
        sys.path.pop(0)
    wanted = [build_backend.TORCH_REQUIREMENT]
    assert result.stdout.splitlines()[0] == f"{wanted} {wanted}"
    assert build_backend.TORCH_REQUIREMENT == "torch>=2.11,<2.15"


@pytest.mark.parametrize("argv", [
    ["-m", "lstm_ext"],
    ["-m", "lstm_ext.sincos", "--epochs", "3", "--no-plot", "--quiet"],
    ["-c", "import lstm_ext; print(lstm_ext._C.__file__)"],
], ids=["python -m lstm_ext", "python -m lstm_ext.sincos", "python -c 'import lstm_ext'"])
def test_commands_work_from_the_repository_root(argv):
    # `python -m` and `-c` put the current folder first on sys.path: from the root that is the
    # source tree, whose lstm_ext/ has no compiled module.
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    if argv[0] == "-c":
        assert result.stdout.strip() == lstm_ext._C.__file__


def test_python_m_pytest_works_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_build.py::test_build_info_records_this_torch"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_source_checkout_takes_its_submodules_from_the_installed_package(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout" / "lstm_ext"
    checkout.mkdir(parents=True)
    installed = tmp_path / "site-packages" / "lstm_ext"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_text("")
    monkeypatch.setattr(sys, "path", [str(checkout.parent), str(installed.parent)])
    assert lstm_ext._built_package_path([str(checkout)]) == [str(installed)]
    # a built checkout (an editable install) keeps its own
    (checkout / "_C.abi3.so").write_text("")
    assert lstm_ext._built_package_path([str(checkout)]) == [str(checkout)]
    # nothing installed elsewhere: the checkout stays, and importing it says how to build it
    (checkout / "_C.abi3.so").unlink()
    monkeypatch.setattr(sys, "path", [str(checkout.parent)])
    assert lstm_ext._built_package_path([str(checkout)]) == [str(checkout)]


def test_unbuilt_source_tree_without_an_install_says_how_to_build_it(tmp_path):
    # _ops in a folder without the compiled module (what importing the checkout would run if no
    # lstm_ext were installed).
    folder = tmp_path / "lstm_ext"
    folder.mkdir()
    for name in ("__init__.py", "_ops.py", "reference.py"):
        (folder / name).write_text(open(os.path.join(ROOT, "lstm_ext", name)).read())
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('unbuilt', {str(folder / '__init__.py')!r},"
            f" submodule_search_locations=[{str(folder)!r}])\n"
            "sys.modules['unbuilt'] = module = importlib.util.module_from_spec(spec)\n"
            "module.__path__ = [" + repr(str(folder)) + "]\n"
            "import unbuilt._ops\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd="/")
    assert result.returncode != 0
    assert "ImportError: lstm_ext is not built" in result.stderr
    assert "`pip install .` in the repository root" in result.stderr
