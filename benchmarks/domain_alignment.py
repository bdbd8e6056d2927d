"""How far a diffusion model can tell the restricted domain from the original, per timestep bucket.

For each model directory, and each timestep bucket of the audit (t1 = t = 1; low / mid / high =
the evaluation grid's timesteps in the first / second / last third of the schedule), on up to
`--n` training images of each domain with the same fixed noise:

- the ε-prediction MSE on original and on restricted images (equal values: at these t the model's
  input carries nothing that tells the domains apart);
- cos(g_o, g_r): cosine between the loss gradients (over all parameters) on original and on
  restricted images; a fine-tuning step on restricted data moves the model along g_r, so a high
  cosine means that step also improves the original domain, and a protection cannot make the
  one worse without the other;
- cos(g_o, g_o'): the same between two disjoint halves of the original images, the sampling
  floor that cos(g_o, g_r) is read against;
- |g_r| / |g_o|: relative gradient norms.

Usage:
    .venv/bin/python benchmarks/domain_alignment.py MODEL_DIR [MODEL_DIR ...] [--pipeline digits-diffusion] [--n 256]

Prints one table per model, then (last line of stdout) one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model directories (source, protected, ...)")
    ap.add_argument("--pipeline", default="digits-diffusion")
    ap.add_argument("--n", type=int, default=256, help="images per domain (and per original half)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sophon_ray import pipelines, tasks
    from sophon_ray.core.diffusion import eval_timesteps, noisy

    cfg = pipelines.load(args.pipeline)
    task = tasks.of(cfg)
    t = task.load_tensors()
    alphas = task.scheduler().alphas_cumprod
    n_t = len(alphas)
    grid = eval_timesteps(n_t, task.settings.eval_timesteps)
    buckets = {"t1": [1]}
    for k, name in enumerate(("low", "mid", "high")):
        buckets[name] = [s for s in grid if k * n_t <= 3 * s < (k + 1) * n_t]
    orig, restr = t.original_train[0], t.restricted_train[0]
    n = min(args.n, len(restr), len(orig) // 2)
    sets = {"o": orig[:n], "o2": orig[n : 2 * n], "r": restr[:n]}

    def loss_and_grad(model: torch.nn.Module, x: torch.Tensor, steps: list[int]) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        total = 0.0
        for j, step in enumerate(steps):
            eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(j))
            ts = torch.full((len(x),), step, dtype=torch.long)
            out = model(noisy(x, eps, ts, alphas), ts)
            loss = ((out.sample if hasattr(out, "sample") else out) - eps).pow(2).mean() / len(steps)
            loss.backward()
            total += float(loss.detach())
        return total, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    cos = torch.nn.functional.cosine_similarity
    report = {}
    for path in args.models:
        model = task.load_for(path, t)[0].train()
        rows = {}
        for name, steps in buckets.items():
            res = {k: loss_and_grad(model, x, steps) for k, x in sets.items()}
            rows[name] = {"mse_original": res["o"][0], "mse_restricted": res["r"][0],
                          "cos_orig_restr": float(cos(res["o"][1], res["r"][1], dim=0)),
                          "cos_orig_orig": float(cos(res["o"][1], res["o2"][1], dim=0)),
                          "norm_ratio": float(res["r"][1].norm() / res["o"][1].norm())}
        report[path] = rows
        print(f"{path} ({args.pipeline}, {n} images per domain)")
        print("| bucket | timesteps | MSE original | MSE restricted | cos(g_o, g_r) | cos(g_o, g_o') | |g_r| / |g_o| |")
        print("|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {buckets[name][0]}-{buckets[name][-1]} | {r['mse_original']:.4f} | {r['mse_restricted']:.4f} "
                  f"| {r['cos_orig_restr']:.3f} | {r['cos_orig_orig']:.3f} | {r['norm_ratio']:.2f} |")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
