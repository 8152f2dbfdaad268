"""The query API: questions asked of ML Metadata after the fact: which runs, which executions, what a model was
made from.

Everything here reads the store only (plus the artifact files it points at), so it works the same on
a notebook, the CLI and the run report, on SQLite or MySQL. Tables come back as pandas DataFrames.

This module re-exports the public names; each job lives in its own module:

* `_mlmd_reading`: opening a store (`open_store`, `store_uri`) and the small readers (`prop_value`,
  `state_name`, `execution_config`, `flatten`, `get_artifact`).
* `run_tables`: runs and executions tables (`runs`, `run_executions`, `executions`, `run_state`,
  `latest_run_id`, `RUN_COLUMNS`, `EXECUTION_COLUMNS`).
* `model_lookup`: walking lineage (`producers`, `consumers`, `upstream`) and what surrounds a model
  (`model_run`, `model_evaluation`, `model_outcome`, `training_data`, `TrainingData`).
* `data_tables`: statistics, schema and anomalies artifacts (`read_statistics`, `read_schema`,
  `read_anomalies`) and their tables (`statistics_frame`, `schema_frame`, `anomalies_frame`, `feature_name`).
* `metric_tables`: evaluation metrics (`load_eval_result`, `metrics_frame`, `model_metrics`, `OVERALL`).
* `tensorboard_server`: TensorBoard on a model's training logs (`start_tensorboard`, `TensorBoardServer`).
* `model_diff`: the diff of two models (`diff`, `ModelDiff`, `statistics_diff`, `drift`,
  `module_source`, `STATISTICS_DIFF_COLUMNS`).
"""

from __future__ import annotations

from beam_pipeline._mlmd_reading import (
    execution_config,
    flatten,
    get_artifact,
    open_store,
    prop_value,
    state_name,
    store_uri,
)
from beam_pipeline.data_tables import (
    anomalies_frame,
    feature_name,
    read_anomalies,
    read_schema,
    read_statistics,
    schema_frame,
    statistics_frame,
)
from beam_pipeline.metric_tables import OVERALL, load_eval_result, metrics_frame, model_metrics
from beam_pipeline.model_diff import (
    STATISTICS_DIFF_COLUMNS,
    ModelDiff,
    diff,
    drift,
    module_source,
    statistics_diff,
)
from beam_pipeline.model_lookup import (
    TrainingData,
    consumers,
    model_evaluation,
    model_outcome,
    model_run,
    producers,
    training_data,
    upstream,
)
from beam_pipeline.run_tables import (
    EXECUTION_COLUMNS,
    RUN_COLUMNS,
    executions,
    latest_run_id,
    run_executions,
    run_state,
    runs,
)
from beam_pipeline.tensorboard_server import TensorBoardServer, start_tensorboard

__all__ = [
    "EXECUTION_COLUMNS",
    "OVERALL",
    "RUN_COLUMNS",
    "STATISTICS_DIFF_COLUMNS",
    "ModelDiff",
    "TensorBoardServer",
    "TrainingData",
    "anomalies_frame",
    "consumers",
    "diff",
    "drift",
    "execution_config",
    "executions",
    "feature_name",
    "flatten",
    "get_artifact",
    "latest_run_id",
    "load_eval_result",
    "metrics_frame",
    "model_evaluation",
    "model_metrics",
    "model_outcome",
    "model_run",
    "module_source",
    "open_store",
    "producers",
    "prop_value",
    "read_anomalies",
    "read_schema",
    "read_statistics",
    "run_executions",
    "run_state",
    "runs",
    "schema_frame",
    "start_tensorboard",
    "state_name",
    "statistics_diff",
    "statistics_frame",
    "store_uri",
    "training_data",
    "upstream",
]
