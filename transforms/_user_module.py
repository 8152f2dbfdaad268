"""Load a user module file by path, failing early with errors that name the file and what is wrong."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Sequence

from beam_pipeline.errors import UserModuleError


def _local_copy(module_file: str) -> str:
    """Modules on remote filesystems (gs://...) are copied locally so importlib can load them."""
    if "://" not in module_file:
        return module_file
    import tensorflow as tf

    if not tf.io.gfile.exists(module_file):
        raise UserModuleError(f"user module file {module_file} does not exist")
    local_dir = tempfile.mkdtemp(prefix="user_module_")
    local = os.path.join(local_dir, os.path.basename(module_file))
    with tf.io.gfile.GFile(module_file, "rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return local


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

    The module is registered in sys.modules under a name derived from its path and content, so two
    different module files (or two versions of one) never shadow each other in one process.
    """
    if not module_file:
        raise UserModuleError(f"{component}: module_file is required")
    local = _local_copy(module_file)
    if not os.path.isfile(local):
        raise UserModuleError(f"{component}: user module file {module_file} does not exist")
    with open(local, "rb") as f:
        source = f.read()
    digest = hashlib.sha1(os.path.abspath(module_file).encode() + b"\0" + source).hexdigest()[:16]
    name = f"user_module_{digest}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, local)
        if spec is None or spec.loader is None:
            raise UserModuleError(f"{component}: {module_file} is not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # any error of the user's import is reported as theirs, with its type
            del sys.modules[name]
            raise UserModuleError(f"{component}: importing {module_file} raised {type(e).__name__}: {e}") from e
        _pickle_by_value(module)
    for fn_name in required:
        if not callable(getattr(module, fn_name, None)):
            raise UserModuleError(f"{component}: {module_file} does not define a function {fn_name}()")
    return module
