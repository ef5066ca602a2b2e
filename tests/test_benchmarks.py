"""Equal-work checks of the benchmark peers (skipped without the ``bench`` extra;
under ``CI=true`` its absence fails).

Each workload's PyTorch peer must compute the same thing as deqjax from the same
weights, or the timing comparison is meaningless. Timings are never asserted.
"""

import numpy as np
import pytest

from tests.helpers import import_or_skip

torch = import_or_skip("torch")  # under CI=true a missing peer fails instead
import_or_skip("torchdeq")
import_or_skip("torchattacks")

from benchmarks.workloads import apgd, cpl, deq, kernels, memory  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """torch's OpenMP pool is very slow on an oversubscribed shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_deq_train_same_loss_and_gradients():
    """Converged solves (contractive weights, 30 Anderson / adjoint steps) give the same
    loss and the same IFT parameter gradients in deqjax and torchdeq."""
    lj, gj, lt, tm = deq.loss_and_grads(batch=2, iters=30)
    assert abs(lj - lt) < 1e-5 * max(1.0, abs(lt))
    p = gj["params"]
    pairs = [
        (np.asarray(p["head"]["dense"]["kernel"]).T, tm.dense.weight.grad),
        (
            np.transpose(p["equilibrium"]["cell"]["conv_a"]["kernel"], (3, 2, 0, 1)),
            tm.cell.conv_a.weight.grad,
        ),
        (
            np.transpose(p["equilibrium"]["cell"]["conv_b"]["kernel"], (3, 2, 0, 1)),
            tm.cell.conv_b.weight.grad,
        ),
        (np.transpose(p["injection"]["conv"]["kernel"], (3, 2, 0, 1)), tm.inj.weight.grad),
    ]
    for a, b in pairs:
        assert _rel(a, b.numpy()) < 1e-3


def test_deq_input_gradient_matches_torchdeq():
    """The gradient PGD uses (∂CE/∂x through the implicit backward) agrees."""
    gj, gt = deq.input_gradients(batch=2, iters=30)
    assert _rel(gj, gt) < 1e-3


def test_deq_workloads_run_once():
    jf, tf = deq.train_step(batch=2, iters=2)
    assert np.isfinite(float(jf())) and np.isfinite(tf())
    jf, tf = deq.pgd_attack(batch=2, iters=2, restarts=2)
    assert jf().shape == (2, 28, 28, 1) and np.isfinite(tf())


def test_conv_kernel_workload_is_the_same_convolution():
    jf, tf = kernels.conv(batch=2)
    ours, theirs = np.asarray(jf()), tf().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert kernels.gemm(batch=2)().shape == (2 * 14 * 14, 64)


def test_apgd_peer_same_network_and_valid_attacks():
    r = apgd.check(batch=4, steps=3)
    assert _rel(*r["logits"]) < 1e-5
    assert _rel(*r["grad"]) < 1e-4
    for adv in r["adv"]:
        assert np.abs(adv - r["x"]).max() <= 0.3 + 1e-6
        assert adv.min() >= 0.0 and adv.max() <= 1.0


def test_cpl_step_same_loss_and_gradients():
    """Same weights and power-iteration vectors: same hinge loss and gradients,
    including the σ = ‖W u‖ term of the power iteration."""
    lj, lt, pairs = cpl.check(batch=2)
    assert abs(lj - lt) < 1e-5
    for name, (a, b) in pairs.items():
        assert _rel(a, b) < 1e-4, name


def test_memory_probe_sees_an_allocation():
    """The RSS sampler reports a 64 MB array allocated while it runs."""
    mb = memory._peak_during(lambda: np.ones(16 * 2**20, np.float32).sum()) / 2**20
    assert 48 < mb < 200


# --- time-to-result rows ------------------------------------------------------------
def test_time_to_result_workloads_are_listed_for_the_cli():
    from benchmarks import run
    from benchmarks.workloads import time_to_result as ttr

    assert set(run.TIME_TO_RESULT) == set(ttr.WORKLOADS) == set(ttr.QUICK)


def test_torch_learning_rate_schedule_is_optax_s():
    """The torch side of the training row follows build_optimizer's schedule."""
    import optax

    from benchmarks.workloads import time_to_result as ttr
    from experiments.configs import deq_mnist

    t = deq_mnist.get_config().train
    total = 186
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=t.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ttr._torch_schedule(t, total))
    ref = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, total)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(got, [float(ref(i)) for i in range(total)], rtol=1e-5, atol=1e-9)
    assert max(got) == pytest.approx(t.learning_rate)


def test_torch_pgd_loop_is_a_valid_attack():
    """The torch PGD of the time-to-result row stays in the ε-ball and [0, 1] and
    raises the loss; its sum and mean losses give the same points on a network without
    a solver (the sign step is scale-free; only a scale-dependent adjoint breaks that)."""
    from benchmarks.torch_models import TorchConvNet
    from benchmarks.workloads import time_to_result as ttr

    torch.manual_seed(0)
    net = TorchConvNet().eval()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 28, 28, 1)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x).permute(0, 3, 1, 2)).argmax(1).numpy().astype(np.int32)
    kw = dict(eps=0.1, steps=5, alpha=0.025, batch=4)
    adv = ttr.torch_pgd(net, x, y, **kw)
    assert np.abs(adv - x).max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    ce = lambda a: torch.nn.functional.cross_entropy(
        net(torch.from_numpy(a).permute(0, 3, 1, 2)), torch.from_numpy(y).long()
    ).item()
    assert ce(adv) > ce(x) + 1e-3
    np.testing.assert_array_equal(adv, ttr.torch_pgd(net, x, y, reduction="mean", **kw))


@pytest.mark.e2e
def test_train_to_accuracy_tiny_run():
    """Both sides of the training row train from the same start and report a trace."""
    from benchmarks.workloads import time_to_result as ttr

    r = ttr.train_to_accuracy(
        target=0.0,
        eval_every=2,
        epochs=1,
        limit_train=128,
        limit_test=50,
        overrides={"deq.max_iter": 3, "deq.eval_max_iter": 3, "deq.adjoint_max_iter": 3},
    )
    for row in r["rows"].values():
        assert row["steps_to_target"] == 2 and row["time_to_target_s"] > 0
        assert 0.0 <= row["trace"][0]["test_accuracy"] <= 1.0


def test_adjoint_solver_benchmark_tiny_run(tmp_path):
    """Every method runs, the direct solves reach the tolerance (n = 8, batch 2) and the
    page renders."""
    import argparse
    import json

    from benchmarks import adjoint_solvers

    a = argparse.Namespace(sizes="8", batch=2, rho=0.9, reps=1, threads=1, out=str(tmp_path))
    adjoint_solvers.run(a, ["--sizes", "8"])  # (threads: the test process's)
    res = json.loads((tmp_path / "adjoint_solvers.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(adjoint_solvers.methods())
    for name in ("dense LU (deqjax, jnp.linalg.solve)", "dense LU (lineax)"):
        assert rows[name]["max_rel_residual"] < 1e-4, rows[name]
    assert all(r["ms"] > 0 for r in rows.values())
    assert "| dense LU (lineax) |" in adjoint_solvers.markdown(res)
