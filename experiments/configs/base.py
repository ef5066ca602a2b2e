"""Defaults shared by every experiment config. A config file's ``get_config()``
starts from :func:`base_config` and changes what it needs; every key can be
overridden on the command line (``--config.train.epochs=3``), and an unknown key
is an error, never silently ignored."""

import ml_collections


def deq_defaults() -> ml_collections.ConfigDict:
    """Solver and gradient settings of a DEQ (see deqjax.deq.DEQConfig)."""
    return ml_collections.ConfigDict(
        dict(
            solver="anderson",
            max_iter=20,
            tol=1e-3,
            stop_mode="rel",
            damping=1.0,
            anderson_m=5,
            anderson_ridge=1e-4,
            # "absolute" (λ = ridge, as Bai et al. and torchdeq) or "relative" (λ scaled to
            # the Gram matrix; the library default): training deq_mnist with the relative
            # ridge gave a DEQ whose evaluation solves converge far less (docs/results/deq.md)
            anderson_ridge_mode="absolute",
            anderson_beta=1.0,
            broyden_memory=0,
            backward="implicit",  # implicit, phantom, unroll, shine / shine_refine (broyden)
            adjoint_solver="anderson",
            adjoint_max_iter=20,
            adjoint_tol=1e-3,
            # the adjoint solve's Anderson ridge in training (absolute: the quick-start DEQ
            # trained with it converges at evaluation 92% vs 47% with "relative") and at
            # evaluation (relative: the linear adjoint solve then scales with the
            # cotangent, and attacks through the implicit gradient are 2-4 points
            # stronger); docs/results/solvers.md, "The adjoint's ridge"
            adjoint_ridge_mode="absolute",
            eval_adjoint_ridge_mode="relative",
            phantom_steps=5,
            phantom_damping=0.5,
            eval_max_iter=40,  # the forward budget at evaluation
            jac_reg=0.0,
            jac_reg_samples=1,  # Hutchinson Jacobian regulariser weight
            random_states_max=0,  # > 0: random intermediate states in training, n ~ U{1..this}
        )
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "mnist_5k"
    c.data_dir = ""  # TFDS data directory ('' = TFDS default)
    c.limit_train = 0  # keep only the first N training examples (0 = all)
    c.limit_test = 0
    c.seed = 0

    # dtype: the activations' dtype, "float32" | "bfloat16" | "float16" (mdeq and
    # explicit_mdeq); parameters, optimiser state, solver internals and logits stay
    # float32 (docs/concepts/mixed_precision.md)
    c.model = ml_collections.ConfigDict(
        dict(
            name="mdeq", width=32, inner=64, groups=8, depth=6, head="pool_flatten", dtype="float32"
        )
    )
    c.deq = deq_defaults()

    c.train = ml_collections.ConfigDict(
        dict(
            epochs=3,
            batch_size=64,
            optimizer="adam",
            learning_rate=2e-3,
            weight_decay=0.0,
            schedule="cosine",
            warmup_steps=50,
            grad_clip=1.0,
            loss="ce",  # ce | hinge | pgd_at | trades | mixed (see experiments/train.py)
            hinge_margin=0.7,
            checkpoint_every_steps=200,
            keep_checkpoints=2,
            nonconvergence_warning=0.05,  # warn when more than this fraction did not converge
            skip_nonfinite=False,  # False: stop on a non-finite loss/gradient; True: skip it
            progress=True,
            # K models (seeds config.seed .. config.seed + K - 1: initialisation, run key
            # and data order) trained as one vmapped program and checkpointed together;
            # 1 = the plain run (experiments/seeds.py, docs/howto/seeds_and_reuse.md)
            seeds=1,
            # DEQs: start each example's training solve from its equilibrium of the last
            # epoch (a per-example store, experiments/fixed_points.py); reuse_reset:
            # "residual" starts from zero where ‖f(z_prev) − z_prev‖ > ‖f(0)‖, "none" never
            reuse_fixed_points=False,
            reuse_reset="residual",
        )
    )
    # The inner attack of adversarial training (train.loss = pgd_at | trades | mixed).
    c.adv = ml_collections.ConfigDict(
        dict(
            eps=0.3,
            step=0.05,
            steps=7,
            norm="linf",
            beta=6.0,
            mixed_weight=0.5,
            attack_gradient="phantom",
            warm_start=False,
        )
    )  # DEQ gradient path of the inner attack: implicit | phantom; warm_start: each inner
    # step's solve starts from the previous step's equilibrium (deqjax.models.warm_start_logits)
    # Input entropy reduction at inference (DEQs; Yang et al. 2023): R rounds of T_f solver steps,
    # `steps` sign-gradient steps of size `step_size` on the input between rounds.
    c.entropy_reduction = ml_collections.ConfigDict(
        dict(
            enabled=False,
            rounds=3,
            round_steps=8,
            steps=5,
            eps=0.1,
            step_size=0.025,
            phantom_steps=5,
            phantom_damping=0.5,
        )
    )
    # Data parallelism over every device (experiments/parallel.py); shard_params splits
    # parameters and optimiser state over a second mesh axis of model_axis_size devices.
    c.parallel = ml_collections.ConfigDict(dict(shard_params=False, model_axis_size=0))
    c.eval = ml_collections.ConfigDict(dict(batch_size=250))
    # The robustness report (experiments/evaluate.py; run after training when
    # robustness.after_training). Worst case over attacks and, for DEQs, gradient views.
    c.robustness = ml_collections.ConfigDict(
        dict(
            after_training=True,
            norm="linf",
            eps="0.05,0.1,0.2,0.3",
            attacks="pgd,apgd-ce,square",
            n_examples=100,
            n_iter=20,
            n_queries=300,
            restarts=1,
            batch_size=100,
            seed=0,
            # DEQ gradient views (all: implicit, phantom, unroll, intermediate, ensemble,
            # simultaneous_adjoint); unroll = backprop through exactly the steps the
            # evaluation forward runs: the exact gradient of what the model computes
            gradients="implicit,unroll,intermediate,simultaneous_adjoint",
            state_indices="4",  # intermediate states attacked (one view each)
            attack_steps=5,  # K_a and λ of the intermediate-state views
            attack_damping=0.5,
            # a defended model (input entropy reduction, OTAD) is attacked through the
            # whole defence (autodiff), by BPDA over every view above (bpda: gradient at
            # x; bpda_purified: at the purified input), guided by every view (the transfer
            # attack's iterates, the defended model's choice) and by transfer from the
            # undefended model (deqjax.bpda.adaptive_views)
            protocols="autodiff,bpda,guided,bpda_purified,transfer",
            # DEQ views whose gradient depends only on z* (implicit, phantom) start each
            # attack iterate's solve from the previous one's fixed point (same model)
            warm_start=True,
            # attack, at each ε, only the examples every earlier run left robust (the
            # worst case is unchanged; per-run rows become cumulative)
            compact=True,
        )
    )
    return c
