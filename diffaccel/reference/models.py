"""Architectures of the reference models: one VAE and one text encoder shared by an SD-style U-Net
pipeline and a PixArt-style DiT pipeline, all small enough to train on two CPU cores."""

from __future__ import annotations

IMAGE_SIZE = 256  # pixels
LATENT_SIZE = 32  # VAE scale 8, as in SD: the U-Net's top level attends over 32x32 = 1024 latent tokens
MAX_TOKENS = 40  # caption tokens; captions use at most 33 with <bos>/<eos>
TEXT_WIDTH = 64
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def make_tokenizer():
    """A word-level tokenizer over the dataset's vocabulary (lower-cased, unknown words -> <unk>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .data import vocabulary

    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=MAX_TOKENS)


def make_text_encoder(vocab_size: int):
    """A small CLIP text transformer (causal, as CLIP's). The training script pretrains it to make the
    scene a caption describes readable by cross-attention, then freezes it for the denoisers, as SD
    freezes a pretrained CLIP. 128 positions, so PixArt's default padding to 120 tokens fits."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3))


def make_vae():
    """SD-style KL autoencoder, scale 8, 4 latent channels; no mid-block attention (it would only cost)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE, mid_block_add_attention=False)


def make_unet():
    """SD-style: cross-attention at the 32x32 and 16x16 levels, a plain ResNet level at 8x8."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=2, norm_num_groups=16)


def make_transformer():
    """PixArt-alpha-style: patch 2 (16x16 = 256 image tokens), adaLN-single, cross-attention to the caption."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, patch_size=2, num_layers=8,
        num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128, caption_channels=TEXT_WIDTH,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
