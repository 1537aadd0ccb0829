"""``mlx_lm.load`` that never runs a model's own code: the one way scu_sweep loads a model
directory (`load.load` for runs, `gguf.load` for converted GGUFs)."""

from __future__ import annotations


def mlx_lm_load(ref, **kwargs):
    """``mlx_lm.load`` with custom code off for the model and its tokenizer.

    mlx-lm reads only ``model*.safetensors`` (never pickle checkpoints); ``trust_remote_code``
    is passed as False both to mlx-lm (a config's ``model_file``) and, through
    ``tokenizer_config``, to transformers' ``AutoTokenizer`` (an ``auto_map`` entry), so a
    model directory or hub repo can never make this process import its Python files.
    """
    from mlx_lm import load as mlx_load  # lazy: mlx_lm imports transformers (~1.5 s)

    tokenizer_config = dict(kwargs.pop("tokenizer_config", None) or {})
    if kwargs.pop("trust_remote_code", False) or tokenizer_config.get("trust_remote_code"):
        raise ValueError("trust_remote_code: allowed only False (scu_sweep never runs a model's own code)")
    tokenizer_config["trust_remote_code"] = False
    return mlx_load(str(ref), tokenizer_config=tokenizer_config, trust_remote_code=False, **kwargs)
