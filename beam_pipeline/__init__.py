"""beam-pipeline: a TFX-style ML pipeline compiled into one Apache Beam graph."""

import importlib.util
import logging
import os
import warnings

# TFT and TFMA 1.16 need Keras 2; must be set before TensorFlow is imported anywhere.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# google-cloud client libraries warn about Python 3.11's end of life on every import.
warnings.filterwarnings("ignore", message="You are using a Python version", category=FutureWarning)
# Beam warns at import that crcmod is missing, which matters only without google-crc32c (its TFRecord checksum).
if importlib.util.find_spec("google_crc32c") is not None:
    logging.getLogger().addFilter(lambda record: not str(record.msg).startswith("crcmod package not found"))

from beam_pipeline.dsl import Channel, Component, Pipeline  # noqa: E402

__all__ = ["Channel", "Component", "Pipeline"]
__version__ = "0.1.0"
