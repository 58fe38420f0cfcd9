"""Score models of the renders, ``D_phi``: the exact empirical one, a small learned one, the LoRA one.

``EmpiricalScoreModel`` is exact: the denoiser of the empirical distribution of the current
renders (particles), each smoothed by a Gaussian kernel of width ``std``. The kernel width is a
setting and decides a lot: the fixed point of a particle method against it is the data smoothed
by a kernel of that width, so a kernel as wide as the data's own modes puts every particle on a
mode centre (collapse passes for success); keep it well below the data's scale.
``LearnedScoreModel`` is a small network trained from scratch with the denoising loss on the
renders (ProlificDreamer's 2D experiment trains a small U-Net so), the approximate ``D_phi`` of
practice on a problem small enough for a CPU. ``LoraScoreModel`` is the practical one
(ProlificDreamer, DreamFlow): a LoRA adapter on the prior's own UNet, trained with the
denoising loss on the renders.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch

from ..devices import upload
from ..scene.cameras import Cameras
from .base import Conditioning, ScoreModel, as_sigma
from .gmm import mixture_denoise


class EmpiricalScoreModel(ScoreModel):
    """Exact denoiser of ``(1/P) sum_j N(x_j, std^2 I)`` over the current renders ``x_j``.

    The current batch (``x_clean`` in :meth:`denoise`) always takes part. With ``memory > 0`` the
    model also keeps the last ``memory`` renders passed to :meth:`update` (the loop calls it,
    since the model is then ``trainable``), so that a 3D run with one view per step still sees a
    distribution of renders, not a single point.
    """

    def __init__(self, std: float, memory: int = 0):
        if std <= 0:
            raise ValueError("the kernel width std must be positive")
        self.std = float(std)
        self.memory = int(memory)
        self.trainable = self.memory > 0
        self.bank: torch.Tensor | None = None

    def update(self, x, sigma, cond, cameras=None):
        """Remember the detached renders (first in, first out); nothing is learned."""
        if self.memory <= 0:
            return 0.0
        x = x.detach()
        self.bank = x if self.bank is None else torch.cat([x, self.bank.to(x.device, x.dtype)])
        self.bank = self.bank[: self.memory]
        return 0.0

    def denoise(self, x_noisy, sigma, cond, cameras=None, x_clean=None):
        """Exact denoiser of the kernel-smoothed empirical distribution of the renders."""
        parts = [p for p in (x_clean, self.bank) if p is not None]
        if not parts:
            raise ValueError("EmpiricalScoreModel needs the current renders (x_clean) or a filled memory")
        particles = torch.cat([p.detach().to(x_noisy.device, x_noisy.dtype) for p in parts])
        log_w = torch.zeros(particles.shape[0], dtype=torch.float64)
        return mixture_denoise(x_noisy, torch.as_tensor(sigma), particles, log_w, self.std)

    def state_dict(self):
        """The memory of renders (empty without memory)."""
        return {} if self.bank is None else {"bank": self.bank.clone()}

    def load_state_dict(self, state):
        """Restore the memory."""
        self.bank = state.get("bank")


class LearnedScoreModel(ScoreModel):
    """``D_phi`` as a small MLP denoiser of flattened renders, trained by denoising score matching.

    EDM preconditioning around the first batch's mean ``m`` and std ``s_d`` (the renders'
    normalisation, fixed from then on): ``D = m + c_skip (x - m) + c_out F(c_in (x - m), log sigma)``
    with ``c_skip = s_d^2 / (sigma^2 + s_d^2)``, ``c_out = sigma s_d / sqrt(sigma^2 + s_d^2)``,
    ``c_in = 1 / sqrt(sigma^2 + s_d^2)``. The last layer starts at zero, so an untrained model is
    the denoiser of a Gaussian with the renders' first two moments. Each :meth:`update` takes
    ``updates`` AdamW steps of the loss ``||F - (x - m - c_skip (x_noisy - m)) / c_out||^2`` at the
    loop's noise level (v-prediction is this loss with ``s_d = 1``): the LoRA's training, on a
    network that knows nothing of the prior.
    """

    trainable = True

    def __init__(self, hidden: int = 256, lr: float = 1e-3, updates: int = 1, seed: int = 0):
        if hidden < 1 or updates < 1 or lr <= 0:
            raise ValueError("LearnedScoreModel needs hidden >= 1, updates >= 1 and lr > 0")
        self.hidden = int(hidden)
        self.lr = float(lr)
        self.updates = int(updates)
        self.seed = int(seed)
        self.net: torch.nn.Module | None = None
        self.optimiser: torch.optim.Optimizer | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.centre = 0.0
        self.scale = 1.0
        self.freqs = torch.arange(1, 9, dtype=torch.float32)

    def _build(self, dim: int, device: torch.device) -> None:
        with torch.random.fork_rng(devices=[]):  # the network's own initial weights, per seed
            torch.manual_seed(self.seed)
            self.net = torch.nn.Sequential(torch.nn.Linear(dim + 2 * len(self.freqs), self.hidden), torch.nn.SiLU(),
                                           torch.nn.Linear(self.hidden, self.hidden), torch.nn.SiLU(),
                                           torch.nn.Linear(self.hidden, dim)).to(device)
        torch.nn.init.zeros_(self.net[4].weight)
        torch.nn.init.zeros_(self.net[4].bias)
        self.optimiser = torch.optim.AdamW(self.net.parameters(), lr=self.lr)

    def _start(self, x: torch.Tensor) -> None:
        """Build the network for renders like ``x`` and fix the normalisation from them."""
        self._build(x[0].numel(), x.device)
        self.centre = float(x.mean())
        self.scale = max(float(x.std()), 1e-3)

    def _raw(self, x_noisy: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(F, c_skip, c_out) for flattened inputs; ``s`` is (B, 1)."""
        sd2 = self.scale * self.scale
        c_in = 1.0 / torch.sqrt(s * s + sd2)
        c_skip = sd2 / (s * s + sd2)
        c_out = s * self.scale / torch.sqrt(s * s + sd2)
        angle = torch.log(s) * self.freqs.to(s.device)[None] / 4.0
        feats = torch.cat([(x_noisy - self.centre) * c_in, torch.sin(angle), torch.cos(angle)], dim=1)
        assert self.net is not None
        return self.net(feats), c_skip, c_out

    def denoise(self, x_noisy, sigma, cond, cameras=None, x_clean=None):
        """The network's clean estimate (the untrained Gaussian denoiser before the first update)."""
        if self.net is None:
            self._start(x_clean if x_clean is not None else x_noisy)
        b = x_noisy.shape[0]
        flat = x_noisy.reshape(b, -1).float()
        s = as_sigma(sigma, flat).reshape(b, 1).float()
        with torch.no_grad():
            raw, c_skip, c_out = self._raw(flat, s)
            d = self.centre + c_skip * (flat - self.centre) + c_out * raw
        return d.reshape(x_noisy.shape).to(x_noisy.dtype)

    def update(self, x, sigma, cond, cameras=None):
        """``updates`` denoising-loss steps on the detached renders at noise ``sigma``; the last loss."""
        x = x.detach().float()
        if self.net is None:
            self._start(x)
        assert self.optimiser is not None
        b = x.shape[0]
        flat = x.reshape(b, -1)
        s = as_sigma(sigma, flat).reshape(b, 1).float()
        loss = torch.zeros(())
        for _ in range(self.updates):
            n = upload(torch.randn(flat.shape, generator=self.generator), flat.device)
            noisy = flat + s * n
            with torch.enable_grad():
                raw, c_skip, c_out = self._raw(noisy, s)
                target = (flat - self.centre - c_skip * (noisy - self.centre)) / c_out
                loss = torch.nn.functional.mse_loss(raw, target)
                self.optimiser.zero_grad(set_to_none=True)
                loss.backward()
                self.optimiser.step()
        return loss.detach()

    def state_dict(self):
        """Network, optimiser, normalisation and noise generator (empty before the first call)."""
        if self.net is None:
            return {}
        assert self.optimiser is not None
        return {"net": copy.deepcopy(self.net.state_dict()), "optimiser": copy.deepcopy(self.optimiser.state_dict()),
                "centre": self.centre, "scale": self.scale, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        """Restore what state_dict() returned."""
        if not state:
            return
        if self.net is None:
            self._build(state["net"]["4.weight"].shape[0], torch.device("cpu"))
        assert self.net is not None and self.optimiser is not None
        self.net.load_state_dict(state["net"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.centre, self.scale = float(state["centre"]), float(state["scale"])
        self.generator.set_state(state["generator"])


class CameraEmbedding(torch.nn.Module):
    """ProlificDreamer's camera condition: 2-layer MLP of the 4x4 camera matrix -> time embedding.

    The last layer starts at zero, so the LoRA model starts as the pretrained model exactly.
    """

    def __init__(self, out_dim: int, hidden: int = 256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, out_dim))
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)

    def forward(self, cameras: Cameras) -> torch.Tensor:
        """(B, out_dim) embeddings of the cameras."""
        return self.net(cameras.to_matrix_features().to(self.net[0].weight.device))


class LoraScoreModel(ScoreModel):
    """``D_phi``: a LoRA adapter (peft) on a latent diffusion UNet, trained on the renders.

    Layout: with ``phi_base`` None (or the prior itself) the adapter goes on the prior's own UNet
    (one UNet in memory); it is switched on only inside this model's calls, so the prior always
    denoises with the pretrained weights. DreamFlow's ``phi`` base differs from ``p`` (SD 2.1-v
    vs SD 2.1-base); pass that model as ``phi_base`` (loaded with ``load_vae=False``) and the
    adapter goes on its UNet instead, at the cost of a second UNet and text encoder in memory
    (about 1.7 GB + 0.7 GB in float16 for SD 2.1). The optional camera embedding is added to the
    UNet's time embedding by a forward hook that is active only while ``D_phi`` runs. Training:
    the denoising loss of the base's own parameterisation (epsilon or v) on the renders, with its
    own AdamW optimiser; denoising uses the conditional model (guidance 1), as ProlificDreamer.
    """

    trainable = True

    def __init__(self, prior: Any, phi_base: Any | None = None, rank: int = 4, lr: float = 1e-3,
                 camera_embedding: bool = False, seed: int = 0, adapter_name: str = "dreamflow_phi"):
        from peft import LoraConfig

        self.prior = prior
        self.base = phi_base if phi_base is not None else prior
        self.adapter_name = adapter_name
        unet = self.base.unet
        if adapter_name in (getattr(unet, "peft_config", None) or {}):
            unet.delete_adapters(adapter_name)  # a new job on a cached prior starts a fresh adapter
        with warnings.catch_warnings():
            # One adapter per stage on a shared UNet is the design, not an accident.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=adapter_name)
        self.lora_params = {n: p for n, p in unet.named_parameters() if f".{adapter_name}." in n}
        if not self.lora_params:
            raise RuntimeError("peft added no LoRA parameters to the UNet (no attention projections found)")
        for p in self.lora_params.values():
            p.data = p.data.float()  # train the adapter in float32 even when the UNet is float16
        params = list(self.lora_params.values())
        self.camera: CameraEmbedding | None = None
        if camera_embedding:
            self.camera = CameraEmbedding(unet.time_embedding.linear_2.out_features).to(self.base.device)
            params += list(self.camera.parameters())
        self._hook = unet.time_embedding.register_forward_hook(self._add_camera) if camera_embedding else None
        self._camera_emb: torch.Tensor | None = None
        self.optimiser = torch.optim.AdamW(params, lr=lr)
        # Under a float16 UNet (GPUs without bf16) the update's gradients run back through fp16
        # activations, where the denoising loss's small gradients underflow: scale the loss
        # dynamically. bf16 has float32's range and needs none (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(self.base.device.type,
                                           enabled=getattr(self.base, "dtype", None) == torch.float16)
        self.generator = torch.Generator().manual_seed(seed)
        self._phi_cond: dict[tuple[str, str], Conditioning] = {}
        unet.disable_adapters()

    def close(self) -> None:
        """Take the adapter and the camera hook off the UNet (the prior stays as loaded)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        unet = self.base.unet
        if self.adapter_name in (getattr(unet, "peft_config", None) or {}):
            unet.delete_adapters(self.adapter_name)

    def _add_camera(self, module, inputs, output):
        if self._camera_emb is None:
            return output
        return output + self._camera_emb.to(output.dtype)

    @contextlib.contextmanager
    def _active(self, cameras: Cameras | None, repeat: int = 1):
        """Adapter (and camera embedding) on inside, off again on the way out."""
        unet = self.base.unet
        unet.enable_adapters()
        unet.set_adapter(self.adapter_name)
        if self.camera is not None and cameras is not None:
            self._camera_emb = self.camera(cameras).repeat(repeat, 1)
        try:
            yield
        finally:
            self._camera_emb = None
            unet.disable_adapters()

    def _embeds(self, cond: Conditioning, batch: int, cameras: Cameras | None) -> dict[str, torch.Tensor]:
        if cond.data.get("prior") != id(self.base):
            key = (cond.prompt, cond.negative_prompt)
            if key not in self._phi_cond:
                self._phi_cond[key] = self.base.condition(cond.prompt, cond.negative_prompt, 1.0)
            cond = self._phi_cond[key]
        return self.base.cond_embeds(cond, batch, cameras)

    @torch.no_grad()
    def denoise(self, x_noisy, sigma, cond, cameras=None, x_clean=None):
        """The adapted UNet's conditional clean estimate."""
        embeds = self._embeds(cond, x_noisy.shape[0], cameras)
        with self._active(cameras):
            return self.base.denoiser(x_noisy, sigma, embeds).to(x_noisy.dtype)

    def update(self, x, sigma, cond, cameras=None):
        """One denoising-loss step of the adapter (and camera MLP) on the detached renders."""
        x = x.detach().float()
        s = as_sigma(sigma, x).reshape(-1).float()
        n = upload(torch.randn(x.shape, generator=self.generator), x.device)
        x_noisy = x + as_sigma(s, x) * n
        embeds = self._embeds(cond, x.shape[0], cameras)
        with torch.enable_grad(), self._active(cameras):
            raw = self.base.denoiser.raw(x_noisy, s, embeds)
            loss = torch.nn.functional.mse_loss(raw, self.base.denoiser.target(x, n, s))
            self.optimiser.zero_grad(set_to_none=True)
            try:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimiser)
                self.scaler.update()
            except BaseException:
                # An out-of-memory error between unscale_ and update() would leave the scaler
                # believing the gradients are unscaled; the loop's retry would then step with
                # gradients still multiplied by the scale. Start the retry from a clean scaler
                # with the same scale (a device read, on this rare path only).
                if self.scaler.is_enabled():
                    state = self.scaler.state_dict()
                    self.scaler = torch.amp.GradScaler(self.base.device.type)
                    self.scaler.load_state_dict(state)
                raise
        return loss.detach()  # read by the loop once the whole step is queued

    def state_dict(self):
        """Adapter weights, camera MLP, optimiser and noise generator."""
        return {"lora": {n: p.detach().clone() for n, p in self.lora_params.items()},
                "camera": None if self.camera is None else {k: v.clone() for k, v in self.camera.state_dict().items()},
                "optimiser": copy.deepcopy(self.optimiser.state_dict()), "generator": self.generator.get_state(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        """Restore what state_dict() returned."""
        with torch.no_grad():
            for n, p in self.lora_params.items():
                p.copy_(state["lora"][n])
        if self.camera is not None and state.get("camera") is not None:
            self.camera.load_state_dict(state["camera"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.generator.set_state(state["generator"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
