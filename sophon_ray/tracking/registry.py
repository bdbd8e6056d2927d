"""The model registry: protected models as versions, aliases `candidate` and `audited`, audit tags.

A registered version points at the plain model-directory artifacts of the protect run
(`<run artifact root>/model/`: model.safetensors + model.json + metrics.json); nothing is
pickled and no code is stored with the model (see the package docstring for why not pyfunc).
Version tags written here:

- at registration: `weights_sha256`, `card_sha256`, `source_model`, `domains` (JSON),
  `protect_run_id`, `pipeline`; the alias `candidate` moves to the new version;
- by `record_audit`: every audit is kept as its own tag `audit/<run id>` (compact JSON: status,
  certifies, recipes, trials, largest budget in optimizer steps, the attacker's images per class,
  epsilon, margin, control gap), its status and certification recomputed from the audit's own
  trial records (`audit.driver.recheck`), never taken from the dict; an audit run under another
  pipeline than the version's is refused unless its standard covers the version's pipeline. The
  summary tags `audit_run_id`, `audit_status`, `audit_certifies`, `audit_margin`, `audit_epsilon`,
  `audit_passed`, `audit_sha256` describe the *decisive* audit (`decide`). A failed audit blocks
  certification by any audit that is not at least as strong in every respect (recipes, trials,
  largest budget in steps, attacker data, epsilon no laxer), so weights cannot be re-audited more
  weakly until something passes: a failed 20-epoch paper-v1 audit (about 440 steps on the whole
  split) blocks a passing 50-step audit on 10 images per class. The alias `audited` is on the version iff some certifying audit (status `passed` and the
  recorded minimum, see `audit.certify.certification`) is blocked by no failed one; the strongest
  such decides. Otherwise the strongest audit that does not certify decides (strength first,
  outcome second, the later one on a tie). A weaker later audit never overrides a stronger
  earlier one; it is recorded and `record_audit` says so.
- `promote` sets any alias, but `audited` and `production` only on a version whose decisive
  audit certifies its exact weights.

Stages are never used. Every failure a user can fix is a one-line UserError.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from sophon_ray.errors import UserError
from sophon_ray.tracking import store

CANDIDATE, AUDITED = "candidate", "audited"
CERTIFIED_ALIASES = ("audited", "production")  # aliases that claim the model passed a strong audit
AUDIT_TAG = "audit/"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"registry name {name!r} is not valid; use letters, digits, '.', '_' or '-' (e.g. digits-protected)")
    return name


def _missing(e: Exception) -> bool:
    code = getattr(e, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(e).lower()


def _aliases(rm: Any) -> dict[str, str]:
    """alias -> version (as a string: stores differ in the type they return)."""
    return {str(a): str(v) for a, v in (rm.aliases or {}).items()}


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`[models:/]NAME`, `NAME@ALIAS` or `NAME/VERSION` -> (name, alias, version)."""
    text = str(ref).strip()
    text = text[len("models:/"):] if text.startswith("models:/") else text
    name, alias, version = text, None, None
    if "@" in text:
        name, _, alias = text.partition("@")
    elif "/" in text:
        name, _, version = text.partition("/")
        if not version.isdigit() and version != "latest":
            raise UserError(f"{ref!r}: expected models:/NAME/VERSION (a number), models:/NAME@ALIAS or NAME")
    return _check_name(name), alias, version


def get_version(client: Any, name: str, version: int | str | None = None, alias: str | None = None) -> Any:
    """The ModelVersion for (name, version | alias | latest); UserError when any part does not exist."""
    from mlflow.exceptions import MlflowException

    _check_name(name)
    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if _missing(e):
            raise UserError(f"registered model {name!r} does not exist; run `sophon-ray registry list` to see the names") from None
        raise
    if alias is not None:
        aliases = _aliases(rm)
        if alias not in aliases:
            raise UserError(f"registered model {name!r} has no alias {alias!r} (aliases: {', '.join(sorted(aliases)) or 'none'})")
        version = aliases[alias]
    if version is None or str(version) == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise UserError(f"registered model {name!r} has no versions; register one with `sophon-ray protect`")
        version = max(int(v.version) for v in versions)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if _missing(e):
            raise UserError(f"registered model {name!r} has no version {version}; run `sophon-ray registry show {name}`") from None
        raise


def _ensure_logged(client: Any, run_id: str, model_dir: Path, sha: str, artifact_path: str) -> None:
    """The run holds the model dir at `artifact_path` (logged now if absent; must be the same weights)."""
    from sophon_ray.modeldir import CARD, METRICS, WEIGHTS

    names = {Path(f.path).name for f in client.list_artifacts(run_id, artifact_path)}
    if WEIGHTS not in names:
        for name in (WEIGHTS, CARD, METRICS):
            if (model_dir / name).is_file():
                client.log_artifact(run_id, str(model_dir / name), artifact_path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        logged = json.loads(Path(client.download_artifacts(run_id, f"{artifact_path}/{CARD}", tmp)).read_text())
    if logged.get("sha256") != sha:
        raise UserError(f"run {run_id} already holds a different model at {artifact_path!r} (sha256 {str(logged.get('sha256'))[:12]}); "
                        "register the model from the run that logged it")


def register_protected(model_dir: str | Path, name: str, run_id: str, source: str | None = None,
                       domains: Any = None, tracking_uri: str | None = None, artifact_path: str = "model") -> int:
    """Register the protected model directory logged by `run_id` as a version of `name`, alias `candidate`.

    Registering weights already registered under `name` (same sha256) reuses that version.

    Args:
        model_dir: the local model directory (verified against its card).
        name: registered model name; run_id: the protect run holding the model artifacts.
        source: the source model (path or URI) recorded as tag `source_model`.
        domains: recorded as tag `domains` (JSON); default the card's domains.
        tracking_uri: tracking/registry URI (None: as `ensure_store` resolves it).
        artifact_path: where the run holds the model dir (logged there now if absent).
    Returns:
        The version number.
    """
    from mlflow.exceptions import MlflowException

    from sophon_ray.modeldir import CARD, WEIGHTS, read_card, sha256_file

    _check_name(name)
    d = Path(model_dir)
    card = read_card(d)
    sha = sha256_file(d / WEIGHTS)
    if sha != card["sha256"]:
        raise UserError(f"{d / WEIGHTS} does not match the sha256 in its {CARD}; re-create the model before registering it")
    _, client = store.open_existing(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if _missing(e):
            raise UserError(f"run {run_id!r} does not exist in this tracking store; register from the protect run") from None
        raise
    _ensure_logged(client, run_id, d, sha, artifact_path)
    try:
        client.create_registered_model(name, description="SOPHON-protected model (sophon-ray)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    same = client.search_model_versions(f"name='{name}' and tag.weights_sha256='{sha}'")
    if same:
        version = min(int(v.version) for v in same)
    else:
        tags = {"weights_sha256": sha, "card_sha256": sha256_file(d / CARD), "protect_run_id": run_id,
                "source_model": str(source if source is not None else ((card.get("lineage") or {}).get("source") or {}).get("path", "")),
                "domains": json.dumps(domains if domains is not None else card.get("domains"), sort_keys=True),
                "pipeline": str(card.get("pipeline", ""))}
        mv = client.create_model_version(name, f"{run.info.artifact_uri}/{artifact_path}", run_id, tags=tags)
        version = int(mv.version)
    client.set_registered_model_alias(name, CANDIDATE, str(version))
    return version


def _passing(mv: Any) -> bool:
    tags = mv.tags or {}
    return (tags.get("audit_certifies") == "true" and tags.get("audit_passed") == "true"
            and bool(tags.get("weights_sha256")) and tags.get("audit_sha256") == tags.get("weights_sha256"))


def _summary(audit: dict[str, Any], audit_run_id: str | None) -> dict[str, Any]:
    """The compact record of an audit on a version, its status and certification recomputed from
    the audit's own trials (`audit.driver.recheck`), its strength in units that compare: the largest
    budget in optimizer steps and the attacker's images per class (None: the whole split)."""
    from sophon_ray.audit.driver import recheck

    again = recheck(audit)
    v, s = again["verdict"], again["strength"]
    steps = s.get("max_steps")
    images = s.get("attacker_images", 10)  # audits recorded before the field: 10 per class (docs/design.md)
    return {"run": audit_run_id or "", "status": v.get("status") or ("passed" if v.get("passed") else "failed"),
            "certifies": bool(again["certification"]["certifies"]),
            "recipes": int(s.get("recipes") or 0), "trials": int(s.get("trials") or len(audit.get("trials") or [])),
            "max_budget": int(steps) if steps is not None else max(audit.get("budgets") or [0]), "unit": "steps",
            "images": "all" if images is None else int(images),
            "epsilon": v.get("epsilon"), "margin": v.get("margin"), "control_gap": v.get("control_gap"), "order": 0}


def _images(a: dict[str, Any]) -> float:
    """The attacker's images per class of a recorded audit as a number (the whole split: infinite;
    audits recorded before the field: the 10 per class every pipeline's step audits used)."""
    x = a.get("images", 10)
    return float("inf") if x == "all" else float(x)


def _strength(a: dict[str, Any]) -> tuple[float, ...]:
    """(recipes, trials, largest budget in optimizer steps, attacker images per class, -epsilon) of a
    recorded audit: larger is stronger in each."""
    eps = a.get("epsilon")
    return (int(a.get("recipes") or 0), int(a.get("trials") or 0), int(a.get("max_budget") or 0), _images(a),
            -(float(eps) if eps is not None else 1e9))


def at_least_as_strong(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether audit `a` is at least as strong as `b` in every respect: recipes, trials, largest
    budget in optimizer steps, the attacker's data, and an epsilon no laxer."""
    return all(x >= y for x, y in zip(_strength(a), _strength(b)))


_OUTCOME = {"failed": 2, "inconclusive": 1}  # on equal strength the more damning outcome ranks first


def _strength_key(a: dict[str, Any]) -> tuple:
    """"The strongest audit": strength first (recipes, trials, largest budget, smaller epsilon),
    outcome second (failed, inconclusive, passed), then the later one."""
    return (*_strength(a), _OUTCOME.get(str(a.get("status")), 0), int(a.get("order") or 0))


def decide(audits: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(the decisive audit, whether the weights are certified) from the audits recorded on them.

    A failed audit blocks certification by every audit that is not `at_least_as_strong` as it.
    Certified: some certifying audit is blocked by no failed one; the strongest such decides.
    Otherwise the strongest audit that does not certify decides (`_strength_key`).
    """
    failed = [a for a in audits if a.get("status") == "failed"]
    free = [a for a in audits if a.get("certifies") and all(at_least_as_strong(a, f) for f in failed)]
    if free:
        return max(free, key=_strength_key), True
    return max([a for a in audits if not a.get("certifies")] or audits, key=_strength_key), False


def recorded_audits(mv: Any) -> list[dict[str, Any]]:
    """Every audit recorded on a version (from its `audit/<run id>` tags), oldest first."""
    out = []
    for key, value in (mv.tags or {}).items():
        if key.startswith(AUDIT_TAG):
            try:
                out.append(json.loads(value))
            except ValueError:
                continue
    return sorted(out, key=lambda a: int(a.get("order") or 0))


def _check_pipeline(audit: dict[str, Any], mv: Any, name: str) -> None:
    """UserError for an audit run under another pipeline than the version's, unless its standard
    took the version's pipeline into account (`audit.certify.standard_of`: "covers")."""
    want = (mv.tags or {}).get("pipeline")
    got = audit.get("pipeline")
    covers = ((audit.get("strength") or {}).get("standard") or {}).get("covers") or []
    if want and got != want and want not in covers:
        raise UserError(f"the audit ran pipeline {got!r}, version {mv.version} of {name!r} was protected under {want!r} "
                        f"and the audit's standard does not cover it; audit it with `sophon-ray audit {want} ...`")


def record_audit(name: str, version: int | str, audit: dict[str, Any], audit_run_id: str | None,
                 tracking_uri: str | None = None) -> dict[str, Any]:
    """Record an audit on a version; the alias `audited` follows `decide` over every audit recorded.

    Args:
        name, version: the registered version the audit examined.
        audit: the audit.json dict (format sophon-ray/audit@1).
        audit_run_id: the audit's MLflow run id (tag `audit/<run id>`, `audit_run_id`).
    Returns:
        {"status": this audit's status, "certifies": whether it could certify, "audited": whether
        the version now holds alias `audited`, "decisive": the run id of the audit that decides,
        "overridden_by": the earlier audit's run id when that one decides, else None, "blocked_by":
        the earlier failed audits this certifying audit is not at least as strong as (then it cannot
        certify), else []}.
    Raises:
        UserError: the version does not exist, or the audit examined other weights (sha256 differs).
    """
    if not isinstance(audit, dict) or audit.get("format") != "sophon-ray/audit@1" or "verdict" not in audit:
        raise UserError("record_audit needs an audit.json dict of format sophon-ray/audit@1; run `sophon-ray audit` first")
    _, client = store.open_existing(tracking_uri)
    mv = get_version(client, name, version)
    want = (mv.tags or {}).get("weights_sha256")
    got = (audit.get("model") or {}).get("sha256")
    if not want:
        raise UserError(f"version {mv.version} of {name!r} has no weights_sha256 tag; register it with sophon-ray")
    if got != want:
        raise UserError(f"the audit examined weights sha256 {str(got)[:12]}, but version {mv.version} of {name!r} has "
                        f"{want[:12]}; audit models:/{name}/{mv.version} itself")
    _check_pipeline(audit, mv, name)
    earlier = recorded_audits(mv)
    this = {**_summary(audit, audit_run_id), "order": 1 + max((int(a.get("order") or 0) for a in earlier), default=0)}
    key = this["run"] or f"local-{this['order']}"
    client.set_model_version_tag(name, str(mv.version), AUDIT_TAG + key, json.dumps(this, separators=(",", ":")))
    decisive, audited = decide([*earlier, this])
    margin = decisive.get("margin")
    tags = {"audit_run_id": decisive["run"], "audit_status": decisive["status"],
            "audit_certifies": "true" if audited else "false",
            "audit_margin": "n/a" if margin is None else f"{float(margin):.6g}",
            "audit_epsilon": str(decisive.get("epsilon")), "audit_passed": "true" if decisive["status"] == "passed" else "false",
            "audit_sha256": got}
    for k, val in tags.items():
        client.set_model_version_tag(name, str(mv.version), k, val)
    if audited:
        client.set_registered_model_alias(name, AUDITED, str(mv.version))
    elif _aliases(client.get_registered_model(name)).get(AUDITED) == str(mv.version):
        client.delete_registered_model_alias(name, AUDITED)  # the strongest evidence about these weights does not certify
    blocked_by = [a["run"] for a in earlier if a.get("status") == "failed" and not at_least_as_strong(this, a)]
    return {"status": this["status"], "certifies": this["certifies"], "audited": audited,
            "decisive": decisive["run"], "overridden_by": None if decisive is this else decisive["run"],
            "blocked_by": blocked_by if this["certifies"] else []}


def promote(name: str, version: int | str, alias: str, tracking_uri: str | None = None) -> None:
    """Point `alias` at a version; `audited` and `production` only where the version's decisive audit
    certifies its exact weights."""
    if not isinstance(alias, str) or not _ALIAS.match(alias) or alias == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise UserError(f"alias {alias!r} is not valid; use letters, digits, '_' or '-', not 'latest' or v<number>")
    _, client = store.open_existing(tracking_uri)
    mv = get_version(client, name, version)
    if alias in CERTIFIED_ALIASES and not _passing(mv):
        status = (mv.tags or {}).get("audit_status") or "none"
        raise UserError(f"version {mv.version} of {name!r} has no certifying audit of its weights (decisive audit: {status}); "
                        f"alias {alias!r} needs one: run `sophon-ray audit PIPELINE --model models:/{name}/{mv.version}` "
                        "with a full suite on a benchmark whose control has power")
    client.set_registered_model_alias(name, alias, str(mv.version))


def versions_with_sha256(sha256: str, tracking_uri: str | None = None) -> list[tuple[str, int]]:
    """Every registered (name, version) whose `weights_sha256` tag is `sha256`, sorted."""
    if not re.fullmatch(r"[0-9a-f]{64}", str(sha256)):
        raise UserError(f"{sha256!r} is not a sha256 hex digest")
    _, client = store.open_existing(tracking_uri)
    return sorted((mv.name, int(mv.version)) for mv in client.search_model_versions(f"tag.weights_sha256 = '{sha256}'"))


def _aliases_text(aliases: dict[str, str]) -> str:
    return " ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "-"


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per registered model: name, versions, latest, aliases ("audited=1 candidate=2")."""
    _, client = store.open_existing(tracking_uri)
    rows, token = [], None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token)
        for rm in page:
            versions = [int(v.version) for v in client.search_model_versions(f"name='{rm.name}'")]
            rows.append({"name": rm.name, "versions": len(versions), "latest": max(versions) if versions else "-",
                         "aliases": _aliases_text(_aliases(rm))})
        token = getattr(page, "token", None)
        if not token:
            return sorted(rows, key=lambda r: r["name"])


def show(ref: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """A registered model (`NAME`) or one version (`NAME@ALIAS`, `NAME/VERSION`) with aliases and tags.

    Returns:
        {"name", "aliases": {alias: version}, "versions": [{"version", "aliases", "status",
        "run_id", "source", "tags"}]} (newest first).
    """
    name, alias, version = parse_ref(ref)
    _, client = store.open_existing(tracking_uri)
    if alias is not None or version is not None:
        picked = [get_version(client, name, version, alias)]
    else:
        get_version(client, name, None)  # UserError for an unknown name or no versions
        picked = client.search_model_versions(f"name='{name}'")
    aliases = _aliases(client.get_registered_model(name))
    versions = [{"version": int(mv.version), "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
                 "status": mv.status, "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags or {})}
                for mv in sorted(picked, key=lambda m: -int(m.version))]
    return {"name": name, "aliases": aliases, "versions": versions}


def version_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """`show()` versions as table rows: version, aliases, sha256 (12), audit, margin, source model, run."""
    rows = []
    for v in info["versions"]:
        t = v["tags"]
        audit = t.get("audit_status") or {"true": "passed", "false": "failed"}.get(t.get("audit_passed", ""), "-")
        audit += " (certifies)" if t.get("audit_certifies") == "true" else ""
        rows.append({"version": v["version"], "aliases": " ".join(v["aliases"]) or "-",
                     "sha256": (t.get("weights_sha256") or "-")[:12], "audit": audit,
                     "margin": t.get("audit_margin", "-"), "source_model": t.get("source_model") or "-",
                     "protect_run": (t.get("protect_run_id") or v["run_id"] or "-")[:12]})
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain-text table with a header row; lists are joined with spaces, dicts as k=v."""
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])

    def cell(value: Any) -> str:
        if isinstance(value, dict):
            return " ".join(f"{k}={v}" for k, v in value.items()) or "-"
        if isinstance(value, (list, tuple)):
            return " ".join(map(str, value)) or "-"
        return "-" if value is None else str(value)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)
