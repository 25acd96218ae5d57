"""commpress's start-up hook: patch a Python process whose environment asks for it.

Installed with the package as ``commpress-startup.pth`` in ``site-packages``,
whose one line runs at every interpreter start (the way coverage.py measures
subprocesses)::

    import os; (os.environ.get("COMMPRESS_PATCH") or os.environ.get("COMMPRESS_CODEC")) and ...

With neither variable set that line is two dictionary look-ups and imports
nothing. When one is set, this module (standard library only) is imported and
`install` decides:

- ``COMMPRESS_PATCH=0`` (or ``false``/``no``/``off``): never patch.
- ``COMMPRESS_PATCH=1``: patch, with the policy of the ``COMMPRESS_*``
  variables (what ``commpress run`` sets for the processes its script starts).
- ``COMMPRESS_CODEC`` set to anything but ``none``: patch with that policy
  (``COMMPRESS_CODEC=int8 torchrun --nproc-per-node 2 train.py``).

Patching waits for the process to import ``torch`` (an import hook on
``sys.meta_path`` that removes itself): a process that never imports torch
(a shell helper, ``pip``) never loads torch or commpress, and one that does
is patched as soon as ``import torch`` returns, before the script can call
``init_process_group``. This module never imports torch itself.

A bad ``COMMPRESS_*`` value does not break ``import torch``: the process runs
unpatched and says so on stderr (ranks that are not all patched are then
named by commpress's agreement check, see `commpress.agreement`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["wanted", "install", "PTH_LINE"]

#: The line of ``commpress-startup.pth`` (kept here so a test can check the installed file).
PTH_LINE = (
    'import os; (os.environ.get("COMMPRESS_PATCH") or os.environ.get("COMMPRESS_CODEC")) '
    'and __import__("_commpress_startup").install()\n'
)

_OFF = ("0", "false", "no", "off")


def wanted(environ: Any = None) -> bool:
    """Whether ``environ`` (default ``os.environ``) asks for every process to be patched."""
    env = os.environ if environ is None else environ
    switch = env.get("COMMPRESS_PATCH", "").strip().lower()
    if switch:
        return switch not in _OFF
    codec = env.get("COMMPRESS_CODEC", "").strip().lower()
    return codec not in ("", "none")


class _TorchWatcher:
    """A ``sys.meta_path`` finder that patches right after ``torch`` finished importing."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "torch":
            return None
        _remove_watcher()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_patch(module: Any) -> None:
            try:
                exec_module(module)
            finally:
                # The loader object stays torch's own (module.__loader__ is unchanged).
                vars(loader).pop("exec_module", None)
            _activate()

        loader.exec_module = exec_then_patch  # instance attribute: this import only
        return spec


def _remove_watcher() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchWatcher)]


def _activate() -> None:
    try:
        from commpress import startup
    except Exception as exc:  # noqa: BLE001 - never break the user's `import torch`
        print(
            f"commpress start-up hook: not patching: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return
    startup.activate()


def install() -> None:
    """Patch now if torch is loaded, else when it is; nothing unless `wanted`."""
    if not wanted():
        return
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "distributed", None) is not None:
        _activate()
    elif not any(isinstance(f, _TorchWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchWatcher())
