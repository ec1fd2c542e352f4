"""EVA ensemble decoding (KV-cached, batched, members in parallel): candidate rules, gates, drop filter,
combiners, and the member-vs-ensemble evaluation that the job and the eva_eval callback share."""
from fusionlab.ensemble.candidates import CANDIDATES, Projection
from fusionlab.ensemble.combine import COMBINERS, confidence, drop_filter, linear_sum, topk_probs, uniform
from fusionlab.ensemble.config import DecodingOptions, EnsembleConfig
from fusionlab.ensemble.decoder import EnsembleOutput, EvaDecoder, align_members, encode_prompt
from fusionlab.ensemble.evaluation import EnsembleReport, Member, evaluate_ensemble
from fusionlab.ensemble.gates import GATES
from fusionlab.ensemble.sync import TextSync, complete_utf8

__all__ = ["CANDIDATES", "COMBINERS", "GATES", "DecodingOptions", "EnsembleConfig", "EnsembleOutput", "EnsembleReport",
           "EvaDecoder", "Member", "Projection", "TextSync", "align_members", "complete_utf8", "confidence",
           "drop_filter", "encode_prompt", "evaluate_ensemble", "linear_sum", "topk_probs", "uniform"]
