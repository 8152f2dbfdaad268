"""Exception types. Each takes one message string so Beam can re-raise it unchanged from workers."""


class BeamPipelineError(Exception):
    """Base of every error this package raises on purpose."""


class PipelineDefinitionError(BeamPipelineError):
    """The pipeline file is wrong: a cycle, a duplicate id, a missing or mistyped input."""


class InputDataError(BeamPipelineError):
    """Input data does not match what was expected; the message names file, line/column and expectation."""


class UserModuleError(BeamPipelineError):
    """A user module file is missing, lacks the required function, or its function raised."""


class AnomaliesFoundError(BeamPipelineError):
    """ExampleValidator found anomalies and was told to halt."""


class PipelineRunError(BeamPipelineError):
    """The Beam job failed; the message names the failing component and the root cause."""


class MetadataError(BeamPipelineError):
    """ML Metadata could not be opened or holds something inconsistent."""


class TrainingClusterError(BeamPipelineError):
    """Training workers could not form their tf.distribute cluster, or one of them failed."""
