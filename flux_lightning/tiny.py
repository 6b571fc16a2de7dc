"""A tiny random-weight Flux, built offline and deterministically, saved as a diffusers folder.

Every part has the real architecture (``FluxTransformer2DModel``, a 16-channel ``AutoencoderKL``
with 8x downsampling, ``CLIPTextModel``, ``T5EncoderModel`` and their tokenizers), only narrow.
The CLIP tokenizer uses the real CLIP BPE vocabulary that open_clip ships; the T5-style tokenizer
is a small Unigram model written here. The folder then loads through exactly the same code as a
real flavour (``components.py``), and ``diffusers.FluxPipeline.from_pretrained`` reads it.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = 1  # bump when the architecture or tokenizers below change

# Words the Unigram tokenizer knows as whole pieces; anything else falls back to characters.
_WORDS = (
    "a an the of on in with and photo picture image painting drawing portrait style render of "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta "
    "circle square triangle star shape shapes ring cross diamond background small large big "
    "dog cat man woman person face house tree sky sun moon car flower mountain river city "
    "bright dark light colourful colorful cinematic detailed high quality sks"
).split()

TINY_SIZES = dict(
    hidden=32,  # text width (CLIP and T5) fed to the transformer
    heads=2,
    head_dim=16,
    axes_dims_rope=(4, 6, 6),
    num_layers=2,
    num_single_layers=2,
)


def _clip_tokenizer(folder: Path):
    """Write CLIP's real BPE vocabulary (from open_clip) in the Hugging Face CLIPTokenizer format."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )
    return tok


def _t5_tokenizer():
    """A T5-style (Unigram + metaspace, ``</s>`` appended) tokenizer with a small fixed vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = [chr(c) for c in range(33, 127)]
    pieces = [("▁", -4.0)] + [("▁" + w, -5.0) for w in dict.fromkeys(_WORDS)]
    pieces += [(c, -10.0) for c in chars] + [("▁" + c, -9.0) for c in chars]
    tok = Tokenizer(models.Unigram(specials + pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )


def build_tiny_pipeline(seed: int = 0, *, guidance_embeds: bool = True):
    """Build the tiny Flux as a ``diffusers.FluxPipeline`` with deterministic random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    s = TINY_SIZES
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=s["num_layers"],
            num_single_layers=s["num_single_layers"],
            attention_head_dim=s["head_dim"],
            num_attention_heads=s["heads"],
            joint_attention_dim=s["hidden"],
            pooled_projection_dim=s["hidden"],
            guidance_embeds=guidance_embeds,
            axes_dims_rope=s["axes_dims_rope"],
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 2)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=s["hidden"],
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=s["hidden"],
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
        t5_tok = _t5_tokenizer()
        torch.manual_seed(seed + 3)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=s["hidden"],
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok = _clip_tokenizer(Path(tmp))
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def ensure_tiny_folder(root: str | os.PathLike, seed: int = 0, *, guidance_embeds: bool = True) -> Path:
    """Return a diffusers-format folder holding the tiny Flux, building it once (atomically).

    The folder name encodes everything that determines its contents, so it doubles as a cache key.
    """
    name = f"tiny-flux-v{TINY_VERSION}-seed{seed}-{'guided' if guidance_embeds else 'unguided'}"
    folder = Path(root) / name
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        build_tiny_pipeline(seed, guidance_embeds=guidance_embeds).save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first; theirs is identical
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
