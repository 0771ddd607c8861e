"""Experiment tracking (config section ``tracking:``, extra ``blur-evolve[tracking]``): TensorBoard event files
and MLflow, both optional and off by default.

* TensorBoard: event files under ``RUN/tensorboard/``: every numeric per-generation metric (step =
  generation), and at the end the held-out table as text and the fitness-history plot as an image.
* MLflow: one MLflow run per blur run (default store: a file store under ``RUN/mlruns``, or
  ``tracking.mlflow_uri``): params = the resolved config, metrics per generation, and at the end the held-out
  accuracies and the artifacts best.genome, report.md, report.json and the fitness plot.

A generation is tracked once its checkpoint is on disk (so a killed run never leaves tracked generations
that its resume recomputes). ``blur resume`` continues **the same** tracking runs: the MLflow run id lives
in ``RUN/tracking.json`` and the metrics continue after the last step MLflow has; TensorBoard gets a
``SessionLog.START`` at step 0 on resume and the metrics up to the checkpoint again, which makes TensorBoard
drop whatever the killed process had written (the standard purge of orphaned events). A backend that fails
mid-run never stops the run: it warns once on stderr and is switched off.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from genome.errors import MissingExtra, require_extra

TRACKING_FILE = "tracking.json"
TB_DIR = "tensorboard"
_MLFLOW_STEP_METRIC = "generation"  # logged for every tracked generation: the resume point


def check_tracking(config) -> None:
    """Config-time checks: the extra is installed; a given MLflow URI is usable (raises ConfigError)."""
    from evolution.config import ConfigError

    tracking = config.tracking
    try:
        if tracking.tensorboard:
            require_extra("tensorboard", "tracking", "tracking.tensorboard")
        if tracking.mlflow:
            require_extra("mlflow", "tracking", "tracking.mlflow")
    except MissingExtra as error:
        raise ConfigError(str(error)) from None
    if tracking.mlflow and tracking.mlflow_uri:
        try:
            _mlflow_client(tracking.mlflow_uri).search_experiments(max_results=1)
        except Exception as error:  # noqa: BLE001 - any failure of the store is the URI's problem
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"tracking.mlflow_uri: cannot use {tracking.mlflow_uri}: {first}") from None


def _mlflow_client(uri: str):
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks file stores to opt in
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "generation"}


def _tag(key: str) -> str:
    if key.startswith("val_"):
        return f"validation/{key[4:]}"
    if key.startswith("strategy_"):
        return f"strategy/{key[9:]}"
    if key.endswith("_time"):
        return f"time/{key}"
    return f"generation/{key}"


def _flat_params(config) -> dict[str, str]:
    from evolution.config import config_to_dict

    flat: dict[str, str] = {}

    def walk(value, prefix):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = json.dumps(value)[:500]

    walk(config_to_dict(config), "")
    return flat


class Tracker:
    """The tracking backends of one run directory (see the module docstring)."""

    def __init__(self, config, run_dir: Path):
        self.config, self.run_dir = config, Path(run_dir)
        tracking = config.tracking
        self._writer = None
        self._client, self._mlflow_run = None, None
        self._tb_next = 0  # next generation to write to TensorBoard
        self._mlflow_next = 0
        self._warned: set[str] = set()
        if tracking.tensorboard:
            self._guard("tensorboard", self._open_tensorboard)
        if tracking.mlflow:
            self._guard("mlflow", self._open_mlflow)

    # ------------------------------------------------------------------------------------------ backends

    def _guard(self, backend: str, fn, *args) -> None:
        """Run one backend call; a failure warns once and switches that backend off."""
        if backend in self._warned:
            return
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001 - tracking never stops a run
            self._warned.add(backend)
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"blur: warning: tracking backend {backend} failed ({type(error).__name__}: {first}); "
                  "the run goes on without it", file=sys.stderr, flush=True)
            if backend == "tensorboard":
                self._writer = None
            else:
                self._client = None

    def _open_tensorboard(self) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        directory = self.run_dir / TB_DIR
        resumed = directory.is_dir() and any(directory.iterdir())
        self._writer = EventFileWriter(str(directory))
        if resumed:  # TensorBoard drops the killed process's events from step 0 on; they are written again
            self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START)))

    def _open_mlflow(self) -> None:
        from evolution.checkpoint import atomic_write_text

        tracking = self.config.tracking
        uri = tracking.mlflow_uri or (self.run_dir / "mlruns").resolve().as_uri()
        self._client = _mlflow_client(uri)
        path = self.run_dir / TRACKING_FILE
        stored = json.loads(path.read_text()) if path.is_file() else {}
        run_id = stored.get("mlflow_run_id")
        if run_id is None:
            experiment = self._client.get_experiment_by_name(tracking.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self._client.create_experiment(tracking.experiment))
            run = self._client.create_run(experiment_id, run_name=self.run_dir.name)
            run_id = run.info.run_id
            atomic_write_text(path, json.dumps({"mlflow_uri": uri, "mlflow_run_id": run_id}, indent=2))
            params = list(_flat_params(self.config).items())
            from mlflow.entities import Param

            for start in range(0, len(params), 100):
                self._client.log_batch(run_id, params=[Param(k, v) for k, v in params[start:start + 100]])
        else:
            self._client.update_run(run_id, status="RUNNING")
        self._mlflow_run = run_id
        history = self._client.get_metric_history(run_id, _MLFLOW_STEP_METRIC)
        self._mlflow_next = max((m.step for m in history), default=-1) + 1

    # ------------------------------------------------------------------------------------------ logging

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        """Track the metrics rows of checkpointed generations (each backend skips what it already has)."""
        if self._writer is not None:
            self._guard("tensorboard", self._tb_rows, rows)
        if self._client is not None:
            self._guard("mlflow", self._mlflow_rows, rows)

    def _tb_rows(self, rows) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        for row in rows:
            step = int(row["generation"])
            if step < self._tb_next:
                continue
            values = [summary_pb2.Summary.Value(tag=_tag(k), simple_value=v) for k, v in _numeric(row).items()]
            self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                   summary=summary_pb2.Summary(value=values)))
            self._tb_next = step + 1
        self._writer.flush()

    def _mlflow_rows(self, rows) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for row in rows:
            step = int(row["generation"])
            if step < self._mlflow_next:
                continue
            metrics += [Metric(k, v, now, step) for k, v in _numeric(row).items()]
            metrics.append(Metric(_MLFLOW_STEP_METRIC, float(step), now, step))
            self._mlflow_next = step + 1
        for start in range(0, len(metrics), 1000):
            self._client.log_batch(self._mlflow_run, metrics=metrics[start:start + 1000])

    def log_report(self, report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """The end of a run: held-out table, fitness plot, artifacts."""
        plot = None
        if rows:
            try:
                from evolution.inspect import plot_fitness

                plot = plot_fitness(rows, self.run_dir / "fitness.png", self.run_dir.name,
                                    self.config.episode.fitness)
            except Exception:  # noqa: BLE001 - a plot is not worth losing the report over
                plot = None
        if self._writer is not None:
            self._guard("tensorboard", self._tb_report, report, plot)
        if self._client is not None:
            self._guard("mlflow", self._mlflow_report, report, plot)

    def _tb_report(self, report, plot) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2

        from workers.report import format_markdown

        step = self._tb_next
        text = tensor_pb2.TensorProto(dtype=7, tensor_shape=tensor_shape_pb2.TensorShapeProto(),  # DT_STRING
                                      string_val=[format_markdown(report).encode()])
        metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        values = [summary_pb2.Summary.Value(tag="report/held_out", metadata=metadata, tensor=text)]
        values += [summary_pb2.Summary.Value(tag=f"held_out/{name}/accuracy", simple_value=row["accuracy"])
                   for name, row in report.get("methods", {}).items() if row.get("accuracy") is not None]
        if plot is not None:
            from PIL import Image

            data = Path(plot).read_bytes()
            width, height = Image.open(io.BytesIO(data)).size
            values.append(summary_pb2.Summary.Value(tag="plots/fitness", image=summary_pb2.Summary.Image(
                height=height, width=width, colorspace=4, encoded_image_string=data)))
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                               summary=summary_pb2.Summary(value=values)))
        self._writer.flush()

    def _mlflow_report(self, report, plot) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"held_out.{name.replace(' ', '_').replace('+', 'p')}.accuracy", row["accuracy"], now, 0)
                   for name, row in report.get("methods", {}).items() if row.get("accuracy") is not None]
        if metrics:
            self._client.log_batch(self._mlflow_run, metrics=metrics)
        for name in ("best.genome", "report.md", "report.json"):
            if (self.run_dir / name).is_file():
                self._client.log_artifact(self._mlflow_run, str(self.run_dir / name))
        if plot is not None:
            self._client.log_artifact(self._mlflow_run, str(plot))
        self._client.set_terminated(self._mlflow_run, status="FINISHED")

    def close(self) -> None:
        if self._writer is not None:
            self._guard("tensorboard", self._writer.close)
            self._writer = None
