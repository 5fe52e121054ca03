"""``condformer convert``: model surgery that turns a pretrained (or any) run into a conditional-computation one.

``convert_run(RUN, "exits" | "mod" | "moe", OUT, layers=..., **options)`` writes a new run whose model equals the
source's where the technique allows (exits at full depth, MoD at conversion, upcycled MoE with renormalised
gates), ready for ``train --init-from OUT`` with ``--train ROLE`` and ``--lr-new``. One module per technique;
:mod:`condformer.convert.surgery` holds what they share.
"""

from condformer.convert.surgery import TECHNIQUES, ConvertReport, convert_run, plan

__all__ = ["TECHNIQUES", "ConvertReport", "convert_run", "plan"]
