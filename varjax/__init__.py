"""varjax: a JAX/Flax port of VAR for measuring where and what it memorizes.

    import varjax
    model = varjax.load("converted/d16")     # a directory written by `python -m convert`
    tokens = model.tokenize(images_uint8)     # K int32 arrays (B, pn*pn)
    logits, acts = model.teacher_forced(labels, tokens)
    recon = model.decode(tokens)
    tokens = model.generate(labels, cfg=1.5, top_k=900, top_p=0.96, seed=0)
"""

from varjax.config import ModelConfig, VARConfig, VQVAEConfig
from varjax.model import Model, init_params, load
from varjax.taps import TapConfig

__all__ = ["ModelConfig", "VARConfig", "VQVAEConfig", "Model", "TapConfig", "init_params", "load"]
__version__ = "0.1.0"
