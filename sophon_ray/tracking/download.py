"""Fetch a model directory from MLflow (`models:/...`, `runs:/...`) into a local cache, verified.

Registry URIs are resolved to one version first (an alias is read once), downloaded fresh
(what the store holds now, never an older cached copy), and the weights' sha256 must equal
the version's `weights_sha256` tag recorded at registration (and model.json its `card_sha256`,
when present): a version whose files were altered in the artifact store after registration
is refused. `runs:/` URIs have no registry tag; the card's own sha256 is checked at load.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from sophon_ray.errors import UserError
from sophon_ray.tracking import store


def cache_root() -> Path:
    """$SOPHON_RAY_CACHE, else $XDG_CACHE_HOME/sophon-ray/models (default ~/.cache/sophon-ray/models)."""
    if os.environ.get("SOPHON_RAY_CACHE"):
        return Path(os.environ["SOPHON_RAY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sophon-ray" / "models"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _model_dir_in(path: Path) -> Path | None:
    from sophon_ray.modeldir import CARD, WEIGHTS

    if (path / WEIGHTS).is_file() and (path / CARD).is_file():
        return path
    hits = sorted(p.parent for p in path.rglob(WEIGHTS) if (p.parent / CARD).is_file())
    return hits[0] if hits else None


def _fetch(download: Callable[[str], str], target: Path, what: str) -> Path:
    """Download with `download(dst) -> local path` and move the model directory inside to `target`
    (replaced)."""
    from mlflow.exceptions import MlflowException

    from sophon_ray.modeldir import replace_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.dl-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            got = Path(download(str(tmp)))
        except (MlflowException, OSError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"cannot download {what} ({first}); check the URI with `sophon-ray registry show`") from None
        found = _model_dir_in(got)
        if found is None:
            raise UserError(f"{what} holds no model directory (model.safetensors + model.json); pass a model logged by sophon-ray")
        staged = tmp.with_name(tmp.name + "-model")
        shutil.rmtree(staged, ignore_errors=True)
        os.replace(found, staged)
        try:
            replace_dir(staged, target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_version(client: Any, uri: str, mv: Any, dst: str) -> str:
    """Download a registered version's files through the client bound to `uri`: from its run when
    the version points into the run's artifacts (what sophon-ray registers), else from its source
    location with `uri` as the tracking server. Never `models:/` resolution through MLflow's
    global registry URI, which defaults to a `mlflow.db` in the working directory."""
    import mlflow.artifacts

    source = str(mv.source or "")
    if mv.run_id:
        root = client.get_run(mv.run_id).info.artifact_uri.rstrip("/")
        if source.startswith(root + "/"):
            return client.download_artifacts(mv.run_id, source[len(root) + 1:], dst)
    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=uri)


def _parse_runs(model_uri: str) -> tuple[str, str]:
    rest = model_uri[len("runs:/"):].strip("/")
    run_id, _, path = rest.partition("/")
    if not run_id:
        raise UserError(f"{model_uri!r}: expected runs:/RUN_ID/PATH (e.g. runs:/<id>/model)")
    return run_id, path


def download_model(model_uri: str, cache_dir: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Download a model directory from MLflow and return the local directory holding it.

    Args:
        model_uri: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/NAME/latest` or `runs:/RUN_ID/PATH`.
        cache_dir: where to put it (default `cache_root()`); the directory is
            `<cache>/<name>-v<version>` or `<cache>/run-<run id>-<path>`, replaced on every call.
        tracking_uri: tracking/registry URI (None: as `ensure_store` resolves it).
    Returns:
        The directory with model.safetensors + model.json (+ metrics.json).
    Raises:
        UserError: unknown name/alias/version/run, unreachable store, or (registry URIs) weights
        whose sha256 differs from the version's `weights_sha256` tag.
    """
    from sophon_ray.modeldir import CARD, WEIGHTS, sha256_file
    from sophon_ray.tracking.registry import get_version, parse_ref

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    uri, client = store.open_existing(tracking_uri)
    if model_uri.startswith("runs:/"):
        run_id, path = _parse_runs(model_uri)
        return _fetch(lambda dst: client.download_artifacts(run_id, path, dst),
                      root / f"run-{_safe(run_id)}-{_safe(path)}", model_uri)
    if not model_uri.startswith("models:/"):
        raise UserError(f"{model_uri!r} is not an MLflow model URI; use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
    name, alias, version = parse_ref(model_uri)
    mv = get_version(client, name, version, alias)
    tags = mv.tags or {}
    want = tags.get("weights_sha256")
    if not want:
        raise UserError(f"version {mv.version} of {name!r} has no weights_sha256 tag; only versions registered by sophon-ray can be loaded")
    d = _fetch(lambda dst: _download_version(client, uri, mv, dst), root / f"{_safe(name)}-v{mv.version}",
               f"models:/{name}/{mv.version}")
    got = sha256_file(d / WEIGHTS)
    if got != want:
        shutil.rmtree(d, ignore_errors=True)
        raise UserError(f"models:/{name}/{mv.version}: {WEIGHTS} has sha256 {got[:12]}, but {want[:12]} was registered; "
                        "the stored weights were altered after registration: refusing to load (re-register the model)")
    card_want = tags.get("card_sha256")
    if card_want and sha256_file(d / CARD) != card_want:
        shutil.rmtree(d, ignore_errors=True)
        raise UserError(f"models:/{name}/{mv.version}: {CARD} differs from the registered one (card_sha256); "
                        "the stored model was altered after registration: refusing to load (re-register the model)")
    return d


def resolve_model(ref: str | Path) -> Path:
    """A local model directory for `ref`: an MLflow `models:/` / `runs:/` URI is downloaded (cached,
    the weights' sha256 checked), a path is returned absolute (Tune trials run elsewhere)."""
    if str(ref).startswith(("models:/", "runs:/")):
        return download_model(str(ref))
    return Path(ref).resolve()
