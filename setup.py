"""Packaging of the start-up hook; everything else is in pyproject.toml.

setuptools has no declarative way to put a ``.pth`` file at the root of
``site-packages``, where the interpreter reads it at start-up (see
``src/_commpress_startup.py``). ``build_py`` writes ``commpress-startup.pth``
next to the top-level modules: into the wheel for ``pip install .``, and into
the editable wheel for ``pip install -e .`` (whose build directory is
otherwise discarded).
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "commpress-startup.pth"


def _pth_line() -> str:
    namespace: dict[str, object] = {}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "_commpress_startup.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    start = source.index("PTH_LINE = (")
    end = source.index(")\n", start) + 2
    exec(source[start:end], namespace)  # noqa: S102 - our own constant
    return str(namespace["PTH_LINE"])


class build_py_with_pth(build_py):  # noqa: N801 - setuptools command naming
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # editable_wheel points install_lib at the wheel being assembled
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(_pth_line())

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
