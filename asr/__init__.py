"""Fine-tune and sweep Wav2Vec2-BERT CTC speech recognition with Hydra, the HF Trainer and MLflow."""

from asr.threads import apply_policy

apply_policy()  # first: OpenMP reads it when torch loads

from asr.paths import REPO_DIR, register_resolvers  # noqa: E402
from asr.schema import register_schemas  # noqa: E402

register_resolvers()
register_schemas()  # conf/ files pull their typed schemas from Hydra's ConfigStore

__all__ = ["REPO_DIR"]
