"""Compacted, resumable robustness evaluations (deqjax.robustness.evaluate_robustness).

A small sine network on 6×6 images where FGSM leaves examples that FAB-T breaks, and
FAB-T leaves one that Square breaks: compacting (each example attacked at an ε only until
a run breaks it) attacks far fewer examples and gives exactly the uncompacted worst case,
with the later attacks doing work. An evaluation stopped after any run resumes from its
saved runs to the same report.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import stats
from deqjax.robustness import EvaluationStopped, evaluate_robustness

K1, K2, K3 = jax.random.split(jax.random.PRNGKey(0), 3)
X = np.asarray(jax.random.uniform(K1, (64, 6, 6, 1)))
W1 = jax.random.normal(K2, (36, 32)) * 0.6
W2 = jax.random.normal(K3, (32, 4))


def logits(x):
    return jnp.sin(3 * x.reshape(x.shape[0], -1) @ W1) @ W2


Y = np.asarray(jnp.argmax(logits(X), -1))  # clean accuracy 1: robust accuracy is the attacks'
KW = dict(
    eps_list=[0.01, 0.02, 0.04],
    norm="linf",
    attacks=("fgsm", "fab-t", "square"),
    n_iter=3,
    n_queries=300,
    batch_size=32,
    n_target_classes=1,
)


def run(**kw):
    return evaluate_robustness({"autodiff": logits}, X, Y, key=jax.random.PRNGKey(1), **KW, **kw)


@pytest.fixture(scope="module")
def full():
    return run(compact=False)


@pytest.fixture(scope="module")
def compacted():
    return run(compact=True)


def test_compacted_worst_case_is_the_full_one_with_later_attacks_doing_work(full, compacted):
    n = len(X)
    for e in ("0.01", "0.02", "0.04"):
        assert compacted["worst_case"][e] == full["worst_case"][e]
        assert compacted["outcomes"]["worst_case"][e] == full["outcomes"]["worst_case"][e]
    # measured: FAB-T and Square each break one example every earlier run left, at 0.01
    # and 0.02; the uncompacted run attacks all 64 with every attack, compacting 23 / 7
    for e in ("0.01", "0.02"):
        new = compacted["new_breaks"][e]
        assert new["fab-t/autodiff"] >= 1 and new["square"] >= 1, new
        attacked = compacted["attacked"][e]
        assert attacked["fgsm/autodiff"] == n and attacked["square"] < n // 2, attacked
        assert set(full["attacked"][e].values()) == {n}
    # compacted rows are cumulative: each row is the robust fraction after it and all above
    for e in full["eps"]:
        rows = list(compacted["robust_accuracy"][str(e)].values())
        assert rows == sorted(rows, reverse=True) and rows[-1] == compacted["worst_case"][str(e)]
    # worst case never rises with ε (a point in a smaller ball lies in the larger one)
    worst = [full["worst_case"][str(e)] for e in full["eps"]]
    assert worst == sorted(worst, reverse=True)


def test_outcomes_are_per_example_bits_of_the_reported_accuracies(full):
    out, n = full["outcomes"], full["n_examples"]
    assert out["images"] == stats.examples_fingerprint(X, Y)
    assert stats.unpack_bits(out["clean"], n).mean() == full["clean_accuracy"]
    for e, per in out["robust_accuracy"].items():
        for label, bits in per.items():
            assert stats.unpack_bits(bits, n).mean() == full["robust_accuracy"][e][label]
        assert stats.unpack_bits(out["worst_case"][e], n).mean() == full["worst_case"][e]


class DictStore:
    def __init__(self):
        self.saved, self.loads = {}, []

    def load(self, name):
        self.loads.append(name)
        return self.saved.get(name)

    def save(self, name, arrays):
        self.saved[name] = {k: np.array(v) for k, v in arrays.items()}


def _same(a, b):
    for key in ("clean_accuracy", "robust_accuracy", "worst_case", "new_breaks", "outcomes"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("stop_after", [1, 5])
def test_stopped_evaluation_resumes_to_the_same_report(compacted, stop_after):
    store, done = DictStore(), []

    def stop():
        done.append(1)
        return len(done) == stop_after

    with pytest.raises(EvaluationStopped, match=f"after {stop_after} of 9 runs"):
        run(compact=True, store=store, stop=stop)
    assert len(store.saved) == stop_after
    first = dict(store.saved)
    resumed = run(compact=True, store=store)
    _same(resumed, compacted)
    # the saved runs were read back, not run again
    for name, arrays in first.items():
        assert store.saved[name] is arrays
    assert len(store.saved) == 9
