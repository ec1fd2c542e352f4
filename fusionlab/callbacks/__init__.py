"""Lightning callbacks that reuse the library (EVA eval, chat-vector merge, Diff-eRank) during training."""
