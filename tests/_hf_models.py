"""Tiny random transformers models in the real save_pretrained format, for the hf family's tests."""

from __future__ import annotations

import tokenizers
import torch
import transformers

from tbps.models.hf import ARCHITECTURES

WORDS = "a man woman in red blue black white coat shirt pants bag carrying wearing with the and long short hair shoes".split()
CAPTIONS = ["a man in a red coat", "a woman wearing a blue shirt and black pants carrying a white bag", "long hair", "the"]
PAD, UNK, CLS, SEP = 0, 1, 2, 3
CONTEXT = 16
TINY_TEXT = {"vocab_size": len(WORDS) + 4, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": CONTEXT}
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
               "num_attention_heads": 4}


def _tokenizer():
    vocab = {"[PAD]": PAD, "[UNK]": UNK, "[CLS]": CLS, "[SEP]": SEP, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                                sep_token="[SEP]", bos_token="[CLS]", eos_token="[SEP]", model_max_length=CONTEXT)


def _config(kind: str):
    text = {**TINY_TEXT, "pad_token_id": PAD, "bos_token_id": CLS, "eos_token_id": SEP}
    if kind == "clip":
        return transformers.CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16)
    if kind == "siglip":
        return transformers.SiglipConfig(text_config=text, vision_config=TINY_VISION)
    if kind == "blip":
        return transformers.BlipConfig(text_config={**text, "encoder_hidden_size": 32}, vision_config=TINY_VISION, image_text_hidden_size=16)
    qformer = {**TINY_TEXT, "encoder_hidden_size": 32, "pad_token_id": PAD, "use_qformer_text_input": True}
    return transformers.Blip2Config(vision_config=TINY_VISION, qformer_config=qformer, num_query_tokens=4, image_text_hidden_size=16,
                                    text_config={"model_type": "opt", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2, "ffn_dim": 32, "word_embed_proj_dim": 16})


def _save(kind: str, path, seed: int = 0):
    torch.manual_seed(seed)
    cls = getattr(transformers, ARCHITECTURES[kind].cls)
    model = cls(_config(kind)).eval()
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return model
