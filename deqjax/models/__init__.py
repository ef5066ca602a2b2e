"""Flax models: thin wrappers over deqjax's pure functions."""

from deqjax.models.deq_layer import DEQ, cell_as_function
from deqjax.models.layers import FastConv
from deqjax.models.lyadeq import LyaDEQClassifier, LyaHead, LyapunovCell, lyadeq_stability_check
from deqjax.models.mdeq import (
    ExplicitMDEQ,
    Head,
    Injection,
    MDEQCell,
    MDEQClassifier,
    check_images,
    warm_start_logits,
    warm_start_refusal,
)
