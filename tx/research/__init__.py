"""Research tools built on the training core (:mod:`tx.train`): the ablation runner
(``ablation``), speed against sequence length (``crossover``), PNG plots (``plots``),
attention maps (``visualize``) and a short demo (``demo``)."""


def ablate(config, workdir, **kwargs):
    """Runs ``config.sweep`` or ``config.variants``; see :func:`tx.research.ablation.ablate`."""
    from tx.research import ablation  # deferred: importing tx.research stays light
    return ablation.ablate(config, workdir, **kwargs)


__all__ = ["ablate"]
