"""Model families: each module exports ``build(config, num_classes) -> ModelSpec``
(:mod:`experiments.spec`); :mod:`experiments.models` maps ``config.model.name`` to them."""
