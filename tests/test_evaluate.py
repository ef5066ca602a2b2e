"""The robustness report: files, worst case over attacks and gradient views, flags."""

import json
import os

import numpy as np
import pytest

from experiments import evaluate as evaluate_lib
from experiments import report as report_lib
from experiments import train as train_lib
from experiments.workdir import load_run
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def trained_tiny_deq(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tiny_deq"))
    c = tiny_config(epochs=1)
    c.robustness.update(
        n_examples=24,
        n_iter=2,
        n_queries=10,
        batch_size=24,
        eps="0.05,0.2",
        state_indices="1",
        gradients="implicit,intermediate,ensemble",
        attacks="pgd,square",
    )
    train_lib.train(c, workdir)
    return workdir


def test_report_files_and_worst_case(trained_tiny_deq):
    report = evaluate_lib.evaluate(trained_tiny_deq, quiet=True)
    for name in ("report.json", "report.md", "robustness.png"):
        assert os.path.getsize(os.path.join(trained_tiny_deq, name)) > 0
    on_disk = json.load(open(os.path.join(trained_tiny_deq, "report.json")))
    assert on_disk["clean_accuracy"] == report["clean_accuracy"]
    views = set(report["views"])
    assert views == {"implicit", "intermediate_z1", "ensemble"}
    for eps in ("0.05", "0.2"):
        per = report["robust_accuracy"][eps]
        assert "square" in per and "pgd/intermediate_z1" in per
        # the worst case is below every single attack/view and the clean accuracy
        assert report["worst_case"][eps] <= min(per.values()) + 1e-12
        assert report["worst_case"][eps] <= report["clean_accuracy"]
    assert set(report["sanity"]["flags"]) >= {
        "gradient_free_beats_gradient",
        "zero_gradients",
        "accuracy_rises_with_eps",
        "nonfinite_logits",
    }
    assert 0 < report["solver"]["mean_steps"] <= 8
    assert "worst case" in open(os.path.join(trained_tiny_deq, "report.md")).read()


def test_report_overrides_and_bad_options(trained_tiny_deq):
    report = evaluate_lib.evaluate(
        trained_tiny_deq,
        {"eps": "0.1", "gradients": "phantom", "attacks": "fgsm", "norm": "l2"},
        quiet=True,
    )
    assert report["eps"] == [0.1] and report["views"] == ["phantom"] and report["norm"] == "l2"
    with pytest.raises(ValueError, match="unknown robustness option"):
        evaluate_lib.evaluate(trained_tiny_deq, {"epsilon": "0.1"}, quiet=True)
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate_lib.evaluate(trained_tiny_deq, {"attacks": "cw"}, quiet=True)
    with pytest.raises(ValueError, match="eps"):
        evaluate_lib.evaluate(trained_tiny_deq, {"eps": "-0.1"}, quiet=True)


def test_forward_not_converged_flag_and_its_threshold(trained_tiny_deq, tmp_path):
    """The flag is raised below 90% converged forward solves (``min_converged``) and
    not at or above it; a DEQ report carries it from its solver statistics: with an
    evaluation budget of 1 step no solve converges, and the report says so and is
    marked unreliable; with a loose tolerance (0.5) they converge and the flag is down."""
    import shutil

    from deqjax.attacks import sanity_flags

    for frac, flagged in ((0.0, True), (0.89, True), (0.8999, True), (0.9, False), (1.0, False)):
        r = sanity_flags(converged_fraction=frac)
        assert r.flags == {"forward_not_converged": flagged}, frac
        assert ("(< 90%)" in r.explanations["forward_not_converged"]) == flagged
    assert sanity_flags(converged_fraction=0.93, min_converged=0.95).flags == {
        "forward_not_converged": True
    }
    assert not sanity_flags(converged_fraction=0.5, min_converged=0.4).flags[
        "forward_not_converged"
    ]
    cheap = {"attacks": "fgsm", "gradients": "implicit", "eps": "0.1", "n_examples": "24"}
    fractions = {}
    for name, deq in (("budget1", {"eval_max_iter": 1}), ("loose", {"tol": 0.5})):
        workdir = tmp_path / name
        shutil.copytree(trained_tiny_deq, workdir)
        config = json.loads((workdir / "config.json").read_text())
        config["deq"].update(deq)
        (workdir / "config.json").write_text(json.dumps(config))
        report = evaluate_lib.evaluate(str(workdir), cheap, quiet=True)
        frac = report["solver"]["converged_fraction"]
        fractions[name] = frac
        assert report["sanity"]["flags"]["forward_not_converged"] == (frac < 0.9), frac
        if frac < 0.9:
            assert report["sanity"]["unreliable"]
            assert "`forward_not_converged`: True" in (workdir / "report.md").read_text()
    assert fractions["budget1"] == 0.0 and fractions["loose"] >= 0.9, fractions  # both sides


def test_missing_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiments.train"):
        evaluate_lib.evaluate(str(tmp_path), quiet=True)


def test_obfuscation_sweep(trained_tiny_deq):
    from experiments.obfuscation import obfuscation_sweep

    out = obfuscation_sweep(
        trained_tiny_deq,
        eps="0.2",
        state_indices="1,99",
        attack_steps="2",
        attack_damping="0.5",
        eval_max_iter="3",
        n_examples=12,
        n_iter=2,
        batch_size=12,
        quiet=True,
    )
    assert set(out["budgets"]) == {"3"}
    for budget, b in out["budgets"].items():
        acc = b["robust_accuracy"]["0.2"]
        # whole-path views, and z_i clipped to the budget, for every K_a
        assert {"implicit", "phantom", "unroll", "ensemble", "simultaneous_adjoint"} <= set(acc)
        assert {"z1_K2_lam0.5", f"z{int(budget) - 1}_K2_lam0.5"} <= set(acc)
        gap = b["gap"]["0.2"]
        assert gap["naive"] == acc["implicit"]
        assert gap["strongest_intermediate_accuracy"] == min(
            v for k, v in acc.items() if k.startswith("z")
        )
        assert all(0.0 <= v <= b["clean_accuracy"] + 1e-12 for v in acc.values())
    text = open(os.path.join(trained_tiny_deq, "obfuscation.md")).read()
    assert "naive − strongest z_i" in text and "Evaluation solve: 3 steps" in text


def test_import_params_round_trip_and_mismatch(trained_tiny_deq, tmp_path):
    """Saved params become a workdir that evaluate can load, bit for bit; params of a
    different architecture are refused with a message naming the difference."""
    import flax.serialization
    import jax

    from experiments import import_params as import_lib

    config, _, state, _, _ = load_run(trained_tiny_deq)
    path = str(tmp_path / "params.msgpack")
    with open(path, "wb") as fh:
        fh.write(flax.serialization.msgpack_serialize(jax.device_get(state.params)))
    workdir = str(tmp_path / "imported")
    import_lib.import_params(config, path, workdir)
    imported = load_run(workdir).state
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(imported.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wider = tiny_config(epochs=1)
    wider.model.width = 2 * config.model.width
    with pytest.raises(ValueError, match="does not fit the model of this config: parameter"):
        import_lib.import_params(wider, path, str(tmp_path / "bad"))


def test_markdown_says_whose_solver_statistics_these_are():
    """On an entropy-defended model the reported solver statistics are the undefended
    forward's, and the report says so."""
    report = {
        "clean_accuracy": 0.9,
        "n_examples": 10,
        "norm": "linf",
        "eps": [0.1],
        "robust_accuracy": {"0.1": {"pgd/bpda_implicit": 0.5}},
        "worst_case": {"0.1": 0.5},
        "sanity": {"flags": {}, "explanations": {}},
        "solver": {"mean_steps": 12.0},
    }
    assert "- solver `mean_steps`: 12" in report_lib.markdown(report)
    report["solver_scope"] = (
        "undefended forward; the entropy defence re-solves in 3 rounds of 8 steps"
    )
    text = report_lib.markdown(report)
    assert (
        "- solver (undefended forward; the entropy defence "
        "re-solves in 3 rounds of 8 steps) `mean_steps`: 12" in text
    )


def test_convergence_per_budget(trained_tiny_deq):
    """The evaluation forward's statistics per budget over the whole test split: steps
    never exceed the budget, a larger budget never converges less, and the config's own
    budget reproduces final.json's non-converged fraction."""
    from experiments.convergence import convergence

    out = convergence(trained_tiny_deq, "1,8,30", batch_size=50)
    b = out["budgets"]
    assert out["n_examples"] == 100 and set(b) == {"1", "8", "30"}
    for k, s in b.items():
        assert 1 <= s["mean_steps"] <= int(k)
    assert b["1"]["converged_fraction"] <= b["8"]["converged_fraction"]
    assert b["8"]["converged_fraction"] <= b["30"]["converged_fraction"]
    assert b["30"]["mean_rel_residual"] < b["1"]["mean_rel_residual"]
    final = json.load(open(os.path.join(trained_tiny_deq, "final.json")))  # budget 8
    np.testing.assert_allclose(1 - b["8"]["converged_fraction"], final["test_nonconverged"])
    with pytest.raises(ValueError, match="budgets must be >= 1"):
        convergence(trained_tiny_deq, "0")


def test_sigterm_stops_the_report_and_the_rerun_resumes_to_the_same_report(
    trained_tiny_deq, tmp_path
):
    """SIGTERM as soon as the first attack run is saved: the report stops after the
    current run (no report written), the rerun says it resumes and writes the report an
    uninterrupted evaluation writes (every accuracy and per-example outcome)."""
    import shutil
    import signal
    import threading
    import time

    cheap = {"attacks": "fgsm,pgd", "gradients": "implicit", "eps": "0.05,0.2"}
    full, part = tmp_path / "full", tmp_path / "part"
    for w in (full, part):
        shutil.copytree(trained_tiny_deq, w)
        for name in ("report.json", "report.md", "robustness.png"):
            if (w / name).exists():
                (w / name).unlink()
    reference = evaluate_lib.evaluate(str(full), cheap, quiet=True)

    def kill_after_first_run():
        deadline = time.time() + 300
        while time.time() < deadline:
            if list((part / "report_state").glob("*/*.npz")):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_after_first_run, daemon=True)
    watcher.start()
    assert evaluate_lib.evaluate(str(part), cheap, quiet=True) is None
    watcher.join()
    saved = list((part / "report_state").glob("*/*.npz"))
    assert 1 <= len(saved) < 4 and not (part / "report.json").exists()
    resumed = evaluate_lib.evaluate(str(part), cheap, quiet=True)
    for key in ("clean_accuracy", "robust_accuracy", "worst_case", "outcomes", "intervals"):
        assert resumed[key] == reference[key], key
    assert json.load(open(part / "report.json"))["worst_case"] == reference["worst_case"]
    assert not (part / "report_state").exists() or not list((part / "report_state").iterdir())


def test_report_carries_intervals_and_outcomes(trained_tiny_deq):
    from scipy import stats as st

    cheap = {"attacks": "fgsm", "gradients": "implicit", "eps": "0.1,0.3"}
    returned = evaluate_lib.evaluate(trained_tiny_deq, cheap, quiet=True)
    report = json.load(open(os.path.join(trained_tiny_deq, "report.json")))
    assert report["intervals"] == returned["intervals"]
    n = report["n_examples"]
    iv = report["intervals"]
    for e, worst in report["worst_case"].items():
        k = round(worst * n)
        assert iv["worst_case"][e]["k"] == k and iv["worst_case"][e]["n"] == n
        lo, hi = st.binomtest(k, n).proportion_ci(method="exact")
        np.testing.assert_allclose(iv["worst_case"][e]["ci95"], [lo, hi], rtol=1e-9, atol=1e-12)
        for label in report["robust_accuracy"][e]:
            assert label in report["outcomes"]["robust_accuracy"][e]
    text = open(os.path.join(trained_tiny_deq, "report.md")).read()
    assert "Clopper" in text and f"n = {n}" in text
