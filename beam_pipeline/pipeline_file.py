"""Load a user's pipeline file: import it and build its pipeline with the run's root and parameters."""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from typing import Any

from beam_pipeline.dsl import Pipeline
from beam_pipeline.errors import PipelineDefinitionError


def load_pipeline(path: str, pipeline_root: str | None = None, params: dict[str, str] | None = None) -> Pipeline:
    """Import a pipeline file and return its pipeline: `create_pipeline(**params)` or a module-level `PIPELINE`.

    `params` are the run's parameters (`--param date=2026-12-01`, as a scheduler passes them), each
    converted to the type of that argument's default.
    """
    return pipeline_from(user_module(path), path, pipeline_root, params)


def user_module(path: str) -> Any:
    """The pipeline file imported as a module, its directory on sys.path for its own imports."""
    if not os.path.isfile(path):
        raise PipelineDefinitionError(f"pipeline file {path!r} does not exist")
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location("_beam_pipeline_user_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pipeline_from(module: Any, path: str, pipeline_root: str | None, params: dict[str, str] | None) -> Pipeline:
    """The pipeline a pipeline file's module defines, built with the run's root and parameters."""
    if hasattr(module, "create_pipeline"):
        kwargs = _arguments(path, module.create_pipeline, params or {})
        if pipeline_root:
            kwargs["pipeline_root"] = pipeline_root
        pipeline = module.create_pipeline(**kwargs)
    elif params:
        raise PipelineDefinitionError(f"{path}: parameters {sorted(params)} need a create_pipeline() that takes them")
    elif hasattr(module, "PIPELINE"):
        pipeline = module.PIPELINE
    else:
        raise PipelineDefinitionError(f"{path}: define create_pipeline() returning a Pipeline, or a PIPELINE variable")
    if not isinstance(pipeline, Pipeline):
        raise PipelineDefinitionError(f"{path}: create_pipeline() returned {type(pipeline).__name__}, not a Pipeline")
    return pipeline


def _arguments(path: str, create_pipeline: Any, params: dict[str, str]) -> dict[str, Any]:
    """The run's parameters as create_pipeline's arguments, typed like their defaults."""
    signature = inspect.signature(create_pipeline)
    kwargs: dict[str, Any] = {}
    for name, text in params.items():
        parameter = signature.parameters.get(name)
        if parameter is None or name == "pipeline_root":
            takes = ", ".join(n for n in signature.parameters if n != "pipeline_root") or "none"
            raise PipelineDefinitionError(f"{path}: create_pipeline() has no parameter {name!r} (it takes: {takes})")
        default = parameter.default
        kind = type(default) if default not in (inspect.Parameter.empty, None) else str
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                kwargs[name] = text.lower() in ("true", "1")
            else:
                kwargs[name] = kind(text)
        except ValueError as e:
            raise PipelineDefinitionError(f"{path}: parameter {name}={text!r} is not a {kind.__name__} ({e})") from None
    return kwargs
