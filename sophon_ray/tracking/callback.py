"""Ray Tune callback: one nested MLflow run per audit trial, written only by the Tune driver.

Trials never touch MLflow. Tune calls this callback in the driver process for every reported
result, so there is exactly one writer however many trials run at once: no SQLite lock
errors, no lost points. Each trial's child run (tag `mlflow.parentRunId`) is created at its
first start, named `trial-<config["id"] or Tune's trial id>`, gets the trial config as
flattened params, every numeric key of every result as a metric at step `result["steps"]`
(Tune's bookkeeping keys such as `time_total_s` or `pid` are left out; `training_iteration`
is the step when `steps` is absent), and ends FINISHED (tag `trial_status=ok`) or FAILED
(`trial_status=failed`) after Tune's last retry; `trial_retries` counts retries.

This module imports ray; `sophon_ray.tracking` exposes `AuditCallback` lazily.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from sophon_ray.tracking import runs, store

TUNE_KEYS = frozenset({
    "training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname", "pid",
    "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
    "iterations_since_restore", "config", "checkpoint_dir_name", "done", "trial_id", "experiment_tag",
    "should_checkpoint", "episodes_this_iter", "timesteps_this_iter",
})


class AuditCallback(Callback):
    """Log every trial of a Tune run as a child run of `parent_run_id`.

    Args:
        parent_run_id: the audit's run (e.g. `Tracker.run_id`).
        tracking_uri: the store (the value `ensure_store` returned); None resolves as there.
        step_key: the result key used as the MLflow step.
    """

    def __init__(self, parent_run_id: str, tracking_uri: str | None = None, step_key: str = "steps") -> None:
        self.parent_run_id = parent_run_id
        self.uri = store.resolve_uri(tracking_uri)
        self.step_key = step_key
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self.points = 0  # metric values logged (for checks)
        self._exp: str | None = None
        self._closed: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its RunConfig; clients stay out
        return {k: v for k, v in self.__dict__.items() if k != "_exp"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._exp = None

    def get_state(self) -> dict[str, Any]:
        return {"runs": dict(self.runs), "closed": sorted(self._closed)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.runs, self._closed = dict(state.get("runs", {})), set(state.get("closed", ()))

    @property
    def client(self) -> Any:
        return store.client(self.uri)

    def _run_for(self, trial: Any) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        if self._exp is None:
            self._exp = self.client.get_run(self.parent_run_id).info.experiment_id
        config = dict(getattr(trial, "config", None) or {})
        label = str(config.get("id") or trial.trial_id)
        run = self.client.create_run(self._exp, run_name=f"trial-{label}",
                                     tags={"mlflow.parentRunId": self.parent_run_id, "trial_id": trial.trial_id,
                                           "trial": label, "kind": "trial"})
        self.runs[trial.trial_id] = run.info.run_id
        if config.get("subject") is not None:
            runs.set_tags(self.client, run.info.run_id, {"subject": config["subject"]})
        if config:
            runs.log_params(self.client, run.info.run_id, runs.params_of(config))
        return run.info.run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self._run_for(trial)
        step = result.get(self.step_key, result.get("training_iteration", 0))
        metrics = {k: v for k, v in result.items() if k not in TUNE_KEYS and k != self.step_key}
        self.points += runs.log_metrics(self.client, run_id, metrics, int(step or 0))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        runs.set_tags(self.client, self._run_for(trial), {"trial_retries": str(getattr(trial, "num_failures", 1))})

    def _close(self, trial: Any, status: str, label: str) -> None:
        run_id = self._run_for(trial)
        if run_id in self._closed:
            return
        runs.set_tags(self.client, run_id, {"trial_status": label})
        self.client.set_terminated(run_id, status=status)
        self._closed.add(run_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FINISHED", "ok")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED", "failed")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for run_id in set(self.runs.values()) - self._closed:  # interrupted: never leave runs RUNNING
            self.client.set_terminated(run_id, status="KILLED")
            self._closed.add(run_id)
