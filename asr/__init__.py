"""Fine-tune and sweep Wav2Vec2-BERT CTC speech recognition with Hydra, the HF Trainer and MLflow."""

from asr.threads import apply_policy

apply_policy()  # first: OpenMP reads it when torch loads

from asr.paths import REPO_DIR, register_resolvers  # noqa: E402

register_resolvers()

__all__ = ["REPO_DIR"]
