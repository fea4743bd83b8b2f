"""Contrastive losses for fine-tuning: CLIP's InfoNCE and IRRA's identity-aware SDM.

Both losses see the *global* batch. Under ``torchrun`` every rank gathers the embeddings of all
ranks with :func:`torch.distributed.nn.functional.all_gather`, which keeps gradients: its
backward sums each rank's gradient of the (identical) global loss into the rank that produced
the embeddings, and DDP then averages parameter gradients over the ranks, so the update equals
the update of one process on the whole batch.

``clip``
    ``(CE(s · I Tᵀ, diag) + CE(s · T Iᵀ, diag)) / 2`` with ``s = exp(logit_scale)``, the
    learnable temperature of open_clip (clamped at 100, as open_clip does).
``sdm``
    Similarity-distribution matching (Jiang & Ye, IRRA, CVPR 2023): every caption and image of
    the same ``person_id`` in the batch is a positive. The loss is
    ``KL(softmax(s · I Tᵀ) ‖ q) + KL(softmax(s · T Iᵀ) ‖ q)``, each averaged over rows, where
    ``q`` is the row-normalised identity-match matrix (IRRA adds ε = 1e-8 inside the log of q).
    IRRA fixes ``s`` at 50; here it is the same learnable ``logit_scale`` as for ``clip``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("clip", "sdm")
MAX_LOGIT_SCALE = 100.0
_EPS = 1e-8


def gather_batch(x: torch.Tensor, *, with_grad: bool) -> torch.Tensor:
    """Concatenate a tensor's per-rank batches in rank order (identity without DDP).

    Args:
        x: this rank's (n, ...) tensor; every rank must hold the same n.
        with_grad: gather through autograd (embeddings) or not (labels).

    Returns:
        The (world_size * n, ...) global batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather  # only under torchrun: absent from builds without distributed

        return torch.cat(all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    negatives: torch.Tensor | None = None,
    negative_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: pair i's image and caption are the only positives of each other.

    With ``negatives`` (NegCLIP): each image also competes against every perturbed caption of the
    batch, its own one included (the hard negative that differs from its caption in a word or two).

    Args:
        image_emb: (n, D) L2-normalised image embeddings of the global batch.
        text_emb: (n, D) L2-normalised caption embeddings, row i paired with image i.
        logit_scale: ``exp`` of the model's ``logit_scale`` (the inverse temperature).
        negatives: (n, D) L2-normalised embeddings of the perturbed captions, or None.
        negative_valid: (n,) bool: which rows of ``negatives`` are real (the others are ignored).

    Returns:
        The scalar loss.
    """
    logits = logit_scale * image_emb @ text_emb.T
    labels = torch.arange(len(logits), device=logits.device)
    image_to_text = logits
    if negatives is not None:
        extra = logit_scale * image_emb @ negatives.T
        if negative_valid is not None:
            extra = extra.masked_fill(~negative_valid[None, :], float("-inf"))
        image_to_text = torch.cat([logits, extra], dim=1)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(logits.T, labels)) / 2


def sdm_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, person_ids: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """IRRA's similarity-distribution matching: all pairs of one person are positives.

    Args:
        image_emb: (n, D) L2-normalised image embeddings of the global batch.
        text_emb: (n, D) L2-normalised caption embeddings, row i paired with image i.
        person_ids: (n,) integer identity codes (pairs without an id carry a code of their own).
        logit_scale: ``exp`` of the model's ``logit_scale``.

    Returns:
        The scalar loss (the sum of the image-to-text and text-to-image KL terms).
    """
    same = (person_ids[:, None] == person_ids[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    log_target = torch.log(target + _EPS)
    loss = image_emb.new_zeros(())
    for logits in (logit_scale * image_emb @ text_emb.T, logit_scale * text_emb @ image_emb.T):
        # The two directions: image -> captions and caption -> images, each a KL(pred || target).
        log_pred = F.log_softmax(logits, dim=1)
        loss = loss + (log_pred.exp() * (log_pred - log_target)).sum(dim=1).mean()
    return loss


def contrastive_loss(
    kind: str,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    person_ids: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
    negative_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``--loss`` of one micro-batch over the global batch (gathered across DDP ranks).

    Args:
        kind: ``clip`` or ``sdm``.
        image_emb: this rank's (n, D) L2-normalised image embeddings.
        text_emb: this rank's (n, D) L2-normalised caption embeddings.
        logit_scale: ``exp`` of the model's ``logit_scale``, clamped at 100 here.
        person_ids: this rank's (n,) identity codes (``sdm`` only).
        negatives: this rank's (n, D) perturbed-caption embeddings (``clip`` only; ``--hard-negatives``).
        negative_valid: this rank's (n,) bool mask of real negatives.

    Returns:
        The scalar loss, identical on every rank.
    """
    image_all = gather_batch(image_emb.float(), with_grad=True)
    text_all = gather_batch(text_emb.float(), with_grad=True)
    scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE)
    if kind == "clip":
        if negatives is None:
            return clip_loss(image_all, text_all, scale)
        return clip_loss(image_all, text_all, scale, gather_batch(negatives.float(), with_grad=True),
                         gather_batch(negative_valid, with_grad=False) if negative_valid is not None else None)
    if negatives is not None:
        raise ValueError("hard negatives are added to the clip loss only")
    if kind == "sdm":
        if person_ids is None:
            raise ValueError("the sdm loss needs person ids")
        return sdm_loss(image_all, text_all, gather_batch(person_ids, with_grad=False), scale)
    raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")
