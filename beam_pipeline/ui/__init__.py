"""The metadata web UI (`beam-pipeline ui`): runs, executions, artifacts, lineage, statistics and models as pages."""
