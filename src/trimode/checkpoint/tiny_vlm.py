"""A tiny random NLD-VLM checkpoint, written in the real layout, for tests and demos.

``python -m trimode.checkpoint.tiny_vlm OUT`` writes ``OUT/`` with ``config.json`` (text fields
at the root, ``vision_config``, ``spatial_merge_size``, vocab 97: odd on purpose, as the real
131,073), two safetensors shards plus ``model.safetensors.index.json`` (text weights
``encoder.*`` + ``diffusion_head.weight``; vision weights ``encoder.vision_tower.*`` and
``encoder.multi_modal_projector.*``, or at the top level with ``top_level=True``), and a
word-level tokenizer with a chat template and the image tokens at ids 18-21. The weights come
from transformers' ``Ministral3ForCausalLM``, ``PixtralVisionModel`` and
``Mistral3MultiModalProjector`` (returned, so tests can use them as the oracle). The answers
are random words: it checks plumbing and numerics, not quality.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..multimodal.config import IMAGE_TOKENS, vision_spec_from_dict

NLD_ROPE = {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0,
            "original_max_position_embeddings": 16384, "max_position_embeddings": 262144,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1}
SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2, "<mask>": 3}
CHAT_TEMPLATE = ("{{ '<s>' }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def tiny_vlm_config(vocab_size: int = 97, block_size: int = 8) -> dict:
    vision = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16, "patch_size": 14,
              "image_size": 1540, "rope_theta": 10000.0, "hidden_act": "silu", "num_channels": 3}
    return {"architectures": ["NemotronLabsDiffusionVLMModel"],
            "model_type": "nemotron_labs_diffusion_vlm", "vocab_size": vocab_size,
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 262144, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "rope_parameters": dict(NLD_ROPE), "mask_token_id": 3, "bos_token_id": 1,
            "eos_token_id": 2, "block_size": block_size, "dlm_paradigm": "bidirectional",
            "spatial_merge_size": 2, "projector_hidden_act": "gelu",
            "multimodal_projector_bias": False, "vision_feature_layer": -1,
            "vision_config": vision}


def build_tiny_vlm(config: dict, seed: int = 0):
    """(text model, vision tower, projector): random transformers modules in fp32, eval."""
    from transformers import Ministral3Config, Ministral3ForCausalLM, PixtralVisionModel
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    text = {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "max_position_embeddings",
                                   "rms_norm_eps", "tie_word_embeddings")}
    spec = vision_spec_from_dict(config)
    torch.manual_seed(seed)
    lm = Ministral3ForCausalLM(Ministral3Config(
        **text, rope_parameters=dict(config["rope_parameters"]), bos_token_id=1, eos_token_id=2,
        pad_token_id=0, attn_implementation="eager"))
    tower = PixtralVisionModel(spec.pixtral_config())
    projector = Mistral3MultiModalProjector(spec.mistral3_config())
    with torch.no_grad():  # peaked weights: argmax margins dwarf fp32 rounding
        for module in (lm, tower, projector):
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.3 if p.dim() >= 2 else 1 + 0.1 * torch.randn_like(p))
    return lm.float().eval(), tower.float().eval(), projector.float().eval()


def write_tiny_vlm(directory: str | Path, seed: int = 0, top_level: bool = False,
                   block_size: int = 8):
    """Write the checkpoint; returns (directory, (text model, tower, projector))."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_vlm_config(block_size=block_size)
    lm, tower, projector = build_tiny_vlm(config, seed)
    prefix = "" if top_level else "encoder."
    text = {("encoder." + k[len("model."):] if k.startswith("model.") else "diffusion_head.weight"): v
            for k, v in lm.state_dict().items()}
    vision = {f"{prefix}vision_tower.{k}": v for k, v in tower.state_dict().items()
              if not k.endswith("inv_freq")}
    vision.update({f"{prefix}multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    shards = {"model-00001-of-00002.safetensors": text, "model-00002-of-00002.safetensors": vision}
    weight_map = {}
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(directory, config["vocab_size"])
    return directory, (lm, tower, projector)


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """Word-level tokenizer: specials 0-3, image tokens 18-21, words ``w<i>`` elsewhere."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = dict(SPECIAL)
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    for i, name in enumerate(IMAGE_TOKENS):
        del vocab[f"w{18 + i}"]
        vocab[name] = 18 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL) + list(IMAGE_TOKENS))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trimode.checkpoint.tiny_vlm OUT_DIR")
    print(write_tiny_vlm(sys.argv[1])[0])
