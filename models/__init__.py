"""Models: families behind one protocol (:class:`tbps.models.protocol.Encoder`), loaded from a spec string.

A model *spec* is one string, as typed after ``--model``; :func:`load` hands it to the first
family of :data:`tbps.models.registry.FAMILIES` that claims it:

==========  ==================================================================================
family      specs
==========  ==================================================================================
run         a run directory written by ``tbps train`` (its base model, any family, plus its weights)
open_clip   ``tbps-tiny``, ``NAME`` (random weights), ``NAME:TAG`` (cached pretrained),
            ``NAME:/file.pt``, a model config ``.json``, a checkpoint written by ``tbps export``
==========  ==================================================================================

The rest of tbps calls only the protocol. Adding a family: see :mod:`tbps.models.registry`.
This package's face stays free of torch (the CLI builds ``--help`` from the registry); import
the rest from its modules (``tbps.models.encode``, ``tbps.models.runs``, ...).
"""

from tbps.models.registry import FAMILIES, load

__all__ = ["FAMILIES", "load"]
