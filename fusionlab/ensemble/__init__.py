"""EVA ensemble decoding (KV-cached, batched) with drop filter and combiners."""
from fusionlab.ensemble.combine import COMBINERS, drop_filter, linear_sum, topk_probs, uniform
from fusionlab.ensemble.decoder import EnsembleOutput, EvaDecoder, align_members, encode_prompt
from fusionlab.ensemble.sync import TextSync, complete_utf8

__all__ = ["COMBINERS", "EnsembleOutput", "EvaDecoder", "TextSync", "align_members", "complete_utf8", "drop_filter",
           "encode_prompt", "linear_sum", "topk_probs", "uniform"]
