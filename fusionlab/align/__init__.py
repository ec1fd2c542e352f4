"""Vocabulary alignment: project one model's token distribution onto another model's vocabulary."""
from fusionlab.align.alignment import Alignment, load_alignment, output_embeddings, save_alignment
from fusionlab.align.methods import ALIGN_METHODS, align
from fusionlab.align.vocab import seed_dictionary, special_roles, token_bytes, tokenizer_hash

__all__ = ["ALIGN_METHODS", "Alignment", "align", "load_alignment", "output_embeddings", "save_alignment",
           "seed_dictionary", "special_roles", "token_bytes", "tokenizer_hash"]
