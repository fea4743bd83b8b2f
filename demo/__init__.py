"""``tbps demo``: the Filtering-WoRA paradigm as an experiment on the embedded synthetic world.

The experiment (its arms, budgets, tuning and gate) is described in :mod:`tbps.demo.plan`; the
comparisons and claims in :mod:`tbps.demo.claims`; the statistics (bootstrap intervals over test
identities, paired differences) in :mod:`tbps.demo.stats`; the rendering of the results record
(``results.md``, ``report.html``) in :mod:`tbps.demo.report`; the run itself (jobs, the
executor, :func:`~tbps.demo.run.run_demo`) in :mod:`tbps.demo.run`.

``--seed`` fixes the world, the scorer and therefore the filter (they are the data being
compared); ``--seeds N`` repeats every training run with training seeds ``seed .. seed+N-1``.
``--quick`` runs every stage on a tiny world with a few steps (the CI end-to-end check); its
numbers say nothing about the claims, and the output says so.

The package re-exports only ``DemoConfig``: importing ``tbps.demo.report`` loads no torch.
"""

from tbps.demo.plan import DemoConfig

__all__ = ["DemoConfig"]
