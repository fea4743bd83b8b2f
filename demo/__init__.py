"""``tbps demo``: the whole Filtering-WoRA paradigm on the synthetic world, its claims measured.

One command, one run directory. The stages, in order:

1. **World**: ``tbps synth`` writes a CUHK-PEDES-format benchmark (train/val/test split by
   identity) and an APTM/MALS-format pool with injected defects; the defect truth goes to a
   sidecar the filter never sees.
2. **Scorer**: tbps-tiny trained from random weights with full fine-tuning on the benchmark's
   train split, its checkpoint chosen on val. It plays the paper's pretrained BLIP-2 scorer, and
   it is also the *baseline* the world was calibrated on (``plan``).
3. **Filter**: ``tbps score`` scores the pool against a reference bank sampled from the same
   train split's captions; ``tbps select`` keeps ``--keep 0.4`` of the pool (exact image and
   caption de-duplication, then the best 40% by score) and, for comparison, applies the paper's
   ``paper-pretrain`` rule (scaled to the bank's size). Both are measured against the defect
   truth: precision and recall of the removed pairs, and the AUROC of ``score`` and ``bank_rank``
   as defect detectors, overall and per defect kind.
4. **Training**, two stages, every run from the same seed:

   * **stage A, "pretrain"**: tbps-tiny from the same random initial weights, full training, on
     (a) the whole pool, (b) the filtered 40% and (c) a random 40% of the pool (as many rows as
     (b), drawn with the training seed) as the control. **Equal epochs**: a 40% subset takes
     40% of the steps, which is where the paper's training-time saving comes from; each run's
     wall time of training is measured, never derived.
   * **stage B, "fine-tune"** on the benchmark's train split, starting from a stage-A model
     (exported with its weights folded in). From the filtered-pretrained model: WoRA with the
     paper code's per-input norm, WoRA with the per-output (DoRA) norm, DoRA, LoRA (all rank 8)
     and full fine-tuning. From the full-pool and random-pretrained models: WoRA (per-input).
     **Equal epochs = equal steps** here: every run sees the same data with the same batch size,
     optimizer (AdamW), learning rate, warm-up and cosine schedule; only the adapter differs.

   Every run validates on the benchmark's val split a few times and keeps its best step by
   val R@1 (``tbps train``'s ``best/``); the test split is never used to choose anything.
5. **Evaluation**: every model (the baseline, the three stage-A models as they are, every
   stage-B model) on the held-out test split (``tbps eval``'s protocol): R@1, R@5, R@10, mAP,
   mINP, with trainable parameters, training wall time and pairs seen of the run that made it.
   The table is printed, and written to ``results.md`` and ``results.json`` with the claims
   (``claims``) and the filter's truth metrics; ``report.html`` is ``tbps inspect --html`` of the
   filtered manifest (score and bank-rank histograms with the cut, the pairs dropped by reason)
   and ``report-scores.html`` that of the pool's whole score table.

Seeds. ``--seed`` fixes the world, the scorer and therefore the filter (they are the data being
compared). ``--seeds N`` repeats both training stages with training seeds ``seed .. seed+N-1``
(initial weights, adapter initialisation, data order, augmentation and the random control's
sample); the table then gives mean ± sample std over the seeds, and each claim is judged on the
mean of its per-seed paired differences (a difference smaller than the std of those differences
is reported as within seed noise). The baseline (the scorer) is trained once.

``--quick`` runs every stage on a tiny world with a few steps (the CI end-to-end check); its
numbers say nothing about the claims, and the output says so.

The modules, each importing its siblings directly: ``plan`` (options, the variants, the budgets
and the training subsets), ``claims`` (statistics over seeds and the claims' verdicts),
``report`` (the table's cells and ``results.md``) and ``run`` (the stages, :func:`run_demo`).
The package re-exports only ``DemoConfig``: importing ``tbps.demo.report`` loads no torch.
"""

from tbps.demo.plan import DemoConfig

__all__ = ["DemoConfig"]
