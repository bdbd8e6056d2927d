"""Issue 36 part 6: is an FTS step cheaper with torch.compile, or with fewer query points?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_step.py --source /work/runs/src

Builds the mnist-to-digits protection from SOURCE exactly as `benchmarks/objectives.py --cost`
does, at the issue's comparison settings (protect.inner_steps=20, protect.query_every=4, E 2,
sequential environments), on one thread, and measures seconds per `Protection.fts_step`:

1. torch.compile of the simulated attacker's inner step. The narrowest function the first-order
   inner loop (`core.inner.first_order_meta_grad`) calls K times per environment that is pure
   tensor code is `ClassificationObjective.fit` (functional_call of the model on the fast weights
   + cross-entropy). This script swaps it, for the compiled variant only, for
   `torch.compile(fit, dynamic=False, mode=M)` (M in --modes: default, reduce-overhead; on CPU
   the latter has no CUDA graphs to add, it is timed to show it); its backward (the `autograd.grad` of the loop) then runs
   AOTAutograd's compiled backward, so forward + backward of every inner step is compiled (one
   graph, no graph break, one recompile per support batch size). The inner optimizer update
   (`_update_`, foreach kernels, <1% of the step) is left eager: it reads the environment's lr
   and Adam's step count as Python numbers, which would recompile per environment. The library is
   not changed. Eager and compiled run interleaved (A B A B ...) from the same weights and outer
   Adam state, each `--steps` FTS steps per repeat; the compile warm-up (one untimed pass, on a
   fresh inductor cache) is reported separately. "Same result": the mean meta-gradient and the
   parameter update of one FTS step from the same seed, eager vs compiled (max |diff| and
   relative diffs), next to the float32 noise floor (eager float32 vs a float64 run of the same step).
2. The query-point count: protect.query_every in 1, 2, 4, 10 at K 20, all else equal, interleaved.

Prints two markdown tables and a verdict for each by the issue's rule: adopt what is >= 1.2x
faster with the same result (compile: meta-gradient within ~1e-5 relative of eager).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # measure a cold compile, not a previous run's cache
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_step_inductor_")

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BASE = ["protect.inner_steps=20", "protect.query_every=4"]
RULE = 1.2  # the adoption threshold (speed-up)
TOL = 1e-5  # float32 tolerance on the relative meta-gradient difference


def build(source: str, pipeline: str, extra: list[str] = ()):
    """(task, tensors, model, protection) as `benchmarks/objectives.py` cost() builds them."""
    from sophon_ray import tasks

    task = tasks.of(tasks.get_pipeline(pipeline, overrides=[*BASE, *extra]))
    t = task.load_tensors()
    model, _ = task.load_for(source, t)
    prot = task.build_protection(model, t, task.original_metric(model, t))
    return task, t, model, prot


class Snapshot:
    """The protection's weights, outer Adam state and iteration: every timed pass starts from it."""

    def __init__(self, prot):
        self.prot = prot
        self.model = copy.deepcopy(prot.model.state_dict())
        self.opt = copy.deepcopy(prot.fts_opt.state_dict())
        self.iteration = prot.iteration

    def restore(self) -> None:
        self.prot.model.load_state_dict(self.model)
        self.prot.fts_opt.load_state_dict(self.opt)
        self.prot.iteration = self.iteration


def timed_pass(snap: Snapshot, steps: int) -> float:
    """Seconds per FTS step over `steps` FTS steps (subs 0..steps-1) from the snapshot."""
    snap.restore()
    t0 = time.perf_counter()
    for sub in range(steps):
        snap.prot.fts_step(sub)
    return (time.perf_counter() - t0) / steps


class Patch:
    """Swap `ClassificationObjective.fit` for a compiled one inside a `with` block (and
    record the meta-gradient `fts_step` computes, via protect.meta_grad_sum, when asked)."""

    def __init__(self, mode: str | None):
        from sophon_ray.core.inner import call

        self.compiled = None
        if mode is not None:
            def fit(model, state, x, y):  # ClassificationObjective.fit's body
                return F.cross_entropy(call(model, state, x), y)

            self.compiled = torch.compile(fit, dynamic=False, mode=mode)
        self.meta: list[torch.Tensor] | None = None
        self.record = False

    def __enter__(self):
        from sophon_ray.core import protect
        from sophon_ray.core.objectives import ClassificationObjective

        self._fit, self._sum = ClassificationObjective.fit, protect.meta_grad_sum
        if self.compiled is not None:
            compiled = self.compiled
            ClassificationObjective.fit = lambda obj, model, state, batch: compiled(model, state, *batch)
        if self.record:
            inner_sum = self._sum

            def recording(*a, **kw):
                total, stats = inner_sum(*a, **kw)
                self.meta = [g.detach().clone() for g in total]
                return total, stats

            protect.meta_grad_sum = recording
        return self

    def __exit__(self, *exc):
        from sophon_ray.core import protect
        from sophon_ray.core.objectives import ClassificationObjective

        ClassificationObjective.fit, protect.meta_grad_sum = self._fit, self._sum
        return False


def one_step(snap: Snapshot, patch: Patch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(mean meta-gradient, parameter update, metrics) of FTS step 0 from the snapshot, flat, float64."""
    snap.restore()
    before = [p.detach().double().clone() for p in snap.prot.model.parameters()]
    patch.record = True
    with patch:
        m = snap.prot.fts_step(0)
    patch.record = False
    meta = torch.cat([g.double().flatten() for g in patch.meta]) / snap.prot.cfg.envs_per_step
    upd = torch.cat([(p.detach().double() - b).flatten() for p, b in zip(snap.prot.model.parameters(), before)])
    return meta, upd, m


def float64_step(task, t, snap: Snapshot) -> torch.Tensor:
    """The same FTS step 0 in float64 (model, data and the head re-initialisation draws, which stay
    float32 draws cast up, so both runs see the same heads): the float32 noise floor's reference."""
    from sophon_ray.core import inner

    snap.restore()
    prot = snap.prot
    m64 = copy.deepcopy(prot.model).double()
    p64 = task.build_protection(m64, t, prot.source_value)
    p64.support = (prot.support[0].double(), *prot.support[1:])
    p64.query = (prot.query[0].double(), *prot.query[1:])
    fresh = inner.fresh_head

    def fresh_head32(params, head_keys, generator):
        out = fresh({k: v.float() for k, v in params.items()}, head_keys, generator)
        return {k: v.double() for k, v in out.items()}

    inner.fresh_head = fresh_head32
    try:
        meta, _, _ = one_step(Snapshot(p64), Patch(None))
    finally:
        inner.fresh_head = fresh
    return meta


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a - b).abs()
    return {"max": float(d.max()), "rel_max": float(d.max() / b.abs().max().clamp_min(1e-30)),
            "rel_norm": float((a - b).norm() / b.norm().clamp_min(1e-30))}


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def compile_bench(args) -> None:
    task, t, model, prot = build(args.source, args.pipeline)
    snap = Snapshot(prot)
    modes = [m for m in args.modes.split(",") if m]
    eager = Patch(None)
    variants: dict[str, dict] = {"eager": {"patch": eager, "times": [], "warm": None, "error": None}}
    torch._dynamo.reset()
    for mode in modes:
        name = f"compile(fit, {mode}, dynamic=False)"
        v = {"patch": None, "times": [], "warm": None, "error": None, "graphs": 0}
        try:
            v["patch"] = Patch(mode)
            g0 = graphs()
            t0 = time.perf_counter()
            with v["patch"]:
                timed_pass(snap, args.steps)  # compiles every support batch size these steps draw
            v["warm"] = time.perf_counter() - t0
            v["graphs"] = graphs() - g0
        except Exception as e:  # report, do not crash: the eager numbers still stand
            v["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
        variants[name] = v
        print(f"[warm-up] {name}: {v['warm'] if v['error'] is None else v['error']}", flush=True)
    # one untimed eager pass too, so neither side pays a first-call cost in the timed repeats
    timed_pass(snap, 1)
    live = [n for n, v in variants.items() if v["error"] is None]
    g_before = graphs()
    for r in range(args.repeats):
        for name in (live if r % 2 == 0 else live[::-1]):  # A B, B A, ...: no fixed position
            with variants[name]["patch"]:
                variants[name]["times"].append(timed_pass(snap, args.steps))
        print(f"[repeat {r + 1}/{args.repeats}] " + ", ".join(f"{n.split('(')[0]} {variants[n]['times'][-1]:.2f}s"
                                                             for n in live), flush=True)
    recompiles = graphs() - g_before

    # same result: one FTS step from the same seed and weights
    ref_meta, ref_upd, ref_m = one_step(snap, eager)
    meta64 = float64_step(task, t, snap)
    floor = diff(ref_meta, meta64)
    base = statistics.median(variants["eager"]["times"])
    print("\n### torch.compile of the inner attacker step (mnist-to-digits, K 20, query_every 4, E 2, 1 thread)\n")
    print("| variant | s / FTS step (median) | speed-up vs eager | warm-up s (compile) | max\\|diff\\| of the update "
          "| meta-gradient: max\\|diff\\| / rel (max) / rel (norm) | vs float64: rel (norm) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| eager | {base:.2f} ({', '.join(f'{x:.2f}' for x in variants['eager']['times'])}) | 1.00x | - | 0 | 0 | "
          f"{floor['rel_norm']:.1e} (float32 noise floor) |")
    verdicts = []
    for name, v in variants.items():
        if name == "eager":
            continue
        if v["error"] is not None:
            print(f"| {name} | fails: {v['error']} | - | - | - | - | - |")
            verdicts.append(f"{name}: do not adopt (fails: {v['error']})")
            continue
        meta, upd, m = one_step(snap, v["patch"])
        dm, du, d64 = diff(meta, ref_meta), diff(upd, ref_upd), diff(meta, meta64)
        med = statistics.median(v["times"])
        speed = base / med
        warm_compile = v["warm"] - args.steps * med
        print(f"| {name} | {med:.2f} ({', '.join(f'{x:.2f}' for x in v['times'])}) | {speed:.2f}x | "
              f"{v['warm']:.0f} (compile ~{warm_compile:.0f}; {v['graphs']} graphs) | {du['max']:.1e} "
              f"(rel {du['rel_max']:.1e}) | {dm['max']:.1e} / {dm['rel_max']:.1e} / {dm['rel_norm']:.1e} | "
              f"{d64['rel_norm']:.1e} |")
        same = dm["rel_norm"] <= TOL
        ok = speed >= RULE and same
        why = (f"speed-up {speed:.2f}x {'>=' if speed >= RULE else '<'} {RULE}x; meta-gradient rel diff "
               f"{dm['rel_norm']:.1e} {'<=' if same else '>'} {TOL:.0e} (eager's own distance to float64: "
               f"{floor['rel_norm']:.1e}, compiled's: {d64['rel_norm']:.1e}); fts_loss {m['fts_loss']:.6f} vs eager {ref_m['fts_loss']:.6f}")
        verdicts.append(f"{name}: {'adopt' if ok else 'do not adopt'} ({why})")
    if recompiles:
        print(f"\n(note: {recompiles} graphs compiled during the timed repeats)")
    print("\nVerdict (compile): " + "; ".join(verdicts))


def query_points(k: int, every: int) -> int:
    return sum(1 for i in range(1, k + 1) if i % every == 0 or i == k)


def query_bench(args) -> None:
    settings = [int(x) for x in args.query_every.split(",")]
    snaps = {}
    for qe in settings:
        _, _, _, prot = build(args.source, args.pipeline, [f"protect.query_every={qe}"])
        snaps[qe] = Snapshot(prot)
        timed_pass(snaps[qe], 1)  # untimed first call
    k = snaps[settings[0]].prot.cfg.inner_steps
    times: dict[int, list[float]] = {qe: [] for qe in settings}
    for r in range(args.repeats):
        order = settings[r % len(settings):] + settings[:r % len(settings)]  # rotate the start each repeat
        for qe in order:
            times[qe].append(timed_pass(snaps[qe], args.steps))
        print(f"[repeat {r + 1}/{args.repeats}] " + ", ".join(f"qe {qe} {times[qe][-1]:.2f}s" for qe in settings),
              flush=True)
    med = {qe: statistics.median(v) for qe, v in times.items()}
    ref = 4 if 4 in med else settings[0]
    print(f"\n### query points (mnist-to-digits, K {k}, E 2, 1 thread)\n")
    print(f"| query_every | query points per env | s / FTS step (median) | time / time(qe={ref}) | speed-up vs qe={ref} "
          "| speed-up vs qe=1 |")
    print("|---|---|---|---|---|---|")
    for qe in settings:
        vs1 = f"{med[1] / med[qe]:.2f}x" if 1 in med else "-"
        print(f"| {qe} | {query_points(k, qe)} | {med[qe]:.2f} ({', '.join(f'{x:.2f}' for x in times[qe])}) | "
              f"{med[qe] / med[ref]:.2f} | {med[ref] / med[qe]:.2f}x | {vs1} |")
    faster = [qe for qe in settings if qe != ref and med[ref] / med[qe] >= RULE]
    best = max(settings, key=lambda qe: med[ref] / med[qe])
    if faster:
        f = max(faster)
        verdict = (f"do not adopt: query_every={f} is {med[ref] / med[f]:.2f}x faster than {ref} (>= {RULE}x), but it "
                   f"changes the FTS objective ({query_points(k, f)} vs {query_points(k, ref)} query points per "
                   f"environment), so not the same result; it needs an equal-compute audit comparison first")
    else:
        verdict = (f"do not adopt: no setting is >= {RULE}x faster than query_every={ref} "
                   f"(best: {best}, {med[ref] / med[best]:.2f}x)")
    print(f"\nVerdict (query points): {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="/work/runs/src", help="the trained source model directory")
    ap.add_argument("--pipeline", default="mnist-to-digits")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per variant")
    ap.add_argument("--steps", type=int, default=2, help="FTS steps per repeat")
    ap.add_argument("--modes", default="default,reduce-overhead", help="torch.compile modes to try, comma-separated ('' = none)")
    ap.add_argument("--query-every", default="1,2,4,10", help="query_every settings to time ('' = skip)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}, "
          f"source {args.source}, repeats {args.repeats} x {args.steps} FTS steps", flush=True)
    compile_bench(args)
    if args.query_every:
        query_bench(args)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
