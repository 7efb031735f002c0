"""Fine-tune and sweep Wav2Vec2-BERT CTC speech recognition with Hydra, the HF Trainer and MLflow."""

from asr.paths import REPO_DIR, register_resolvers

register_resolvers()

__all__ = ["REPO_DIR"]
