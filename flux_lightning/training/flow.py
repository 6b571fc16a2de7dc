"""Flow-matching math for Flux, as pure tensor functions.

Conventions (docs/architecture.md, "Flux facts the math must match"):
    x0      clean VAE latents, ``(B, C, H, W)`` with C = 16 and H, W even
    noise   standard normal, same shape as ``x0``
    sigma   noise level in (0, 1), ``(B,)``; 1 means pure noise
    x_t     ``(1 - sigma) * x0 + sigma * noise``
    target  ``noise - x0`` (the velocity the transformer predicts)

Packing turns each 2x2 latent patch into one token: ``(B, C, H, W) -> (B, H/2 * W/2, 4C)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import Problem

# diffusers' FLUX scheduler config: base_image_seq_len 256, max_image_seq_len 4096,
# base_shift 0.5, max_shift 1.15.
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15

SCHNELL_FAST_SIGMAS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (B, (H/2)(W/2), 4C)``; each token is a 2x2 patch, channel-major."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_latents`; ``height``/``width`` are the latent (not pixel) sides."""
    b, seq, dim = tokens.shape
    if seq != (height // 2) * (width // 2):
        raise ValueError(f"{seq} tokens do not tile a {height}x{width} latent")
    c = dim // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, *, device=None, dtype=torch.float32, index: int = 0) -> torch.Tensor:
    """Position ids of the packed image tokens, ``(H/2 * W/2, 3)`` for a latent of ``height x width``.

    Channel 0 holds ``index`` (0 for the generated image; reference images use other values),
    channel 1 the token row, channel 2 the token column.
    """
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(length: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Text tokens carry no position in Flux's RoPE: zeros of shape ``(T, 3)``."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def joint_attention_mask(text_mask: torch.Tensor, image_tokens: int, batch_size: int) -> torch.Tensor:
    """The mask over the joint sequence ``[text, image]`` the Flux transformer attends over.

    Args:
        text_mask: ``(B, T)``, or ``(1, T)`` / ``(T,)`` for every sample alike: the T5 padding mask
            (nonzero = token; a masked text token influences no other token).
        image_tokens: N, the image (and reference) tokens after the text; always attended.
        batch_size: B.

    Returns:
        ``(B, T + N)`` bool on ``text_mask``'s device, for ``joint_attention_kwargs={"attention_mask": ...}``.
    """
    text = text_mask.bool().reshape(-1, text_mask.shape[-1]).expand(batch_size, -1)
    return torch.cat([text, torch.ones(batch_size, image_tokens, dtype=torch.bool, device=text.device)], dim=1)


def transformer_inputs(
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    *,
    dtype: torch.dtype,
    guidance: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    reference_latents: torch.Tensor | None = None,
) -> dict:
    """Keyword arguments of diffusers' ``FluxTransformer2DModel`` for noisy latents ``(B, 16, H, W)``.

    The image tokens are ``pack_latents(noisy)`` with ids ``(0, row, col)``; kontext's clean
    ``reference_latents`` ``(B, 16, H_r, W_r)`` follow as more tokens with ids ``(1, row, col)``;
    ``timestep = sigma`` (the model scales by 1000 itself); ``guidance`` ``(B,)`` only for
    transformers with a guidance embedding (None otherwise); ``attention_mask`` ``(B, T)``, the T5
    padding mask, becomes the joint ``[text, image]`` mask. Everything is cast to ``dtype``; the
    prediction's first ``H/2 * W/2`` tokens are the image's.
    """
    b, _, h, w = noisy.shape
    device = noisy.device
    tokens = pack_latents(noisy)
    ids = image_ids(h, w, device=device, dtype=dtype)
    if reference_latents is not None:
        rh, rw = reference_latents.shape[-2:]
        tokens = torch.cat([tokens, pack_latents(reference_latents.to(noisy.dtype))], dim=1)
        ids = torch.cat([ids, image_ids(rh, rw, device=device, dtype=dtype, index=1)], dim=0)
    joint = None
    if attention_mask is not None:
        joint = {"attention_mask": joint_attention_mask(attention_mask.to(device), tokens.shape[1], b)}
    return dict(
        hidden_states=tokens.to(dtype),
        timestep=sigmas.to(dtype),
        guidance=None if guidance is None else guidance.to(dtype),
        pooled_projections=pooled_prompt_embeds.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        txt_ids=text_ids(prompt_embeds.shape[1], device=device, dtype=dtype),
        img_ids=ids,
        joint_attention_kwargs=joint,
    )


def auto_shift(seq_len: int) -> float:
    """Resolution-dependent shift ``s = exp(mu)``, ``mu = m * seq_len + b`` (diffusers' calculate_shift)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    b = BASE_SHIFT - m * BASE_SEQ_LEN
    return math.exp(m * seq_len + b)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static shift ``sigma' = s * sigma / (1 + (s - 1) * sigma)``; s > 1 moves mass toward noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


WEIGHTINGS = ("sigmoid", "uniform", "schnell_fast")
# diffusers' SD3/Flux schemes (diffusers.training_utils): logit_normal and mode shape the sigma draw,
# cosmap and sigma_sqrt draw uniformly and weight each sample's loss.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))  # where the SD3 paper's f_mode is monotone


@dataclass
class TimestepConfig:
    """How training draws sigma.

    Attributes:
        weighting: ``sigmoid`` draws ``sigmoid(scale * N(0, 1))``; ``uniform`` draws U(0, 1);
            ``schnell_fast`` draws from ``{1.0 x7, 0.75, 0.5, 0.25}`` without shift; null = the
            flavour's own (``schnell_fast`` for schnell, else ``sigmoid``; see :meth:`for_flavour`).
        sigmoid_scale: the ``scale`` of the sigmoid draw (quickstart: ``flow_sigmoid_scale``).
        flow_schedule_shift: static shift ``s``; 1.0 (or null) means no shift.
        flow_schedule_auto_shift: use the resolution-dependent shift instead of the static one.
        force_schedule: allow a schedule other than the flavour's own (schnell trains with
            ``schnell_fast``; an explicit other ``weighting`` is refused unless this is true).
        weighting_scheme: ``none`` (default) draws sigma by ``weighting``; any other scheme replaces
            that draw with diffusers' ``compute_density_for_timestep_sampling`` (its ``u`` is used as
            sigma, the SD3 paper's t) and the shifts still apply: ``logit_normal`` draws
            ``sigmoid(N(logit_mean, logit_std))``, ``mode`` the SD3 paper's mode density
            (``mode_scale``), ``cosmap`` and ``sigma_sqrt`` draw U(0, 1) and weight each sample's loss by
            ``compute_loss_weighting_for_sd3`` (``2 / (pi (1 - 2 sigma + 2 sigma^2))`` resp.
            ``sigma^-2``). It excludes an explicit ``weighting`` (leave that null).
        logit_mean: the mean of ``logit_normal``'s normal draw (> 0 moves mass toward noise).
        logit_std: its standard deviation (> 0).
        mode_scale: ``mode``'s scale s, within [-1, 2/(pi-2)] (0 = uniform; SD3 used 1.29).
    """

    weighting: str | None = None
    sigmoid_scale: float = 1.0
    flow_schedule_shift: float | None = None
    flow_schedule_auto_shift: bool = False
    force_schedule: bool = False
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def problems(self) -> list[Problem]:
        """An unknown ``weighting`` or ``weighting_scheme``, both chosen at once, a sigmoid scale or shift
        that is not a positive number, a bad ``logit_std`` / ``mode_scale``."""
        out = []
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            out.append(
                Problem(
                    "timesteps.weighting_scheme",
                    f"timesteps.weighting_scheme={self.weighting_scheme!r} is unknown; use {', '.join(WEIGHTING_SCHEMES)}",
                )
            )
        elif self.weighting_scheme != "none" and self.weighting is not None:
            out.append(
                Problem(
                    "timesteps.weighting",
                    f"timesteps.weighting={self.weighting} and timesteps.weighting_scheme={self.weighting_scheme} both "
                    "choose how sigma is drawn; keep one (timesteps.weighting=null or timesteps.weighting_scheme=none)",
                )
            )
        if not self.logit_std > 0:
            out.append(
                Problem(
                    "timesteps.logit_std",
                    f"timesteps.logit_std={self.logit_std} must be > 0; e.g. timesteps.logit_std=1.0",
                )
            )
        if not math.isfinite(self.logit_mean):
            out.append(
                Problem(
                    "timesteps.logit_mean", f"timesteps.logit_mean={self.logit_mean} must be a finite number; e.g. 0.0"
                )
            )
        lo, hi = MODE_SCALE_RANGE
        if not lo <= self.mode_scale <= hi:
            out.append(
                Problem(
                    "timesteps.mode_scale",
                    f"timesteps.mode_scale={self.mode_scale} must lie in [{lo}, {hi:.3f}] (the mode density is "
                    "monotone there); e.g. timesteps.mode_scale=1.29",
                )
            )
        if self.weighting not in (None, *WEIGHTINGS):
            out.append(
                Problem(
                    "timesteps.weighting",
                    f"timesteps.weighting={self.weighting!r} is unknown; use {', '.join(WEIGHTINGS)} or null",
                )
            )
        if not self.sigmoid_scale > 0:
            out.append(
                Problem(
                    "timesteps.sigmoid_scale",
                    f"timesteps.sigmoid_scale={self.sigmoid_scale} must be > 0; e.g. timesteps.sigmoid_scale=1.0",
                )
            )
        if self.flow_schedule_shift is not None and not self.flow_schedule_shift > 0:
            out.append(
                Problem(
                    "timesteps.flow_schedule_shift",
                    f"timesteps.flow_schedule_shift={self.flow_schedule_shift} must be > 0 (1.0 = no shift); "
                    "e.g. timesteps.flow_schedule_shift=3.0",
                )
            )
        return out

    def for_flavour(self, fast_schedule: bool) -> TimestepConfig:
        """This config with ``weighting`` resolved: null becomes the flavour's own schedule
        (``schnell_fast`` when ``fast_schedule``, else ``sigmoid``); with a ``weighting_scheme`` it stays
        null (the scheme draws sigma)."""
        if self.weighting is not None or self.weighting_scheme != "none":
            return self
        return replace(self, weighting="schnell_fast" if fast_schedule else "sigmoid")


def sample_sigmas(
    batch_size: int,
    config: TimestepConfig,
    *,
    seq_len: int,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Draw ``(batch_size,)`` sigmas in (0, 1] following ``config``; ``seq_len`` feeds the auto shift.

    Without a ``generator`` the draw happens on ``device`` itself (no host-to-device copy, so no
    sync in the training hot path); with one, on the generator's device, then moved.
    """
    draw = dict(generator=generator, device=generator.device if generator is not None else device)
    if config.weighting_scheme != "none":
        from diffusers.training_utils import compute_density_for_timestep_sampling

        sigmas = compute_density_for_timestep_sampling(
            config.weighting_scheme, batch_size, config.logit_mean, config.logit_std, config.mode_scale, **draw
        )
        return shift_like_training(sigmas, config, seq_len).to(device)
    weighting = config.weighting or "sigmoid"  # unresolved (no flavour known here): the usual schedule
    if weighting == "schnell_fast":
        idx = torch.randint(len(SCHNELL_FAST_SIGMAS), (batch_size,), **draw)
        # SCHNELL_FAST_SIGMAS[idx] computed on idx's device: 1.0 for idx < 7, then 0.75, 0.5, 0.25
        return torch.where(idx < 7, 1.0, 0.25 * (10 - idx).float()).to(device)
    if weighting == "sigmoid":
        sigmas = torch.sigmoid(config.sigmoid_scale * torch.randn(batch_size, **draw))
    elif weighting == "uniform":
        sigmas = torch.rand(batch_size, **draw)
    else:
        raise ValueError(f"timesteps.weighting={config.weighting!r} is unknown; use sigmoid, uniform or schnell_fast")
    return shift_like_training(sigmas, config, seq_len).to(device)


def shift_like_training(sigmas: torch.Tensor, config: TimestepConfig, seq_len: int) -> torch.Tensor:
    """Apply the shift training uses: the auto shift for ``seq_len`` tokens, else the static shift
    (none for ``schnell_fast``, whose sigmas are used as drawn)."""
    if config.weighting == "schnell_fast":
        return sigmas
    if config.flow_schedule_auto_shift:
        return shift_sigmas(sigmas, auto_shift(seq_len))
    if config.flow_schedule_shift not in (None, 1.0):
        return shift_sigmas(sigmas, float(config.flow_schedule_shift))
    return sigmas


def loss_weights(config: TimestepConfig, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights ``(B,)`` of ``config.weighting_scheme`` at ``sigmas`` (diffusers'
    ``compute_loss_weighting_for_sd3``), or None where every weight is 1 (the loss is left as it is)."""
    if config.weighting_scheme not in ("cosmap", "sigma_sqrt"):
        return None
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(config.weighting_scheme, sigmas.float())


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) * x0 + sigma * noise`` with one sigma per sample."""
    s = _per_sample(sigmas, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity ``noise - x0`` that the transformer learns to predict."""
    return noise - x0


LOSS_TYPES = ("l2", "huber", "smooth_l1")


@dataclass
class LossConfig:
    """The per-element training loss (SimpleTuner's ``loss_type`` / ``huber_c``).

    Attributes:
        loss_type: ``l2`` (default) the squared error ``d^2``, ``d = pred - target``; ``huber`` the
            pseudo-Huber loss ``2c (sqrt(d^2 + c^2) - c)`` (about ``d^2`` for ``|d| << c``, ``2c|d|``
            beyond: outliers pull less); ``smooth_l1`` ``2 (sqrt(d^2 + c^2) - c)`` (``d^2 / c`` near
            0, ``2|d|`` beyond).
        huber_c: ``c``, where the loss turns from quadratic to linear (> 0; SimpleTuner's default 0.1).
            Constant over sigma (SimpleTuner's ``huber_schedule: constant``).
    """

    loss_type: str = "l2"
    huber_c: float = 0.1

    def problems(self) -> list[Problem]:
        out = []
        if self.loss_type not in LOSS_TYPES:
            out.append(
                Problem("loss.loss_type", f"loss.loss_type={self.loss_type!r} is unknown; use {', '.join(LOSS_TYPES)}")
            )
        if not (isinstance(self.huber_c, (int, float)) and math.isfinite(self.huber_c) and self.huber_c > 0):
            out.append(
                Problem("loss.huber_c", f"loss.huber_c={self.huber_c} must be a number > 0; e.g. loss.huber_c=0.1")
            )
        return out


def flow_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    loss: LossConfig | None = None,
) -> torch.Tensor:
    """The per-element loss of ``loss`` (default: squared error) in fp32, averaged per sample.

    ``mask`` (broadcastable to ``pred``, values in [0, 1]) multiplies the per-element loss.
    Returns the per-sample losses ``(B,)``; call ``.mean()`` for the batch loss.
    """
    if loss is None or loss.loss_type == "l2":
        err = (pred.float() - target.float()) ** 2
    else:
        c = float(loss.huber_c)
        root = torch.sqrt((pred.float() - target.float()) ** 2 + c * c) - c
        err = 2 * c * root if loss.loss_type == "huber" else 2 * root
    if mask is not None:
        err = err * mask.float()
    return err.flatten(1).mean(dim=1)
