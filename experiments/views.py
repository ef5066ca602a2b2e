"""The attacked views of a model: ``{view name: logits_fn}`` per evaluated model.

Every view of one model computes that model's logits; views differ only in the gradient
an attack follows (docs/concepts/attack_views.md). The one entry point is :func:`model_views`:

* an explicit network: ``{"autodiff": f}``;
* a DEQ: its gradient views (:func:`deq_views`: ``implicit``, ``unroll`` — the exact
  gradient of the evaluation forward's own steps —, ``phantom``, ``intermediate_z{i}``,
  ``ensemble``, ``simultaneous_adjoint``) from ``robustness.gradients``;
* a model with an input-transforming defence (input entropy reduction): the
  adaptive views of :func:`deqjax.bpda.adaptive_views` around the undefended model's
  views — full autodiff through the defence, BPDA composed with *every* undefended view
  (``bpda_<view>``, ``bpda_purified_<view>``), and the transfer attacks
  (``transfer_<view>``) that the adaptive ones must beat;
* a family with its own evaluated models (OTAD): the family's ``ModelSpec.views`` hook,
  built with the same :func:`deqjax.bpda.adaptive_views`.
"""

from __future__ import annotations

from collections.abc import Callable

from deqjax.bpda import adaptive_views
from deqjax.deq_gradients import AttackView
from deqjax.models import warm_start_logits, warm_start_refusal
from deqjax.regulation import entropy_reduction
from experiments.spec import Evaluated, ModelSpec, split_list
from experiments.workdir import Run


def deq_views(
    spec: ModelSpec,
    state,
    gradients,
    *,
    state_indices=("4",),
    attack_steps: int = 5,
    attack_damping: float = 0.5,
    config=None,
    warm_start: bool = False,
) -> dict[str, Callable]:
    """``{name: logits_fn}`` of a DEQ for each gradient in ``gradients`` (``intermediate``
    gives one view per index in ``state_indices``, named ``intermediate_z{i}``).
    ``config`` replaces the evaluation :class:`~deqjax.deq.DEQConfig` (another budget).

    ``warm_start``: a view that a warm start leaves exact (implicit or phantom gradient,
    tolerance-stopped forward, a model with an equilibrium:
    :func:`deqjax.models.deq_layer.check_warm_start`) is a
    :class:`~deqjax.attacks.WarmStartLogits`, so every iterative attack starts each
    solve from the previous iterate's fixed point; the others stay cold."""
    variables = {"params": state.params, **state.model_state}
    kwargs = dict(spec.eval_kwargs)
    if config is not None:
        kwargs["config"] = config

    def logits(view: AttackView):
        config = kwargs.get("config")
        if (
            warm_start
            and set(kwargs) <= {"config"}
            and warm_start_refusal(spec.module, variables, config=config, view=view) is None
        ):
            return warm_start_logits(spec.module, variables, config=config, view=view)
        return lambda x: spec.module.apply(variables, x, **kwargs, view=view)[0]

    out = {}
    for g in gradients:
        if g == "intermediate":
            for i in state_indices:
                out[f"intermediate_z{int(i)}"] = logits(
                    AttackView("intermediate", int(i), int(attack_steps), float(attack_damping))
                )
        else:
            out[g] = logits(AttackView(g, steps=int(attack_steps), damping=float(attack_damping)))
    return out


def undefended_views(run: Run, r) -> dict[str, Callable]:
    """The model's own views: ``autodiff`` for an explicit net, the DEQ gradient views
    of ``r.gradients`` for a DEQ."""
    spec, state = run.spec, run.state
    if not spec.is_deq:
        variables = {"params": state.params, **state.model_state}
        return {"autodiff": lambda x: spec.module.apply(variables, x, **spec.eval_kwargs)[0]}
    return deq_views(
        spec,
        state,
        split_list(r.gradients),
        state_indices=split_list(r.state_indices),
        attack_steps=r.attack_steps,
        attack_damping=r.attack_damping,
        warm_start=bool(r.get("warm_start", False)),
    )


def entropy_defence(run: Run) -> Callable:
    """``x -> (logits, x_purified)``: input entropy reduction (Yang et al. 2023) around the DEQ,
    with the settings of ``config.entropy_reduction``."""
    spec, er = run.spec, run.config.entropy_reduction
    module = spec.module
    variables = {"params": run.state.params, **run.state.model_state}
    round_cfg = spec.eval_kwargs["config"].with_forward(max_iter=int(er.round_steps))

    def defence(x):
        return entropy_reduction(
            lambda xx: module.apply(variables, xx, method="inject"),
            lambda u, z0: module.apply(variables, u, z0, round_cfg, method="solve_from")[0],
            lambda u, z: module.apply(
                variables,
                u,
                z,
                int(er.phantom_steps),
                float(er.phantom_damping),
                method="phantom_from",
            ),
            lambda z: module.apply(variables, z, method="classify"),
            x,
            rounds=int(er.rounds),
            steps=int(er.steps),
            eps=float(er.eps),
            step_size=float(er.step_size),
        )

    return defence


def has_input_defence(run: Run) -> bool:
    er = run.config.get("entropy_reduction")
    return er is not None and bool(er.enabled)


def model_views(run: Run, r) -> dict[str, Evaluated]:
    """``{model label: Evaluated(score, views)}`` of every model a report of this
    workdir scores (one, unless the family's ``ModelSpec.views`` says otherwise)."""
    if run.spec.views is not None:
        return run.spec.views(run, r)
    views = undefended_views(run, r)
    if not has_input_defence(run):
        return {run.config.model.name: Evaluated(next(iter(views.values())), views)}
    defence = entropy_defence(run)
    defended = lambda x: defence(x)[0]
    protocols = tuple(split_list(r.protocols))
    adaptive = adaptive_views(defended, views, purify=defence, protocols=protocols)
    return {run.config.model.name: Evaluated(defended, adaptive)}
