"""The application layer: the `sophon-ray` CLI, the `run` workflow and the MLflow-wrapped jobs."""
