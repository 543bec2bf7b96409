"""Installs muonq_hf-autoregister.pth into site-packages next to the package (README: "Launchers that start
fresh interpreters"). Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "muonq_hf-autoregister.pth"


class BuildPyWithPth(build_py):
    """A wheel: the .pth goes to the root of build_lib, i.e. to site-packages."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))


class EditableWheelWithPth(editable_wheel):
    """`pip install -e`: setuptools packs everything in the unpacked wheel directory; the .pth joins it there
    (the hook is setuptools' own, for namespace-package .pth files)."""

    def _install_namespaces(self, installation_dir, pth_prefix):  # noqa: ANN001 - setuptools' signature
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, Path(installation_dir) / PTH.name)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
