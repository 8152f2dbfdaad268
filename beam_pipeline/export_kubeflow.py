"""`beam-pipeline export kubeflow`: a Kubeflow Pipelines v2 spec, compiled by the kfp SDK, that runs a pipeline file."""

# No `from __future__ import annotations`: kfp reads the components' parameter types at runtime.
from beam_pipeline import remote_fs
from beam_pipeline.errors import PipelineDefinitionError
from beam_pipeline.export_common import LaunchCommand


def check_shared_storage(pipeline_root: str | None, metadata_uri: str | None) -> None:
    """Each Kubeflow step runs in a pod of its own, so the root must be an object store and ML Metadata a server."""
    if not pipeline_root or not remote_fs.is_remote(pipeline_root):
        raise PipelineDefinitionError(
            f"--pipeline-root {pipeline_root!r}: a Kubeflow run's pod has a disk of its own, lost when it ends; "
            "give an object store root (gs://... or s3://...)"
        )
    if not metadata_uri or not metadata_uri.startswith("mysql://"):
        raise PipelineDefinitionError(
            f"--metadata-uri {metadata_uri!r}: a Kubeflow run needs ML Metadata on a server every pod reaches "
            "(mysql://user:password@host:port/database)"
        )


def compile_kubeflow(launch: LaunchCommand, *, image: str, output_path: str) -> None:
    """Compile a one-step KFP pipeline running `launch` in `image` to `output_path` (YAML).

    Its `date` parameter, when left empty, takes the scheduled run's time (a recurring run's day), so a
    recurring run reads its own day's spans like a scheduled Airflow run does.
    """
    from kfp import compiler, dsl

    marker = "\x00date\x00"

    def step(date=None) -> dsl.ContainerSpec:
        """The container's command line, the date word filled from `date` (a KFP placeholder) when given."""
        words = launch.argv(date=None if date is None else marker)
        args = [dsl.ConcatPlaceholder([w.split(marker)[0], date]) if marker in w else w for w in words[1:]]
        return dsl.ContainerSpec(image=image, command=[words[0]], args=args)

    if launch.date_param:

        @dsl.container_component
        def run_pipeline(date: str):
            return step(date)

        @dsl.pipeline(name=_kfp_name(launch.pipeline_name), description=_description(launch))
        def kfp_pipeline(date: str = ""):
            with dsl.If(date == "", name="scheduled"):
                _uncached(run_pipeline(date=dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER), "run (schedule time)")
            with dsl.Else(name="given-date"):
                _uncached(run_pipeline(date=date), "run (given date)")

    else:

        @dsl.container_component
        def run_pipeline():
            return step()

        @dsl.pipeline(name=_kfp_name(launch.pipeline_name), description=_description(launch))
        def kfp_pipeline():
            _uncached(run_pipeline(), "run")

    compiler.Compiler().compile(kfp_pipeline, output_path)


def _uncached(task, name: str) -> None:
    """KFP would reuse a step by its parameters alone, hiding a day's new files; ML Metadata caches by content."""
    task.set_display_name(name)
    task.set_caching_options(False)


def _kfp_name(name: str) -> str:
    """KFP pipeline names are lowercase DNS-style words."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "pipeline"


def _description(launch: LaunchCommand) -> str:
    return f"beam-pipeline {launch.pipeline_name!r} ({launch.pipeline_file}) as one Beam job (beam-pipeline export)"
