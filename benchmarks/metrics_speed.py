"""Speed of layerwatch.metrics against a straightforward per-prompt, per-layer loop implementation.

The probe is shaped like GPT-2 small: 13 hidden states (embeddings + 12 blocks), 64 prompts of 128 tokens,
D = 768, 2 augmented views. Four tables: full-length prompts (every prompt 128 tokens, as when a probe is
built from long texts) and ragged ones (lengths uniform in [16, 128], right padding, NaN in padded slots),
each with float32 hidden states (reduced with float32 products) and float64 ones. The "naive" column
implements the same formulas the way the papers' reference code does: torch float64, one ``eigvalsh`` per
prompt per layer, a Python loop over tokens for curvature (structured like the authors'
``compute_curvature``), D x D outer-product accumulation and a D x D ``eigh`` for LiDAR (like their
``compute_LDA_matrix``), one ``eigvalsh`` per DiME permutation, scipy per layer for the bimodality
coefficient. Both implementations get the same inputs in the same run, and their results are checked
against each other (float32: 1e-4 relative, float64: 1e-6).

Usage::

    python benchmarks/metrics_speed.py                       # all four tables, a few minutes on 2 CPU cores
    python benchmarks/metrics_speed.py --tables full32,ragged32
    python benchmarks/metrics_speed.py --threads 1           # single-threaded torch
    python benchmarks/metrics_speed.py --quick               # a smaller probe, for a smoke test

Each fast metric is timed ``--repeats`` times (after a warm-up call), each naive one up to
``--naive-repeats`` times, alternating between the two; the tables show medians. "one by one" sums the
public functions called separately; "full suite" is what the monitor computes per probe for the "standard"
preset: ``token_metrics`` on the clean batch (which also mean-pools it), ``mean_pool`` of both views, and the
set-level metrics. The last lines check the targets of issue 12 on float32 prompts (one by one >= 12x on
full-length prompts; full suite >= 15x full-length and >= 25x ragged). Run it on an otherwise idle machine:
with more busy threads than cores, multi-threaded torch ops slow down a lot.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.stats
import torch

from layerwatch import metrics
from layerwatch.metrics import sets as metrics_sets

RTOL = 1e-12
ZERO_ROW_RTOL = 1e-10


# ----------------------------------------------------------------------------------------------------
# naive reference implementation (loops, like the authors' code, but with the same formulas)
# ----------------------------------------------------------------------------------------------------


def naive_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(0)
    centered = x - mean
    norms = centered.norm(dim=1)
    scale = max(float(mean.norm()), float(norms.max()))
    keep = norms > ZERO_ROW_RTOL * scale
    return torch.where(keep[:, None], centered / torch.where(keep, norms, 1.0)[:, None], 0.0)


def naive_entropy_from_eigenvalues(lam: torch.Tensor, alpha: float = 1.0) -> float:
    top = float(lam.max())
    if not top > 0:
        return math.nan
    lam = lam[lam > RTOL * top]
    p = lam / lam.sum()
    if alpha == 1.0:
        return float(-(p * torch.log(p)).sum())
    return float(torch.log((p**alpha).sum()) / (1 - alpha))


def naive_matrix_entropy(z: torch.Tensor) -> float:
    n, d = z.shape
    gram = z @ z.T if n <= d else z.T @ z
    return naive_entropy_from_eigenvalues(torch.linalg.eigvalsh(gram))


def naive_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    layers, prompts, _, d = hidden.shape
    out = torch.empty(layers, prompts, d, dtype=torch.float64)
    for layer in range(layers):
        for prompt in range(prompts):
            out[layer, prompt] = hidden[layer, prompt][mask[prompt]].double().mean(0)
    return out


def naive_prompt_entropy(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    layers, prompts, _, d = hidden.shape
    out = torch.full((layers, prompts), math.nan, dtype=torch.float64)
    for layer in range(layers):
        for prompt in range(prompts):
            x = hidden[layer, prompt][mask[prompt]].double()
            n = x.shape[0]
            if n >= 2:
                out[layer, prompt] = naive_matrix_entropy(naive_normalize(x)) / math.log(min(n, d))
    return out


def naive_curvature(hidden: torch.Tensor, mask: torch.Tensor, both: bool = False):
    """Per layer, per prompt, per token, structured like the authors' ``compute_curvature``.

    Differences from their code are the formula fixes of SPEC §1 only: signed angle (plus the absolute
    one when ``both``), zero-length differences skipped instead of counted as 0, NaN below 3 tokens.
    """
    layers, prompts = hidden.shape[:2]
    signed = torch.full((layers, prompts), math.nan, dtype=torch.float64)
    folded = signed.clone()

    def paired_curvature(a, b):
        dotproduct = a.T @ b
        norm_a = torch.norm(a)
        norm_b = torch.norm(b)
        if norm_a**2 <= 1e-10 or norm_b**2 <= 1e-10:
            return None
        argument = torch.clamp(dotproduct / (norm_a * norm_b), min=-1, max=1)
        curvature = torch.arccos(argument).item()
        return curvature, (torch.arccos(argument.abs()).item() if both else None)

    for layer in range(layers):
        for prompt in range(prompts):
            layer_p = naive_normalize(hidden[layer, prompt][mask[prompt]].double())
            angles, abs_angles = [], []
            for k in range(1, layer_p.shape[0] - 1):
                v_k = layer_p[k].unsqueeze(1) - layer_p[k - 1].unsqueeze(1)
                v_kplusone = layer_p[k + 1].unsqueeze(1) - layer_p[k].unsqueeze(1)
                pair = paired_curvature(v_kplusone, v_k)
                if pair is not None:
                    angles.append(pair[0])
                    abs_angles.append(pair[1])
            if angles:
                signed[layer, prompt] = sum(angles) / len(angles)
                if both:
                    folded[layer, prompt] = sum(abs_angles) / len(abs_angles)
    return (signed, folded) if both else signed


def naive_dataset_entropy(pooled: torch.Tensor) -> torch.Tensor:
    m, d = pooled.shape[-2:]
    return torch.tensor([naive_matrix_entropy(naive_normalize(p.double())) / math.log(min(m, d)) for p in pooled])


def naive_effective_rank(pooled: torch.Tensor) -> torch.Tensor:
    out = []
    for p in pooled:
        sigma = torch.linalg.svdvals(naive_normalize(p.double()))
        sigma = sigma[sigma**2 > RTOL * sigma.max() ** 2]
        q = sigma / sigma.sum()
        out.append(float(torch.exp(-(q * torch.log(q)).sum())))
    return torch.tensor(out, dtype=torch.float64)


def naive_infonce(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    out = []
    for a, b in zip(view_a, view_b):
        a, b = naive_normalize(a.double()), naive_normalize(b.double())
        logits = a @ b.T / temperature
        out.append(float(torch.nn.functional.cross_entropy(logits, torch.arange(len(a)))))
    return torch.tensor(out, dtype=torch.float64)


def naive_lidar(views: torch.Tensor, delta: float = 1e-4) -> torch.Tensor:
    layers, m, q, d = views.shape
    out = []
    for layer in range(layers):
        z = naive_normalize(views[layer].reshape(m * q, d).double()).reshape(m, q, d)
        class_means = z.mean(1)
        grand = class_means.mean(0)
        sigma_b = torch.zeros(d, d, dtype=torch.float64)
        for i in range(m):
            sigma_b += torch.outer(class_means[i] - grand, class_means[i] - grand)
        sigma_b /= m
        sigma_w = torch.zeros(d, d, dtype=torch.float64)
        for i in range(m):
            for j in range(q):
                sigma_w += torch.outer(z[i, j] - class_means[i], z[i, j] - class_means[i])
        sigma_w = sigma_w / (m * q) + delta * torch.eye(d, dtype=torch.float64)
        w_eig, w_vec = torch.linalg.eigh(sigma_w)
        inv_sqrt = w_vec @ torch.diag(w_eig**-0.5) @ w_vec.T
        lda = inv_sqrt @ sigma_b @ inv_sqrt
        out.append(naive_entropy_from_eigenvalues(torch.linalg.eigvalsh(lda)))
    return torch.tensor(out, dtype=torch.float64)


def naive_dime(view_a: torch.Tensor, view_b: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    out = []
    for a, b in zip(view_a, view_b):
        a, b = naive_normalize(a.double()), naive_normalize(b.double())
        ka, kb = a @ a.T, b @ b.T

        def joint(k):
            h = ka * k
            return naive_entropy_from_eigenvalues(torch.linalg.eigvalsh(h / torch.trace(h)))

        permuted = [joint(kb[p][:, p]) for p in perms]
        out.append(sum(permuted) / len(permuted) - joint(kb))
    return torch.tensor(out, dtype=torch.float64)


def naive_bimodality(values: torch.Tensor) -> torch.Tensor:
    out = []
    for row in values.double().numpy():
        row = row[np.isfinite(row)]
        n = len(row)
        g, k = scipy.stats.skew(row, bias=False), scipy.stats.kurtosis(row, bias=False)
        out.append((g * g + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# probe-shaped synthetic inputs
# ----------------------------------------------------------------------------------------------------


def synthetic_hidden(layers, prompts, tokens, d, seed, ragged=True):
    """Hidden states with a common offset, a few large dimensions and low-rank token structure.

    ``ragged``: prompt lengths uniform in [tokens / 8, tokens] (right padding, NaN in padded slots); otherwise
    every prompt has ``tokens`` tokens (the mask is all True, as the monitor passes it)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(tokens // 8, tokens + 1, (prompts,), generator=gen)
    lengths[0] = tokens
    if not ragged:
        lengths[:] = tokens
    mask = torch.arange(tokens)[None, :] < lengths[:, None]  # right padding (GPT-2 tokenizer default)
    hidden = torch.empty(layers, prompts, tokens, d)
    for layer in range(layers):  # data generation only
        basis = torch.randn(32, d, generator=gen)
        offset = 3 * torch.randn(d, generator=gen)
        offset[:3] *= 30  # a few "massive" dimensions
        coeff = torch.randn(prompts, tokens, 32, generator=gen) * torch.logspace(0, -1.5, 32)
        hidden[layer] = coeff @ basis + offset + 0.3 * torch.randn(prompts, tokens, d, generator=gen)
    hidden[:, ~mask] = torch.tensor(float("nan"))  # garbage in padded slots
    return hidden, mask


def timed_pair(
    fast_fn: Callable[[], object], naive_fn: Callable[[], object], repeats: int, naive_repeats: int, budget_s: float
) -> tuple[float, object, float, object]:
    """Median wall times (and last results) of ``repeats`` fast and up to ``naive_repeats`` naive calls.

    The calls alternate (fast, naive, fast, naive, ..., then the remaining fast ones), so that both sides see
    the same machine: on a shared host, slow spells come and go within seconds. Naive calls stop once
    ``budget_s`` is spent (at least one is made).
    """
    fast_times, naive_times, fast_result, naive_result = [], [], None, None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fast_result = fast_fn()
        fast_times.append(time.perf_counter() - start)
        if len(naive_times) < naive_repeats and (not naive_times or sum(naive_times) <= budget_s):
            start = time.perf_counter()
            naive_result = naive_fn()
            naive_times.append(time.perf_counter() - start)
    return statistics.median(fast_times), fast_result, statistics.median(naive_times), naive_result


def max_rel_error(fast, naive) -> float:
    fast, naive = torch.as_tensor(fast).double(), torch.as_tensor(naive).double()
    both = torch.isfinite(fast) & torch.isfinite(naive)
    if not torch.equal(torch.isfinite(fast), torch.isfinite(naive)):
        return math.inf
    if not both.any():
        return 0.0
    err = (fast[both] - naive[both]).abs() / naive[both].abs().clamp(min=1e-2)
    return float(err.max())


# the public functions called one by one, and what the monitor computes per probe (token_metrics fused)
ONE_BY_ONE = ["mean_pool (2 views)", "prompt_entropy", "curvature", "dataset_entropy", "effective_rank", "infonce"]
ONE_BY_ONE += ["lidar", "dime", "bimodality"]
SUITE = ["mean_pool (2 views)", "token_metrics (fused)", "dataset_entropy", "effective_rank", "infonce", "lidar"]
SUITE += ["dime", "bimodality"]
TABLES = {"full32": (False, torch.float32), "ragged32": (True, torch.float32)}
TABLES.update({"full64": (False, torch.float64), "ragged64": (True, torch.float64)})
#: agreement with the naive float64 loop: float32 states are reduced with float32 products
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
#: speed-up targets of issue 12, on full-length (False) and ragged (True) float32 prompts
TARGETS = {(False, "one by one"): 12.0, (False, "full suite"): 15.0, (True, "full suite"): 25.0}


def cases(args, ragged: bool, dtype: torch.dtype):
    """(name, fast call, naive call) for every metric, on a probe of ``args``' shape."""
    L, B, T, D = args.layers, args.prompts, args.tokens, args.hidden
    hidden, mask = synthetic_hidden(L, B, T, D, seed=0, ragged=ragged)
    view_hidden = [synthetic_hidden(L, B, T, D, seed=s, ragged=ragged) for s in (1, 2)]
    # views of the same prompts: the clean states plus view-specific states (so views share structure)
    view_hidden = [(0.7 * torch.nan_to_num(hidden) + 0.3 * torch.nan_to_num(h), m & mask) for h, m in view_hidden]
    hidden = hidden.to(dtype)
    view_hidden = [(h.to(dtype), m) for h, m in view_hidden]
    pooled = metrics.mean_pool(hidden, mask)
    pooled_views = [metrics.mean_pool(h, m) for h, m in view_hidden]
    views = torch.stack(pooled_views, dim=-2)  # [L, M, 2, D]
    perms = metrics_sets._dime_permutations(B, 10, torch.Generator().manual_seed(0))
    entropy_fast = metrics.prompt_entropy(hidden, mask)
    valid = mask.sum(1)
    print(f"  {'ragged' if ragged else 'full-length'} prompts ({int(valid.min())}-{int(valid.max())} tokens), {dtype}")
    return [
        ("mean_pool (2 views)", lambda: [metrics.mean_pool(h, m) for h, m in view_hidden],
         lambda: [naive_mean_pool(h, m) for h, m in view_hidden]),
        ("prompt_entropy", lambda: metrics.prompt_entropy(hidden, mask), lambda: naive_prompt_entropy(hidden, mask)),
        ("curvature", lambda: metrics.curvature(hidden, mask), lambda: naive_curvature(hidden, mask)),
        ("dataset_entropy", lambda: metrics.dataset_entropy(pooled), lambda: naive_dataset_entropy(pooled)),
        ("effective_rank", lambda: metrics.effective_rank(pooled), lambda: naive_effective_rank(pooled)),
        ("infonce", lambda: metrics.infonce(*pooled_views), lambda: naive_infonce(*pooled_views)),
        ("lidar", lambda: metrics.lidar(views), lambda: naive_lidar(views)),
        ("dime", lambda: metrics.dime(*pooled_views, generator=torch.Generator().manual_seed(0)),
         lambda: naive_dime(*pooled_views, perms)),
        ("bimodality", lambda: metrics.bimodality(entropy_fast), lambda: naive_bimodality(entropy_fast)),
        ("token_metrics (fused)", lambda: metrics.token_metrics(hidden, mask), lambda: {
            "mean_pool": naive_mean_pool(hidden, mask),
            "prompt_entropy": naive_prompt_entropy(hidden, mask),
            **dict(zip(("curvature", "curvature_abs"), naive_curvature(hidden, mask, both=True))),
        }),
    ]


def measure_table(args, ragged: bool, dtype: torch.dtype) -> dict[str, tuple[float, float, float]]:
    """``{metric: (fast seconds, naive seconds, max relative difference)}``, fast and naive calls interleaved."""
    rows = {}
    for name, fast_fn, naive_fn in cases(args, ragged, dtype):
        fast_fn()  # warm-up
        fast_time, fast_result, naive_time, naive_result = timed_pair(
            fast_fn, naive_fn, args.repeats, args.naive_repeats, budget_s=6.0
        )
        if isinstance(fast_result, dict):
            error = max(max_rel_error(fast_result[k], naive_result[k]) for k in naive_result)
        elif isinstance(fast_result, list):
            error = max(max_rel_error(f, n) for f, n in zip(fast_result, naive_result))
        else:
            error = max_rel_error(fast_result, naive_result)
        rows[name] = (fast_time, naive_time, error)
    return rows


def print_table(rows, ragged: bool, dtype: torch.dtype) -> list[tuple[str, float, float]]:
    """Print one table; return its (name, ratio, target) checks."""
    header = f"{'metric':<24}{'layerwatch [s]':>16}{'naive loop [s]':>16}{'speed-up':>11}{'max rel. diff':>15}"
    print(header)
    print("-" * len(header))
    for name, (fast_time, naive_time, error) in rows.items():
        print(f"{name:<24}{fast_time:>16.4f}{naive_time:>16.3f}{naive_time / fast_time:>10.1f}x{error:>15.1e}")
    print("-" * len(header))
    checks = []
    for total, names in (("one by one", ONE_BY_ONE), ("full suite", SUITE)):
        fast = sum(rows[n][0] for n in names)
        naive = sum(rows[n][1] for n in names)
        worst = max(rows[n][2] for n in names)
        print(f"{total:<24}{fast:>16.4f}{naive:>16.3f}{naive / fast:>10.1f}x{worst:>15.1e}")
        goal = TARGETS.get((ragged, total)) if dtype == torch.float32 else None
        if goal:
            checks.append((f"{'ragged' if ragged else 'full-length'} float32 {total}", naive / fast, goal))
    worst = max(error for _, _, error in rows.values())
    ok = worst < TOLERANCE[dtype]
    print(f"agreement with the float64 loop (max relative difference < {TOLERANCE[dtype]:.0e}): {'OK' if ok else 'FAILED'}")
    if not ok:
        checks.append(("agreement", 0.0, 1.0))
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5, help="timings per fast metric (median)")
    parser.add_argument(
        "--naive-repeats", type=int, default=3, help="timings per naive metric (median; fewer once 6 s are spent)"
    )
    parser.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, from {', '.join(TABLES)}")
    parser.add_argument("--quick", action="store_true", help="small probe: 4 layers, 16 prompts, 64 tokens, D=256")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this benchmark")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.prompts, args.tokens, args.hidden = 4, 16, 64, 256
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        parser.error(f"unknown table(s) {unknown}; choose from {', '.join(TABLES)}")

    print(
        f"probe: {args.layers} layers x {args.prompts} prompts x {args.tokens} tokens, D={args.hidden}, 2 views; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  one by one = {', '.join(ONE_BY_ONE)}")
    print(f"  full suite (what the monitor computes per probe) = {', '.join(SUITE)}")
    checks = []
    for table in tables:
        ragged, dtype = TABLES[table]
        print()
        rows = measure_table(args, ragged, dtype)
        checks += print_table(rows, ragged, dtype)
    print()
    for name, ratio, goal in checks:
        print(f"target {name}: {ratio:.1f}x (>= {goal:.0f}x: {'met' if ratio >= goal else 'MISSED'})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0 if all(name != "agreement" for name, _, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
