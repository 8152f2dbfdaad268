"""Load a user module file by path, failing early with errors that name the file and what is wrong."""

from __future__ import annotations

import hashlib
import linecache
import os
import sys
import types
from collections.abc import Sequence

from beam_pipeline.errors import UserModuleError


def _read_source(module_file: str, component: str) -> bytes:
    """The module's bytes through Beam's FileSystems: a local path or a staged copy on an object store alike."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(module_file, compression_type="uncompressed") as f:
            return f.read()
    except OSError as e:  # Beam raises BeamIOError (an IOError) for a missing file
        if not FileSystems.exists(module_file):
            raise UserModuleError(f"{component}: user module file {module_file} does not exist") from None
        raise UserModuleError(f"{component}: user module file {module_file} cannot be read: {e}") from None


def _pickle_by_value(module: types.ModuleType) -> None:
    """Ship the module's functions inside the pipeline, not as references to a module name.

    The module is registered under a name of our own, which an SDK worker on another process or
    machine cannot import; anything of it that a DoFn holds (a preprocessing_fn, a run_fn) must
    travel by value.
    """
    from apache_beam.internal.cloudpickle import cloudpickle as beam_cloudpickle

    beam_cloudpickle.register_pickle_by_value(module)


def load_module(module_file: str, required: Sequence[str], component: str) -> types.ModuleType:
    """Import `module_file` and check it defines callables named in `required`.

    The source is read and executed in memory, never copied to local disk, so a worker loads the
    staged `<root>/_staged/...` copy from wherever the root lives. The module is registered in
    sys.modules under a name derived from its path and content, so two different module files (or
    two versions of one) never shadow each other in one process.
    """
    if not module_file:
        raise UserModuleError(f"{component}: module_file is required")
    source = _read_source(module_file, component)
    where = module_file if "://" in module_file else os.path.abspath(module_file)
    digest = hashlib.sha1(where.encode() + b"\0" + source).hexdigest()[:16]
    name = f"user_module_{digest}"
    module = sys.modules.get(name)
    if module is None:
        try:
            code = compile(source, where, "exec", dont_inherit=True)
        except SyntaxError as e:
            raise UserModuleError(f"{component}: importing {module_file} raised SyntaxError: {e}") from e
        module = types.ModuleType(name)
        module.__file__ = where
        # Tracebacks show the user's lines even when the file is on an object store.
        text = source.decode(errors="replace")
        linecache.cache[where] = (len(text), None, text.splitlines(keepends=True), where)
        sys.modules[name] = module
        try:
            exec(code, module.__dict__)
        except Exception as e:  # any error of the user's import is reported as theirs, with its type
            del sys.modules[name]
            raise UserModuleError(f"{component}: importing {module_file} raised {type(e).__name__}: {e}") from e
        _pickle_by_value(module)
    for fn_name in required:
        if not callable(getattr(module, fn_name, None)):
            raise UserModuleError(f"{component}: {module_file} does not define a function {fn_name}()")
    return module
