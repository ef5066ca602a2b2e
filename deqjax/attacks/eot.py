"""Expectation over Transformation (EOT) for randomised defences.

Athalye, Engstrom, Ilyas & Kwok, "Synthesizing robust adversarial examples",
ICML 2018; Athalye, Carlini & Wagner, ICML 2018 (Sec. 4.2). A randomised model
f(x; r) is attacked through its expected prediction
  log p̄(x) = log (1/n) Σ_{i=1}^n softmax(f(x; r_i)),
whose input gradient averages the per-sample gradients (weighted by the
per-sample probabilities). **(choice)** The n random draws r_i come from keys
split once from ``key`` and stay fixed during one attack run; use restarts (new
keys) to resample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deqjax.attacks._common import check_positive_int


def eot_logits_fn(random_logits_fn, key, n_samples: int):
    """Wrap ``random_logits_fn(x, key) -> (B, C)`` into a deterministic
    ``logits_fn(x) -> (B, C)`` returning log of the mean softmax over
    ``n_samples`` vmapped draws, usable by every attack in this package."""
    n = check_positive_int("n_samples", n_samples)
    keys = jax.random.split(key, n)

    def logits_fn(x):
        logp = jax.vmap(lambda k: jax.nn.log_softmax(random_logits_fn(x, k), -1))(keys)
        return jax.nn.logsumexp(logp, axis=0) - jnp.log(n)

    return logits_fn
