"""Vocabulary and token matching, in one place.

- EVA: project one model's token distribution onto another model's vocabulary
  (:func:`align`, one registered function per method in :mod:`~fusionlab.align.methods`);
- FuseChat / FuseLLM: align two tokenisations of the same text (:mod:`~fusionlab.align.token_align`)
  and map source token ids to pivot ids (EM / MinED / MS, :mod:`~fusionlab.align.mapping`);
- shared by both (:mod:`~fusionlab.align.vocab`): what each token id means as bytes, the one
  exact-match index and the one MinED (minimum edit distance) core.
"""
from fusionlab.align.alignment import Alignment, load_alignment, output_embeddings, save_alignment
from fusionlab.align.mapping import VOCAB_MAPPERS, MappingConfig, build_vocab_map
from fusionlab.align.methods import ALIGN_METHODS, AlignOptions, align, align_method, align_options
from fusionlab.align.token_align import TokenAlignment, align_tokens, dtw_path
from fusionlab.align.vocab import (nearest_by_edit_distance, seed_dictionary, special_roles, strip_marker,
                                   surface_index, token_bytes, token_surfaces, tokenizer_hash)

__all__ = ["ALIGN_METHODS", "Alignment", "AlignOptions", "MappingConfig", "TokenAlignment", "VOCAB_MAPPERS", "align",
           "align_method", "align_options", "align_tokens", "build_vocab_map", "dtw_path", "load_alignment",
           "nearest_by_edit_distance", "output_embeddings", "save_alignment", "seed_dictionary", "special_roles",
           "strip_marker", "surface_index", "token_bytes", "token_surfaces", "tokenizer_hash"]
