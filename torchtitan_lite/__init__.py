"""torchtitan_lite: a small PyTorch-native LLM pretraining stack."""
