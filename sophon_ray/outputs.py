"""Output paths that never cost a user a file: claim before work, write atomically, replace only ours.

Every command that writes (`pretrain`, `protect`, `audit`, `attack`, `samples`, `run`, a
diffusion judge) calls `claim(path, kind, force)` before any work. A path may be used when it
does not exist, is an empty folder, or is a sophon-ray output of the same kind, i.e. every entry
in it is a name that kind of output writes (a model directory: `model.safetensors`,
`model.json` of our format, `metrics.json`). Anything else (a user's folder, a plain file, a
model directory where an audit should go) is refused with one line naming `--force`, which
replaces it. Claiming also proves the folder is writable (a probe file is created and removed),
so an unwritable `--out` fails before training, not after.

Writers then replace only what was claimed in this process or is recognisably ours
(`guard`), so library callers that skip `claim` are protected as well. Files are written to a
temporary sibling, fsync'ed and renamed (`write_json_atomic`, `fsync_dir`).
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

from sophon_ray.errors import UserError

# kind -> glob patterns of the entries that kind of output may hold (nothing else is replaced)
KINDS: dict[str, tuple[str, ...]] = {
    "model": ("model.safetensors", "model.json", "metrics.json"),
    "audit": ("audit.json", "report.html", "*.png", ".tune", "samples.json", "samples", "judge", "stage.json",
              ".*.tmp-*"),
    "attack": ("attack.json", ".*.tmp-*"),
    "samples": ("samples.json", "*.png", "samples", "judge", ".*.tmp-*"),
    "run": ("source", "protected", "audit", "audit-paper", "judge", "harden", ".ray", ".*.tmp-*", ".*.old-*"),
    "harden": ("harden.json", "removed.png", "round-*", "judge", ".ray", ".*.tmp-*", ".*.old-*"),
}
_ROUND = ("protected", "audit", ".*.tmp-*", ".*.old-*")  # a harden round's folder: round-<r>/
# The stages of a `run` folder and the kind each holds: `claim_run` claims all of them (CLI and API alike).
RUN_STAGES: tuple[tuple[str, str], ...] = (("source", "model"), ("protected", "model"), ("audit", "audit"),
                                           ("judge", "model"), ("harden", "harden"), ("audit-paper", "audit"))
STAGE = "stage.json"  # in an audit folder: the stage key it was made for (`stage_done`)
_CLAIMED: dict[str, str] = {}  # resolved path -> kind claimed by this process (with --force or as ours)


def _key(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _is_ours(path: Path, kind: str) -> bool:
    """Whether the existing `path` may be replaced/written as an output of `kind` without --force."""
    if not path.is_dir() or path.is_symlink():
        return False
    entries = [e.name for e in path.iterdir()]
    if not entries:
        return True
    allowed = KINDS[kind]
    if not all(any(fnmatch.fnmatchcase(e, p) for p in allowed) for e in entries):
        return False
    if kind == "model":
        try:
            card = json.loads((path / "model.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(card, dict) and str(card.get("format", "")).startswith("sophon-ray/model@")
    if kind == "run":
        return all(_is_ours(path / sub, "model") for sub in ("source", "protected") if (path / sub).exists()) and (
            all(_is_ours(path / sub, "audit") for sub in ("audit", "audit-paper") if (path / sub).exists())) and (
            not (path / "harden").exists() or _is_ours(path / "harden", "harden"))
    if kind == "harden":
        return (not (path / "harden.json").is_symlink() and not (path / "harden.json").is_dir()) and all(
            _is_round(r) for r in path.glob("round-*"))
    return True


def _is_round(path: Path) -> bool:
    """A harden round's folder holding only its protected model and audit (`round-<r>/`)."""
    if not path.is_dir() or path.is_symlink() or not path.name[len("round-"):].isdigit():
        return False
    if not all(any(fnmatch.fnmatchcase(e.name, p) for p in _ROUND) for e in path.iterdir()):
        return False
    return (not (path / "protected").exists() or _is_ours(path / "protected", "model")) and (
        not (path / "audit").exists() or _is_ours(path / "audit", "audit"))


def _describe(path: Path) -> str:
    if path.is_symlink():
        return "a symbolic link"
    if not path.is_dir():
        return "a file"
    names = sorted(e.name for e in path.iterdir())
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"a folder holding {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def _probe_writable(folder: Path) -> None:
    probe = folder / f".sophon-ray-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); pass a writable --out") from None


def claim(path: str | Path, kind: str, force: bool = False, flag: str = "--out") -> Path:
    """Check, before any work, that `path` may receive an output of `kind`; returns it as a Path.

    Args:
        path: the output path (a directory for every kind).
        kind: one of `KINDS` ("model", "audit", "attack", "samples", "run", "harden").
        force: allow replacing whatever is there (the user said `--force`).
        flag: the option's name for the error message ("--out", "--judge").
    Raises:
        UserError: the path holds something that is not this kind of sophon-ray output (and not
            `force`), or its folder is not writable.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    p = Path(path).expanduser()
    if (p.exists() or p.is_symlink()) and not force and not _is_ours(p, kind):
        raise UserError(f"{flag} {p} is {_describe(p)}, not a sophon-ray {kind} output; choose another path, "
                        f"or pass --force to replace it")
    parent = p.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {p}: {existing} is a file, not a folder; choose another path")
    _probe_writable(p if p.is_dir() and not p.is_symlink() else existing)
    if force or p.exists():
        _CLAIMED[_key(p)] = kind
    return p


def claim_run(root: str | Path, force: bool = False) -> Path:
    """Claim a `run` folder and every stage folder in it (`RUN_STAGES`) before any work."""
    root = claim(Path(root), "run", force=force)
    for stage, kind in RUN_STAGES:
        claim(root / stage, kind, force=force)
    return root


def stage_done(out: str | Path, stage: str) -> bool:
    """Whether the stage folder `out` holds a finished output made for `stage`: a model directory
    whose card's `lineage.stage_hash` is `stage`, or an audit folder with audit.json and a
    `stage.json` naming `stage` (`mark_stage`)."""
    out = Path(out)
    try:
        if (out / "model.json").is_file():
            return (json.loads((out / "model.json").read_text()).get("lineage") or {}).get("stage_hash") == stage
        return (out / "audit.json").is_file() and json.loads((out / STAGE).read_text()).get("stage") == stage
    except (OSError, ValueError, AttributeError):
        return False


def mark_stage(out: str | Path, stage: str) -> None:
    """Record (atomically, after the output is complete) that `out` was made for `stage`."""
    write_json_atomic(Path(out) / STAGE, {"stage": stage})


def guard(path: str | Path, kind: str) -> None:
    """Refuse to replace `path` unless it is absent, ours of `kind`, or claimed by this process."""
    p = Path(path)
    if not (p.exists() or p.is_symlink()) or _CLAIMED.get(_key(p)) == kind or _is_ours(p, kind):
        return
    raise UserError(f"{p} is {_describe(p)}, not a sophon-ray {kind} output: not replacing it; choose another "
                    "path, or pass --force to replace it")


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that renames inside it survive a crash (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (inside a temporary directory that is renamed later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via an fsync'ed temporary sibling and a rename; the sibling is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to `path` atomically (temporary sibling, fsync, rename)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
