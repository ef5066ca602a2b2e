"""Run every benchmark workload in deqjax and its PyTorch peer; write JSON + Markdown.

    python -m benchmarks.run [--quick] [--gpu] [--threads N] [--out benchmarks/results] \
        [--only NAME ...]

Two kinds of rows: **equal work** (the same solver steps and attack iterations on both
sides, medians of alternating repetitions) and **time to result** (``ttr_*``, one run
per side, each framework doing the work its design allows: a trained model, an attack
result; see :mod:`benchmarks.workloads.time_to_result`).

Both frameworks run in the same process with the same number of CPU threads
(``--threads``, default 1), alternately, after warm-up (JAX's
trace+compile+first call is reported separately as ``compile_s``); medians of
wall-clock seconds and the ratio deqjax / torch (< 1: deqjax faster) are reported,
with the machine (CPU, cores, load average before and after, versions). The memory
workload runs one fresh subprocess per configuration (see
:mod:`benchmarks.workloads.memory`). ``--gpu`` places the torch models on CUDA and
reports the device name (JAX uses its default backend); it is never required. It does
not move the memory rows (host RSS, JAX on the CPU unless ``JAX_PLATFORMS`` says
otherwise) nor the torch side of the ``ttr_*`` rows, which stays on the CPU (one GPU run:
docs/benchmarks/gpu_run.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks.threads import configure_threads
from benchmarks.workloads import time_to_result as ttr  # numpy only: no jax at import

WORKLOADS = ("deq_train", "pgd", "apgd", "cpl_train", "restarts", "conv", "memory")
TIME_TO_RESULT = tuple(ttr.WORKLOADS)  # ttr_train, ttr_pgd, ttr_autoattack

NOTES = {
    "deq_train": "MDEQ batch {b}: Anderson m=5, 12 fwd evals (tol 0); IFT backward, fixed-point "
    "adjoint 12 steps (tol 0); Adam. torchdeq re-evaluates f twice around the solve "
    "(new_z=f(z*), f(h) in backward); deqjax linearises f once at z* for the adjoint "
    "iterations and the parameter VJP (the adjoint residual comes from the solver's "
    "own statistics).",
    "pgd": "PGD-10 L-inf eps .3 step .03 on the DEQ, batch {b}, implicit backward. deqjax does "
    "10 fwd+bwd and 1 forward (scores the final iterate for best-iterate selection), "
    "torchattacks 10 fwd+bwd.",
    "apgd": "APGD-CE 100 iters, L-inf eps .3, small conv net, batch {b}; both 101 fwd+bwd "
    "(labels = clean predictions so torchattacks attacks every example). The Flax net "
    "uses deqjax.models.FastConv (nn.Conv's parameters, forward-conv input gradient).",
    "cpl_train": "CPLNet 4 conv CPL (16ch, inner 32, 28x28) + sumpool 4 + 2 dense CPL (784), "
    "truncate, hinge 0.7, 1 power iteration/layer, Adam; batch {b}.",
    "conv": "The DEQ cell's conv_a alone: 3x3 stride 1 SAME, 32->64 channels, {b}x14x14, "
    "forward ({kernels})",
    "restarts": "PGD-10 on the DEQ, batch {b}: deqjax vmaps R restarts; torch loops "
    "torchattacks.PGD R times. Time per restart.",
}


def _devices(gpu: bool):
    from benchmarks import common

    return common.torch_device(gpu)


def run(quick: bool = False, gpu: bool = False, only=None, out: str = "benchmarks/results"):
    import torch

    from benchmarks import common
    from benchmarks.workloads import apgd, cpl, deq, kernels, memory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    malloc_fixed = common.steady_state_malloc()
    dev = _devices(gpu)
    reps = 3 if quick else 5
    sz = dict(
        deq=8 if quick else 64,
        apgd=16 if quick else 128,
        cpl=16 if quick else 128,
        restart=4 if quick else 8,
        mem=4 if quick else 16,
    )
    apgd_steps = 10 if quick else 100
    only = set(only or WORKLOADS + TIME_TO_RESULT)
    results = {
        "machine_before": common.machine(gpu),
        "quick": quick,
        "reps": reps,
        "malloc_thresholds_fixed": malloc_fixed,
        "workloads": {},
    }
    W = results["workloads"]
    t0 = time.time()
    # the conv row's kernels: XLA:CPU / XLA:GPU, torch's oneDNN (CPU) or cuDNN (CUDA)
    import jax

    conv_kernels = (
        f"XLA:{jax.default_backend().upper()} conv vs "
        f"torch/{'cuDNN' if dev.type == 'cuda' else 'oneDNN'}"
    )

    def record(name, batch, fns, reps=reps, **extra):
        print(f"[{time.time() - t0:6.1f}s] {name} ...", flush=True)
        r = common.alternate(*fns, reps)
        note = NOTES.get(name, "").format(b=batch, kernels=conv_kernels)
        r.update(batch=batch, note=note, **extra)
        W[name] = r
        print(
            f"    deqjax {r['deqjax_s']:.4f}s  torch {r.get('torch_s', float('nan')):.4f}s  "
            f"ratio {r.get('ratio', float('nan')):.2f}  (compile {r['compile_s']:.1f}s)",
            flush=True,
        )

    if "deq_train" in only:
        record("deq_train", sz["deq"], deq.train_step(sz["deq"], 12, dev))
    if "pgd" in only:
        record("pgd", sz["deq"], deq.pgd_attack(sz["deq"], 12, 1, dev), reps=max(3, reps - 2))
    if "apgd" in only:
        record(
            "apgd",
            sz["apgd"],
            apgd.workload(sz["apgd"], apgd_steps, dev),
            reps=max(3, reps - 2),
            steps=apgd_steps,
        )
    if "cpl_train" in only:
        record("cpl_train", sz["cpl"], cpl.workload(sz["cpl"], dev))
    if "restarts" in only:
        for r_ in (1, 10):
            record(
                f"restarts_{r_}",
                sz["restart"],
                deq.pgd_attack(sz["restart"], 12, r_, dev),
                reps=3,
                restarts=r_,
            )
            W[f"restarts_{r_}"]["note"] = NOTES["restarts"].format(b=sz["restart"])
            for k in ("deqjax_s", "torch_s"):
                W[f"restarts_{r_}"][k.replace("_s", "_per_restart_s")] = W[f"restarts_{r_}"][k] / r_
    if "conv" in only:
        flops = kernels.conv_flops(sz["deq"])
        record(
            "conv", sz["deq"], kernels.conv(sz["deq"], dev), reps=50
        )  # ms-scale calls: many reps
        gemm = common.alternate(kernels.gemm(sz["deq"]), None, 50)
        r = W["conv"]
        r["gflops"] = {
            "deqjax": flops / r["deqjax_s"] / 1e9,
            "torch": flops / r["torch_s"] / 1e9,
            "jax_gemm_same_flops": flops / gemm["deqjax_s"] / 1e9,
        }
        g = r["gflops"]
        r["note"] += (
            f"; GFLOP/s deqjax {g['deqjax']:.0f}, torch {g['torch']:.0f}; "
            f"a JAX matmul of the same FLOPs runs at {g['jax_gemm_same_flops']:.0f}."
        )
    if "memory" in only:
        mem = []
        for fw in ("deqjax", "torch"):
            for bw in ("implicit", "unroll"):
                for it in (10, 50):
                    print(f"[{time.time() - t0:6.1f}s] memory {fw} {bw} {it} ...", flush=True)
                    mem.append(memory.run_config(fw, bw, it, sz["mem"]))
                    print("    ", mem[-1], flush=True)
        W["memory"] = mem
    T = results["time_to_result"] = {}
    for name, fn in ttr.WORKLOADS.items():
        if name in only:
            print(f"[{time.time() - t0:6.1f}s] {name} ...", flush=True)
            T[name] = fn(**(ttr.QUICK[name] if quick else {}))
            print(f"    {T[name].get('rows')}", flush=True)
            write(results, out)  # a long run keeps what it has measured
    results["total_s"] = time.time() - t0
    results["machine_after"] = {"load_average_1_5_15": list(os.getloadavg())}
    write(results, out)
    return results


def markdown(res: dict) -> str:
    m = res["machine_before"]
    lines = [
        "# deqjax vs PyTorch benchmarks",
        "",
        f"Machine: {m.get('cpu')} ({m['cpu_count']} cores), {m['platform']}; "
        f"load average (1/5/15 min) before {m['load_average_1_5_15']}, after "
        f"{res.get('machine_after', {}).get('load_average_1_5_15')}; "
        "glibc malloc thresholds fixed: "
        f"{'yes' if res.get('malloc_thresholds_fixed') else 'no'} "
        "(see benchmarks.common.steady_state_malloc).",
        "",
        f"jax {m['jax']} ({m['jax_backend']}), flax {m['flax']}, optax {m['optax']}; "
        f"torch {m['torch']} ({m['torch_threads']} threads), torchdeq {m['torchdeq']}, "
        f"torchattacks {m['torchattacks']}"
        + (f"; GPU: {m.get('gpu')}" if "gpu" in m else "")
        + ".",
        "",
        f"Median wall-clock seconds over {res['reps']} alternating repetitions after warm-up "
        f"({'quick' if res['quick'] else 'full'} sizes). "
        "ratio = deqjax / torch (< 1: deqjax faster).",
        "",
        "| workload | batch | deqjax (s) | torch (s) | ratio | deqjax compile (s) | what runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["workloads"].items():
        if name == "memory":
            continue
        lines.append(
            f"| {name} | {r['batch']} | {r['deqjax_s']:.4f} "
            f"| {r.get('torch_s', float('nan')):.4f} | "
            f"{r.get('ratio', float('nan')):.2f} | {r['compile_s']:.1f} | {r['note']} |"
        )
    w = res["workloads"]
    if "restarts_1" in w and "restarts_10" in w:
        a, b = w["restarts_1"], w["restarts_10"]
        lines += [
            "",
            f"Restarts: per-restart time deqjax {a['deqjax_per_restart_s']:.4f} s (R=1) → "
            f"{b['deqjax_per_restart_s']:.4f} s (R=10, vmapped); "
            f"torch {a['torch_per_restart_s']:.4f} s → "
            f"{b['torch_per_restart_s']:.4f} s (looped).",
        ]
    if "memory" in w:
        lines += [
            "",
            "Memory of one DEQ forward+backward (fresh subprocess per row; MB above the "
            "pre-run RSS; XLA temp = compiled buffer plan):",
            "",
            "| framework | backward | iters | batch | peak RSS delta (MB) | XLA temp (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in w["memory"]:
            if "error" in r:
                lines.append(
                    f"| {r['framework']} | {r['backward']} | "
                    f"{r['iters']} | {r['batch']} | error | |"
                )
                continue
            xt = r.get("xla_temp_mb")
            lines.append(
                f"| {r['framework']} | {r['backward']} | {r['iters']} | {r['batch']} | "
                f"{r['peak_delta_mb']:.1f} | {'' if xt is None else f'{xt:.1f}'} |"
            )
    if res.get("time_to_result"):
        lines += [
            "",
            "## Time to result",
            "",
            "Each side at its best, one run each (benchmarks/workloads/time_to_result.py); "
            "deqjax's times include its compile time. speed-up = peer / deqjax "
            "(> 1: deqjax faster).",
            "",
            *ttr.markdown_rows(res["time_to_result"]),
        ]
    if "total_s" in res:
        lines += ["", f"Total benchmark time: {res['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def write(res: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(res))
    print(f"wrote {out}/results.json and {out}/results.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run, ~1-2 min)")
    p.add_argument("--gpu", action="store_true", help="torch on CUDA; report the GPU name")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--only",
        nargs="*",
        choices=WORKLOADS + TIME_TO_RESULT,
        help="run only these workloads (ttr_*: the time-to-result rows, ~25 min in all)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for BOTH frameworks (default 1: equal resources; on a "
        "shared, oversubscribed machine torch's OpenMP pool slows 10x+)",
    )
    a = p.parse_args(argv)
    if not a.gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    configure_threads(a.threads)
    run(a.quick, a.gpu, a.only, a.out)


if __name__ == "__main__":
    main()
