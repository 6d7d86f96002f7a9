from models.qwen3.args import Qwen3ModelArgs, RopeScaling, get_flavor, qwen3_flavors
from models.qwen3.model import Qwen3Model, build_model

__all__ = ["Qwen3ModelArgs", "RopeScaling", "get_flavor", "qwen3_flavors", "Qwen3Model", "build_model"]
