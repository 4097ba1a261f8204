"""bilevel: min-min bi-level learning with exact contrastive / interference decomposition."""
from .algorithm import (
    AlgorithmConfig,
    BilevelAlgorithm,
    MetaStep,
    available_algorithms,
    build_algorithm,
    get_algorithm,
    register,
)
from .decompose import TERMS, Decomposition
from .head import HeadState, HeadTrace, head_add_noise, head_shrink, head_write, init_head, readout, reconstruct_logits
from .inner import InnerResult, sgd_steps
from .models import BilevelModel, ModelConfig, build_model
from .params import Params
from .unrolled import UnrolledAlgorithm, UnrolledConfig

__all__ = [
    "AlgorithmConfig", "BilevelAlgorithm", "MetaStep", "available_algorithms", "build_algorithm",
    "get_algorithm", "register", "TERMS", "Decomposition", "HeadState", "HeadTrace", "head_add_noise",
    "head_shrink", "head_write", "init_head", "readout", "reconstruct_logits", "InnerResult", "sgd_steps",
    "BilevelModel", "ModelConfig", "build_model", "Params", "UnrolledAlgorithm", "UnrolledConfig",
]
