"""FuseChat / FuseLLM knowledge fusion by distillation.

Pipeline (each step a plain function; :mod:`fusionlab.jobs.distill` strings them together):

1. :mod:`~fusionlab.distill.conversations`: render conversations in the PIVOT's chat template,
   with the character spans of assistant text.
2. :mod:`~fusionlab.distill.representations`: run the pivot and each source model over the same
   text; keep per-token top-k logits + ids and the per-sample CE over assistant tokens, in
   resumable safetensors shards.
3. :mod:`~fusionlab.distill.token_align`: align the two tokenisations (exact at shared character
   offsets, DTW only in between).
4. :mod:`~fusionlab.distill.vocab`: map source ids to pivot ids (EM / MinED / MS).
5. :mod:`~fusionlab.distill.dist_align`: source top-k distributions in the pivot vocabulary.
6. :mod:`~fusionlab.distill.data` + :mod:`~fusionlab.distill.module`: Lightning training with
   λ·CLM + (1−λ)·fusion loss over assistant tokens.
"""
from fusionlab.distill.token_align import align_tokens, dtw_path
from fusionlab.distill.vocab import VOCAB_MAPPERS, build_vocab_map, token_surfaces

__all__ = ["VOCAB_MAPPERS", "align_tokens", "build_vocab_map", "dtw_path", "token_surfaces"]
