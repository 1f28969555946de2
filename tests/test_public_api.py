"""``__all__`` of the package and of every module lists exactly its public names, sorted."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import supervisor


def _defined_public_names(module: ModuleType) -> set[str]:
    """Classes and functions defined in the module, and UPPER_CASE constants assigned at its
    top level (read from its source, since a constant does not know where it was made)."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_") or inspect.ismodule(value):
            continue
        # Classes, functions, and callables made by decorators (pytest fixtures).
        if callable(value) and getattr(value, "__module__", None) == module.__name__:
            names.add(name)
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        for target in targets:
            if (
                isinstance(target, ast.Name)
                and target.id.isupper()
                and not target.id.startswith("_")
            ):
                names.add(target.id)
    return names


MODULES = sorted(
    info.name
    for info in pkgutil.iter_modules(supervisor.__path__, prefix="supervisor.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_module_all_matches_its_public_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(getattr(module, "__all__", []))
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    assert set(exported) == _defined_public_names(module)


def test_package_all_is_sorted_and_complete() -> None:
    exported = list(supervisor.__all__)
    assert exported == sorted(exported)
    for name in exported:  # every export resolves (they load on first use)
        value = getattr(supervisor, name)
        assert getattr(value, "__name__", name) == name
    public_modules = {
        importlib.import_module(name).__name__ for name in MODULES if not name.endswith("testing")
    }
    for name in exported:
        assert getattr(supervisor, name).__module__ in public_modules
    with pytest.raises(AttributeError):
        _ = supervisor.not_a_name
