"""Train the toy world's text-to-image latent diffusion model (``dreamflow toyworld train``), from
scratch or on from an earlier model (``init_from``), resumable from its newest checkpoint.

The result is a diffusers ``StableDiffusionPipeline`` folder, laid out and loaded exactly like
Stable Diffusion 2.x base (priors/latent_diffusion.py loads it through the same from_pretrained):

- ``vae``: a small AutoencoderKL, 64 px images -> 16 x 16 x 4 latents (downsampling 4, where SD's
  is 8: a 64 px image at 8x would leave an 8 x 8 latent, too coarse for a torus's hole), trained
  first on the renders with an L2 reconstruction loss and SD's small KL weight; its
  ``scaling_factor`` is 1 / std of the training latents, as SD's 0.18215 is.
- ``text_encoder``: a small CLIPTextModel (width 32, 2 layers) under the real CLIP BPE tokenizer
  (priors/tiny.clip_tokenizer), trained jointly with the UNet (SD's is pretrained and frozen; ours
  has no pretraining to lean on).
- ``unet``: UNet2DConditionModel on the latents, cross-attention on the two finer levels.
- ``scheduler``: DDPMScheduler configured like SD 2.x (scaled_linear 0.00085..0.012, 1000 steps),
  epsilon prediction.

Data (training_set): colour renders of the 36 objects, of the oriented objects (front-biased, the
view only sometimes in the caption) and normal maps of every shape (captioned ", normal map"), see
dataset.py. Captions: the prompt with the view suffix of the image's camera (what the pipeline conditions
stage-1 renders on), the bare prompt for a quarter of the images (what a 2D sample without a
camera is conditioned on), and the empty caption for a tenth (classifier-free guidance).
Everything is seeded: the same command gives the same folder. bf16 autocast on the CPU (measured
about 2x on SD-sized UNets); the weights stay float32 during training and are saved as float16 to
keep the shipped folder small (they load back as float32).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..devices import cpu_has_native_bf16
from ..scene.cameras import CameraRanges
from .dataset import TOY_CAMERAS, ToyImages, render_dataset
from .world import ALL_PROMPTS, ALL_SHAPES, MARKER_FILE, ORIENTED_SHAPES

IMAGE_SIZE = 64
#: The training state beside the newest checkpoint's weights (what ``train(..., resume=True)`` reads).
STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """What ``dreamflow toyworld train`` does; every field has a CLI flag."""

    seed: int = 0
    views_per_object: int = 256
    oriented_views: int = 96          # per oriented object (world.ORIENTED_SHAPES x 6 colours)
    normal_views: int = 24            # normal maps per object, of every shape (dataset.render_dataset)
    vae_steps: int = 500
    vae_batch: int = 32
    vae_lr: float = 2e-3
    steps: int = 2500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    # An averaging window of ~500 steps: long enough to smooth the last stretch of the cosine decay,
    # short enough not to hold the early, untrained weights (0.998^2000 = 0.02 of the mass).
    ema_decay: float = 0.998
    plain_caption: float = 0.25       # share of bare prompts (no view suffix)
    empty_caption: float = 0.10       # share of empty captions (classifier-free guidance)
    min_snr_gamma: float = 5.0        # Min-SNR loss weighting (Hang et al. 2023): faster convergence
    checkpoint_every: int = 200
    bf16: bool = True


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_attention_heads=4,
                                        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE)


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 96, 128), norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         prediction_type="epsilon", steps_offset=1, clip_sample=False)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def save_pipeline(folder: Path, vae, text_encoder, unet, extra: dict | None = None) -> Path:
    """Write a StableDiffusionPipeline folder (float16 weights) at ``folder``, replacing it whole."""
    from diffusers import StableDiffusionPipeline

    from ..priors.tiny import clip_tokenizer

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    if extra is not None:
        (tmp / MARKER_FILE).write_text(json.dumps(extra, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def training_set(cfg: TrainConfig, resolution: int = IMAGE_SIZE, ranges: CameraRanges = TOY_CAMERAS,
                 log: Callable[[str], None] = print) -> ToyImages:
    """The 36 objects' colour renders, the oriented objects' (front-biased) and every shape's normal maps."""
    parts = []
    for what, views, seed, shapes, normal in (("the 36 objects", cfg.views_per_object, cfg.seed, None, False),
                                                ("the oriented objects", cfg.oriented_views, cfg.seed + 1000,
                                                 ORIENTED_SHAPES, False),
                                                ("normal maps", cfg.normal_views, cfg.seed + 2000, ALL_SHAPES, True)):
        if views == 0:
            continue
        t0 = time.time()
        kwargs = {} if shapes is None else {"shapes": shapes}
        parts.append(render_dataset(views, resolution, seed, ranges, normal_maps=normal, **kwargs))
        log(f"rendered {len(parts[-1])} images of {what} at {resolution} px in {time.time() - t0:.0f} s")
    return ToyImages.concat(parts)


def cached_training_set(cfg: TrainConfig, cache: str | Path, ranges: CameraRanges = TOY_CAMERAS,
                        log: Callable[[str], None] = print) -> ToyImages:
    """training_set(cfg), read from ``cache`` when it holds the same set, else rendered and written there
    (rendering is most of a short run's time on a CPU; a resumed run needs the same images again)."""
    cache = Path(cache)
    key = {"seed": cfg.seed, "views_per_object": cfg.views_per_object, "oriented_views": cfg.oriented_views,
           "normal_views": cfg.normal_views, "image_size": IMAGE_SIZE, "ranges": asdict(ranges)}
    if cache.is_file():
        stored = torch.load(cache, weights_only=False)  # our own file: a ToyImages and its key
        if stored["key"] == key:
            log(f"{len(stored['data'])} training images from {cache}")
            return stored["data"]
        log(f"{cache} holds another training set ({stored['key']}); rendering this one")
    data = training_set(cfg, IMAGE_SIZE, ranges, log)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "data": data}, cache)
    return data


def _captions(data: ToyImages, idx: torch.Tensor, gen: torch.Generator, cfg: TrainConfig) -> list[str]:
    u = torch.rand(len(idx), generator=gen).tolist()
    out = []
    for i, r in zip(idx.tolist(), u):
        if r < cfg.empty_caption:
            out.append("")
        elif r < cfg.empty_caption + cfg.plain_caption:
            out.append(data.plain_captions[i])
        else:
            out.append(data.captions[i])
    return out


def train_vae(data: torch.Tensor, cfg: TrainConfig, log: Callable[[str], None]):
    """The autoencoder, trained on images in [-1, 1] (N, 3, H, W)."""
    torch.manual_seed(cfg.seed)
    vae = _vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    t0 = time.time()
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, 50)
        x = data[torch.randint(0, data.shape[0], (cfg.vae_batch,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            rec = vae.decode(z).sample
        mse = F.mse_loss(rec.float(), x)
        loss = mse + 1e-6 * post.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            el = time.time() - t0
            log(f"vae step {step + 1}/{cfg.vae_steps}  mse {mse.item():.5f}  {el / (step + 1):.2f} s/step  "
                f"eta {el / (step + 1) * (cfg.vae_steps - step - 1) / 60:.1f} min")
    return vae.eval()


@torch.no_grad()
def encode_all(vae, data: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Posterior means of every image (what LatentDiffusionPrior.encode computes), unscaled."""
    out = []
    for i in range(0, data.shape[0], 128):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(vae.encode(data[i:i + 128]).latent_dist.mean.float())
    return torch.cat(out)


def _latest_state(out: Path) -> Path | None:
    """The newest ``out/checkpoints/step-N/train_state.pt``, or None."""
    states = [p for p in (out / "checkpoints").glob(f"step-*/{STATE_FILE}") if p.parent.name[5:].isdigit()]
    return max(states, key=lambda p: int(p.parent.name[5:]), default=None)


def train(out: str | Path, cfg: TrainConfig = TrainConfig(), ranges: CameraRanges = TOY_CAMERAS,
          log: Callable[[str], None] = print, vae_from: str | Path | None = None,
          init_from: str | Path | None = None, resume: bool = False, data: ToyImages | None = None) -> Path:
    """Train the model (from scratch, or fine-tune ``init_from``); the finished pipeline folder is ``out/generator``.

    Checkpoints (complete, loadable pipeline folders of the EMA weights) go to
    ``out/checkpoints/step-N`` every ``checkpoint_every`` steps, so a partial run is usable; the newest
    one also holds the training state (live weights, EMA, optimiser, random generator), from which
    ``resume`` continues the same run exactly where it stopped.
    ``vae_from``: a pipeline folder of an earlier run whose VAE is reused instead of trained (the
    VAE goes through float16 either way, as it is shipped, so both paths give the same latents).
    ``init_from``: a pipeline folder of an earlier run (same architecture) whose VAE, latent scale,
    UNet and text encoder are the starting point. ``data``: the rendered training set
    (training_set(cfg)), when it was rendered already.
    """
    from ..priors.tiny import clip_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if cfg.bf16 and not cpu_has_native_bf16():
        # Emulated bf16 (AVX2-only CPUs) is ~70x slower than float32: hours instead of minutes.
        log("this CPU has no bf16 instructions (bf16 would run ~70x slower than float32): training in float32")
        cfg = replace(cfg, bf16=False)
    state_file = _latest_state(out) if resume else None
    if resume and state_file is None:
        raise FileNotFoundError(f"nothing to resume in {out}: no checkpoints/step-N/{STATE_FILE}")
    if data is None:
        data = training_set(cfg, IMAGE_SIZE, ranges, log)
    images = data.float_images() * 2.0 - 1.0
    vae_from = init_from if vae_from is None else vae_from
    if vae_from is not None:
        from diffusers import AutoencoderKL

        log(f"{len(data)} training images; reusing the VAE of {vae_from}")
        vae = AutoencoderKL.from_pretrained(str(vae_from), subfolder="vae", torch_dtype=torch.float32).eval()
    else:
        log(f"{len(data)} training images; training the VAE ({cfg.vae_steps} steps)")
        vae = train_vae(images, cfg, log)
    vae = vae.half().float()  # the shipped (float16) weights are the ones the latents come from
    latents = encode_all(vae, images, cfg.bf16)
    # A fine-tuned model keeps its latent scale: the UNet learnt latents of that spread.
    scale = float(vae.config.scaling_factor) if init_from is not None else float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    log(f"latents {tuple(latents.shape[1:])}, scaling factor {scale:.4f}; training the UNet and text encoder "
        f"({cfg.steps} steps, batch {cfg.batch})")

    torch.manual_seed(cfg.seed + 2)
    if init_from is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(str(init_from), subfolder="text_encoder", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(str(init_from), subfolder="unet", torch_dtype=torch.float32)
    else:
        text_encoder = _text_encoder()
        unet = _unet()
    # Plain batched-matmul attention while training: with these small heads (dim 8-16) on a CPU,
    # SDPA's flash kernel spent 70 % of a step in its backward; unfused, a step is ~25 % faster.
    # Only the training processors change: the saved folder loads with diffusers' defaults.
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())
    sched = _scheduler()
    tokenizer = clip_tokenizer()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    abar = sched.alphas_cumprod.float()
    snr = abar / (1.0 - abar)
    weight = (snr.clamp(max=cfg.min_snr_gamma) / snr) if cfg.min_snr_gamma > 0 else torch.ones_like(snr)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    meta = {"config": asdict(cfg), "prompts": list(ALL_PROMPTS), "image_size": IMAGE_SIZE,
            "camera_ranges": asdict(ranges), "init_from": None if init_from is None else str(init_from),
            "images": len(data)}
    first, running = 0, None
    if state_file is not None:
        state = torch.load(state_file, weights_only=True)
        with torch.no_grad():
            for p, v, e, ve in zip(params, state["params"], ema, state["ema"]):
                p.copy_(v)
                e.copy_(ve)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        first, running = int(state["step"]), float(state["running"])
        log(f"resuming from {state_file.parent} (step {first})")

    def save(folder: Path, step: int, loss: float) -> None:
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        save_pipeline(folder, vae, text_encoder, unet,
                      {**meta, "step": step, "ema_loss": loss, "train_seconds": round(time.time() - t_start, 1)})
        with torch.no_grad():
            for p, v in zip(params, live):
                p.copy_(v)

    def save_state(folder: Path, step: int) -> None:
        # Only the newest checkpoint keeps the (large: weights, EMA, two Adam moments) training state.
        for old in (out / "checkpoints").glob(f"step-*/{STATE_FILE}"):
            old.unlink()
        torch.save({"step": step, "running": running, "params": [p.detach() for p in params], "ema": ema,
                    "optimizer": opt.state_dict(), "generator": gen.get_state()}, folder / STATE_FILE)

    t0 = time.time()
    for step in range(first, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup)
        idx = torch.randint(0, latents.shape[0], (cfg.batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        ids = tokenizer(_captions(data, idx, gen, cfg), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            cond = text_encoder(ids)[0]
            pred = unet(xt, t, encoder_hidden_states=cond).sample
        per = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1.0 - d)
        mse = per.mean().item()
        running = mse if running is None else 0.98 * running + 0.02 * mse
        if step % 25 == 0 or step == cfg.steps - 1:
            el = time.time() - t0
            done = step + 1 - first
            log(f"step {step + 1}/{cfg.steps}  loss {running:.4f}  {el / done:.2f} s/step  "
                f"eta {el / done * (cfg.steps - step - 1) / 60:.1f} min")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            folder = out / "checkpoints" / f"step-{step + 1}"
            save(folder, step + 1, running)
            save_state(folder, step + 1)
            log(f"checkpoint {folder}")
    final = out / "generator"
    save(final, cfg.steps, running)
    log(f"done in {(time.time() - t_start) / 60:.1f} min; final loss (eps MSE, running mean) {running:.4f} -> {final}")
    return final
