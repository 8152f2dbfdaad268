"""A TensorFlow Serving compatible REST server for the models the Pusher writes (`beam-pipeline serve`).

`create_app` returns the ASGI app, `serve` runs it with uvicorn; TensorFlow is imported by those modules,
not by this package, so `beam_pipeline.serving.cli` stays cheap to import.
"""
