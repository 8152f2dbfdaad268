"""Request errors of the model server. Each carries the HTTP status TF Serving would answer with.

They subclass `BeamPipelineError` so callers can catch everything this package raises on purpose; the
server turns them into `{"error": message}` responses and never into a 5xx.
"""

from beam_pipeline.errors import BeamPipelineError


class ServingRequestError(BeamPipelineError):
    """A request the server refuses; `status_code` is the HTTP status to answer with."""

    status_code = 400


class BadRequestError(ServingRequestError):
    """The request is malformed: bad JSON, unknown or missing feature, wrong type or shape."""

    status_code = 400


class ServableNotFoundError(ServingRequestError):
    """No such model, version or label is being served right now."""

    status_code = 404


class RequestTooLargeError(ServingRequestError):
    """The request body is larger than the configured limit."""

    status_code = 413


class ModelLoadError(BeamPipelineError):
    """A version directory could not be loaded as a SavedModel; `error_code` is TF Serving's name for why."""

    def __init__(self, message: str, error_code: str = "UNKNOWN"):
        super().__init__(message)
        self.error_code = error_code
