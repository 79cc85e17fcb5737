"""The package's top-level names stay what `adapter/__init__.py` exports, whichever of its modules are imported:
a module named like an export (as `adapter/chat.py` once was, beside the function `adapter.chat`) would replace it
on import."""

from __future__ import annotations

import importlib
import pkgutil

import adapter


def test_no_module_shadows_an_exported_name():
    exported = {name: getattr(adapter, name) for name in adapter.__all__}
    modules = [info.name for info in pkgutil.walk_packages(adapter.__path__, "adapter.")
               if not info.ispkg and not info.name.endswith(".__main__")]  # those run their command
    assert "adapter.terminal_chat" in modules and "adapter.next_token" in modules
    for name in modules:
        importlib.import_module(name)
    assert {name: getattr(adapter, name) for name in adapter.__all__} == exported
    assert not set(adapter.__all__) & {name.split(".")[1] for name in modules}
