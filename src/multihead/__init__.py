"""multihead: a drop-in `torch.nn.MultiheadAttention` with torch's numbers, and more."""

from .cache import KVCache
from .functional import Projections, multi_head_attention
from .masks import AttentionMask
from .module import MultiheadAttention, safe_globals
from .replace import replace_attention
from .rotary import RotaryEmbedding
from .validation import MultiheadAttentionShapeError

__all__ = [
    "AttentionMask",
    "KVCache",
    "MultiheadAttention",
    "MultiheadAttentionShapeError",
    "Projections",
    "RotaryEmbedding",
    "multi_head_attention",
    "replace_attention",
    "safe_globals",
]
__version__ = "0.1.0"
