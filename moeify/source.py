"""Load a dense model from a `model.py[:NAME]` file or an importable `package.module:factory`.

Convention for `model.py`: it defines `build_model()` (or the callable / module-level nn.Module named
after the colon) and may define `example_inputs()` returning a tuple (or a (args, kwargs) pair).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moeify.errors import ModelSourceError, one_line


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "file" | "import"
    target: str  # file path or "package.module"
    name: str  # the factory / module attribute
    beside: str | None = None  # another folder whose modules the file imports (a saved copy's original one)

    @classmethod
    def parse(cls, spec: str) -> ModelSource:
        if not isinstance(spec, (str, Path)) or not str(spec):
            raise ModelSourceError(f"source={spec!r} is not a model spec: pass a string, 'model.py[:NAME]' or "
                                   "'package.module:factory'")
        spec = str(spec)
        path_part, _, name = spec.partition(":") if not (len(spec) > 1 and spec[1] == ":") else (spec, "", "")
        if path_part.endswith(".py") or "/" in path_part or Path(path_part).exists():
            return cls("file", path_part, name or "build_model")
        if not name:
            raise ModelSourceError(f"{spec!r} is neither a .py file nor 'package.module:factory'; "
                                   "pass model.py[:NAME] or package.module:factory")
        return cls("import", path_part, name)

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "target": self.target, "name": self.name}

    def check(self, *, defines: bool = False) -> ModelSource:
        """Refuse a source that cannot be loaded later (a missing file, a module that is not importable),
        without running it. `defines`: also a model file that does not define the factory's name (for a source
        recorded without being run; one about to run says what is wrong itself)."""
        if self.kind == "file" and not Path(self.target).is_file():
            what = "is a directory" if Path(self.target).is_dir() else "does not exist"
            raise ModelSourceError(f"model file {self.target} {what}: pass the path to a .py file that defines "
                                   "build_model()")
        if self.kind == "file" and defines:
            defined = _top_level_names(Path(self.target))
            if defined is not None and self.name not in defined:
                shown = sorted(defined, key=lambda n: (not n.islower(), n))[:8]  # functions before constants
                raise ModelSourceError(f"{self.target} defines no {self.name!r}: name its factory after a colon "
                                       f"(defined there: {', '.join(shown) or 'nothing'})")
        if self.kind == "import":
            try:
                found = importlib.util.find_spec(self.target) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise ModelSourceError(f"cannot import {self.target}: no such module; pass model.py[:NAME] or an "
                                       "importable package.module:factory")
        return self

    @contextmanager
    def importable_siblings(self):
        """Inside, a model file imports the modules next to it, as `python model.py` would."""
        folders = [str(Path(self.target).resolve().parent), self.beside] if self.kind == "file" else []
        added = [f for f in dict.fromkeys(folders) if f is not None and f not in sys.path and Path(f).is_dir()]
        sys.path[:0] = added
        try:
            yield
        finally:
            for folder in added:
                if folder in sys.path:
                    sys.path.remove(folder)

    def load_module(self):
        if self.kind == "import":
            try:
                return importlib.import_module(self.target)
            except Exception as exc:
                raise ModelSourceError(f"cannot import {self.target}: {one_line(exc)}") from exc
        path = Path(self.check().target)
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        mod_name = f"_moeify_model_{path.stem}_{digest}"
        # an explicit loader: a model file named without .py is Python too (the default finder gives no spec)
        spec = importlib.util.spec_from_file_location(mod_name, path,
                                                      loader=importlib.machinery.SourceFileLoader(mod_name, str(path)))
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling-free introspection need it registered
        try:
            with self.importable_siblings():
                spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise ModelSourceError(f"{self.target} raised while loading: {one_line(exc)}; fix the file "
                                   "(run it with python to see the traceback)") from exc
        return module

    def build(self, module: Any = None) -> tuple[nn.Module, Any]:
        """(model, module) where module is the loaded Python module (for example_inputs); `module`: one
        `load_module` already returned, rather than running the file again."""
        module = self.load_module() if module is None else module
        obj = getattr(module, self.name, None)
        where = f"{self.target}:{self.name}"
        if obj is None:
            have = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8] or ["none"]
            raise ModelSourceError(f"{self.target} defines no {self.name!r}: define build_model() returning the "
                                   f"dense nn.Module, or name one after a colon (callables found: {', '.join(have)})")
        if isinstance(obj, nn.Module):
            return obj, module
        if not callable(obj):
            raise ModelSourceError(f"{where} is neither an nn.Module nor a callable returning one")
        try:
            with self.importable_siblings():
                model = obj()
        except Exception as exc:
            raise ModelSourceError(f"{where}() raised: {one_line(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise ModelSourceError(f"{where}() returned {type(model).__name__}, not an nn.Module")
        return model, module


def example_inputs_of(module: Any, where: str, *, otherwise: str = "pass --no-verify") -> tuple[tuple, dict]:
    """(args, kwargs) from the module's example_inputs(), or an error saying it is missing and what else
    works (`otherwise`, for the command at hand)."""
    fn = getattr(module, "example_inputs", None)
    if fn is None:
        raise ModelSourceError(f"{where} defines no example_inputs(): define example_inputs() returning a tuple of "
                               f"inputs for the model's forward, or {otherwise}")
    try:
        value = fn()
    except Exception as exc:
        raise ModelSourceError(f"{where}: example_inputs() raised {one_line(exc)}") from exc
    if isinstance(value, dict):
        return (), value
    pair = isinstance(value, tuple) and len(value) == 2
    if pair and isinstance(value[1], dict) and isinstance(value[0], (tuple, list)):
        return tuple(value[0]), value[1]
    if not isinstance(value, (tuple, list)):
        value = (value,)
    return tuple(value), {}


def _top_level_names(path: Path) -> set[str] | None:
    """The names a Python file binds at its top level, read without running it; None where that cannot be
    known so (a `from ... import *`, a file that does not parse: running it will say what is wrong)."""
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    names: set[str] = set()
    for node in ast.walk(tree):  # walks into if/try blocks too; binding in functions only adds names
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("globals", "setattr",
                                                                                                "exec"):
            return None  # names bound at run time
    return None if "__getattr__" in names else names
