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
import tempfile
from pathlib import Path

import torch

from ..atomic_files import build_folder_once
from ..training.rng import seeded

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
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
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


#: FLUX.1-dev's transformer at its real width (24 heads x 128 = 3072, T5 4096, CLIP pooled 768)
#: with 1 double and 2 single blocks (about 0.7B parameters): every per-token tensor of a step has
#: the size it has on FLUX.1-dev, so the memory of a step measured on the CPU carries over.
REAL_WIDTH_SIZES = dict(
    hidden=4096,  # T5 width
    clip_hidden=768,  # CLIP pooled width
    heads=24,
    head_dim=128,
    axes_dims_rope=(16, 56, 56),
    num_layers=1,
    num_single_layers=2,
)


def build_tiny_pipeline(seed: int = 0, *, guidance_embeds: bool = True, sizes: dict | None = None):
    """Build the tiny Flux as a ``diffusers.FluxPipeline`` with deterministic random weights.

    ``sizes`` (e.g. :data:`REAL_WIDTH_SIZES`) replaces :data:`TINY_SIZES`: the transformer's width
    and blocks and the text encoders' output widths (``hidden`` for T5, ``clip_hidden`` for CLIP,
    default ``hidden``); the encoders stay two narrow layers deep either way.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    s = sizes or TINY_SIZES
    clip_hidden = s.get("clip_hidden", s["hidden"])
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=s["num_layers"],
            num_single_layers=s["num_single_layers"],
            attention_head_dim=s["head_dim"],
            num_attention_heads=s["heads"],
            joint_attention_dim=s["hidden"],
            pooled_projection_dim=clip_hidden,
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
                hidden_size=clip_hidden,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=clip_hidden,
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
    return build_folder_once(
        Path(root) / name,
        lambda tmp: build_tiny_pipeline(seed, guidance_embeds=guidance_embeds).save_pretrained(tmp),
        marker="model_index.json",
    )


def ensure_real_width_folder(root: str | os.PathLike, seed: int = 0) -> Path:
    """A diffusers folder like FLUX.1-dev's at its real width (:data:`REAL_WIDTH_SIZES`: 1 double and
    2 single blocks, about 0.7B parameters, transformer saved in bf16 as FLUX.1-dev ships it; tiny
    encoders whose outputs are 4096 (T5) and 768 (CLIP) wide), built once; about 1.4 GB on disk.
    For measuring memory at real width on a CPU (benchmarks/memory_vs_reference.py)."""

    def build(tmp: Path) -> None:
        pipe = build_tiny_pipeline(seed, sizes=REAL_WIDTH_SIZES)
        pipe.transformer.to(torch.bfloat16)
        pipe.save_pretrained(tmp)

    name = f"real-width-flux-v{TINY_VERSION}-seed{seed}"
    return build_folder_once(Path(root) / name, build, marker="model_index.json")


# -- tiny helpers for the evaluation callbacks (CLIP score, validation previews) ----------------
TINY_AUX_VERSION = 2  # 2: the CLIP tokenizer_config.json lists its added tokens (fast load)


def _reusable_clip_tokenizer(root: Path):
    """The CLIP tokenizer of an already built tiny Flux under ``root`` (building one takes seconds)."""
    from transformers import CLIPTokenizer

    for folder in sorted(root.glob(f"tiny-flux-v{TINY_VERSION}-*/tokenizer")):
        if (folder / "vocab.json").is_file():
            return CLIPTokenizer.from_pretrained(folder)
    return None


def build_tiny_clip(folder: str | os.PathLike, seed: int = 0, tokenizer=None) -> Path:
    """Save a tiny random ``CLIPModel`` with its ``CLIPProcessor`` to ``folder``.

    Real architecture and the real CLIP BPE vocabulary (from open_clip), 32-px images, width 32:
    what torchmetrics' ``CLIPScore`` loads for ``openai/clip-vit-large-patch14``, only narrow.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    tokenizer = tokenizer or _clip_tokenizer(folder)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    with seeded(seed):
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # Random towers share an offset direction, so image-text cosines all have one sign. CLIP score
    # clamps negatives to 0; flip the text projection if needed so scores land in (0, 100) and differ.
    with torch.no_grad():
        image = processor(images=[torch.full((3, 32, 32), 128, dtype=torch.uint8)], return_tensors="pt")
        text = processor(text=["a photo"], return_tensors="pt", padding=True)
        img = model.get_image_features(image["pixel_values"])
        txt = model.get_text_features(text["input_ids"], text["attention_mask"])
        img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
        if torch.nn.functional.cosine_similarity(img, txt).item() < 0:
            model.text_projection.weight.neg_()
    processor.save_pretrained(folder)
    _record_added_tokens(folder, processor.tokenizer)
    model.save_pretrained(folder)
    return folder


def _record_added_tokens(folder: Path, tokenizer) -> None:
    """Write the tokenizer's ``added_tokens_decoder`` into ``tokenizer_config.json``, as the hub's CLIP
    folders have it. transformers 5 saves without it, and then parses the whole ``tokenizer.json``
    (3.6 MB for CLIP's vocabulary) in Python on every load to find the added tokens: 0.4 s of start-up."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {str(i): t.__getstate__() for i, t in tokenizer.added_tokens_decoder.items()}
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def build_tiny_autoencoder_tiny(folder: str | os.PathLike, seed: int = 0, latent_channels: int = 16, **_) -> Path:
    """Save a tiny random diffusers ``AutoencoderTiny`` (TAEF1-shaped: 16 latent channels, 8x) to ``folder``."""
    from diffusers import AutoencoderTiny

    with seeded(seed):
        model = AutoencoderTiny(
            latent_channels=latent_channels,
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        )
    model.save_pretrained(folder)
    return Path(folder)


_AUX_BUILDERS = {"clip": build_tiny_clip, "taef1": build_tiny_autoencoder_tiny}


def ensure_tiny_aux_folder(root: str | os.PathLike, name: str, seed: int = 0) -> Path:
    """Folder for ``tiny://<name>`` (``clip`` or ``taef1``) under ``root``, built once, atomically."""
    if name not in _AUX_BUILDERS:
        raise ValueError(f"tiny://{name} is unknown; use one of {['tiny://' + n for n in _AUX_BUILDERS]}")

    def build(tmp: Path) -> None:
        extra = {"tokenizer": _reusable_clip_tokenizer(Path(root))} if name == "clip" else {}
        _AUX_BUILDERS[name](tmp, seed, **extra)

    return build_folder_once(Path(root) / f"tiny-{name}-v{TINY_AUX_VERSION}-seed{seed}", build, marker="config.json")


def resolve_tiny_source(source: str, root: str | os.PathLike) -> str:
    """``tiny://<name>`` -> a locally built folder under ``root``; any other source is returned as is."""
    if source.startswith("tiny://"):
        return str(ensure_tiny_aux_folder(os.path.expanduser(root), source[len("tiny://") :]))
    return source
