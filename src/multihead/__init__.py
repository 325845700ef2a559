"""multihead: a drop-in `torch.nn.MultiheadAttention` with torch's numbers, and more."""

from .functional import Projections, multi_head_attention
from .masks import AttentionMask
from .module import MultiheadAttention, safe_globals

__all__ = ["AttentionMask", "MultiheadAttention", "Projections", "multi_head_attention", "safe_globals"]
__version__ = "0.1.0"
