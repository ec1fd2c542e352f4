"""Lightning callbacks that reuse the library (EVA eval, chat-vector merge, Diff-eRank) during training."""
from fusionlab.callbacks.base import EvalCallback

__all__ = ["EvalCallback"]
