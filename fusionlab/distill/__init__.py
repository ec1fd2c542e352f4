"""FuseChat / FuseLLM knowledge fusion by distillation.

Pipeline (:mod:`~fusionlab.distill.pipeline` strings the steps together for the ``distill`` and
``fusechat_merge`` jobs; each step is a plain function):

1. :mod:`~fusionlab.distill.conversations`: render conversations in the PIVOT's chat template,
   with the character spans of assistant text.
2. :mod:`~fusionlab.distill.representations`: run the pivot and each source model over the same
   text; keep per-token top-k logits + ids and the per-sample CE over assistant tokens, in
   resumable safetensors shards.
3. :mod:`fusionlab.align.token_align` and :mod:`fusionlab.align.mapping`: align the two
   tokenisations (exact at shared character offsets, DTW only in between) and map source ids to
   pivot ids (EM / MinED / MS) — vocabulary matching lives in :mod:`fusionlab.align`.
4. :mod:`~fusionlab.distill.dist_align`: source top-k distributions in the pivot vocabulary.
5. :mod:`~fusionlab.distill.data` + :mod:`~fusionlab.distill.module`: Lightning training with
   λ·CLM + (1−λ)·fusion loss over assistant tokens.
"""
from fusionlab.distill.config import DataConfig, DistillConfig, FuseChatMergeConfig, PairwiseTarget

__all__ = ["DataConfig", "DistillConfig", "FuseChatMergeConfig", "PairwiseTarget"]
