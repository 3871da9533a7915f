"""`sds3d prior train`: train the built-in prior on renders of the synthetic world.

ε-prediction DDPM loss ‖ε_θ(x_t, t, text, camera) − ε‖² with t ~ U{0…T−1}; AdamW; an EMA of the
weights is what gets exported; bf16 autocast on a GPU. The text encoder trains jointly from
scratch. Camera conditioning is dropped (zeroed) for `camera_dropout` of the samples, so the model
also works without a camera. Runs stop after `--max-minutes` with a checkpoint and resume from it
(`--resume`) to the same result; the diffusers folder is written at every checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sds3d.diffusion import DDPM_SCHEDULER_CONFIG, add_noise, alphas_cumprod_from_config
from sds3d.prior.data import PriorDataConfig, render_dataset, sample_captions, training_objects
from sds3d.prior.model import PriorModelConfig, build_models, camera_condition, save_pipeline

CHECKPOINT = "checkpoint.pt"


@dataclass
class PriorTrainConfig:
    steps: int = 20_000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    camera_dropout: float = 0.2
    # Offset noise (Guttenberg 2023): a per-image, per-channel constant added to ε, against the
    # random background colours of samples from pure noise. Off: fine-tuning the shipped prior with
    # 0.1 for 4,063 steps filled whole samples with the object's colour and lowered the judged shape
    # accuracy from 77% to 35% (camera-conditioned, CFG 3, the then x_0-clipping sampler; see the
    # model card: the saturated backgrounds came from the clipping, not from the training).
    offset_noise: float = 0.0
    # Min-SNR-γ loss weighting (Hang et al. 2023; diffusers' `--snr_gamma`): each sample's ε loss
    # times min(SNR_t, γ)/SNR_t, which weights the noisy half of the schedule, where only the
    # conditioning (the camera) says where an object's front is, against the clean half where the
    # image shows it. None: the plain ε loss.
    snr_gamma: float | None = None
    # World v2's fronts: a share of the fronted objects' samples with t drawn from the noisy end
    # [high_t_from, T) instead of all of [0, T): there the noisy image no longer shows which side
    # is the front and only the camera does, so these samples are the ones that teach the azimuth
    # (below t ≈ 600 the ε loss is the same with the right and the flipped camera; README, issue 15).
    fronted_high_t_share: float = 0.0
    high_t_from: int = 600
    checkpoint_every: int = 1000
    seed: int = 0
    data: PriorDataConfig = field(default_factory=PriorDataConfig)
    model: PriorModelConfig = field(default_factory=PriorModelConfig)


def train_prior(config: PriorTrainConfig, out: Path, device: str = "cpu", resume: bool = False,
                max_minutes: float | None = None, progress: bool = True, compile: bool = False,
                init: Path | None = None, snapshots: tuple[int, ...] = ()) -> dict:  # fmt: skip
    """Train (or continue) the prior; returns a summary dict also written to `out/train_log.json`.

    `compile` wraps the U-Net and text encoder in `torch.compile` for the forward and backward (the
    4 M-parameter model is launch-bound on a GPU); checkpoints hold the uncompiled modules' weights.
    `init` starts a new run from the weights of a diffusers folder of this architecture (fine-tuning,
    e.g. of the shipped prior); the optimiser starts fresh and the step count at 0.
    `snapshots`: also write the diffusers folder as `out/pipeline-step<N>` when step N is reached
    (the prior at several points of its training, for `sds3d study`'s prior axis).
    """
    steps_t = int(DDPM_SCHEDULER_CONFIG["num_train_timesteps"])
    if not 0.0 <= config.fronted_high_t_share <= 1.0 or not 0 <= config.high_t_from < steps_t:
        raise ValueError(f"fronted_high_t_share must be in [0, 1] and high_t_from in [0, {steps_t}), "
                         f"not {config.fronted_high_t_share} and {config.high_t_from}")  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    tokenizer, text_encoder, unet = build_models(config.model, out / "pipeline" / "tokenizer")
    if init is not None and not resume:
        load_weights(Path(init), text_encoder, unet, tokenizer)
    text_encoder.to(device).train()
    unet.to(device).train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    # fused: one kernel for the whole update; a 4 M-parameter model is launch-bound on a GPU.
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, fused=device.startswith("cuda")
    )
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    g = torch.Generator().manual_seed(config.seed)
    step, log, runs = 0, [], []
    if resume and (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        g.set_state(state["rng"].cpu())  # map_location moved it to the device
        step, log = int(state["step"]), json.loads(state["log"])
        runs = json.loads(state.get("runs", "[]"))
    elif init is not None:
        runs = [{"init": str(init)}]
    t0 = time.perf_counter()
    dataset = render_dataset(config.data, training_objects(config.data.fronted), device)
    images = dataset.images.to(device)
    data_seconds = time.perf_counter() - t0
    abar = alphas_cumprod_from_config(DDPM_SCHEDULER_CONFIG).to(device)
    fronted = torch.tensor([o.front is not None for o in dataset.objects])
    token_cache: dict[str, torch.Tensor] = {}
    amp = device.startswith("cuda")

    def tokens(captions: list[str]) -> torch.Tensor:
        for c in set(captions) - token_cache.keys():
            token_cache[c] = tokenizer(c, padding="max_length", max_length=config.model.max_tokens,
                                       truncation=True, return_tensors="pt").input_ids[0]  # fmt: skip
        return torch.stack([token_cache[c] for c in captions]).to(device)

    def checkpoint() -> None:
        state = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                 "ema_text": ema_text.state_dict(), "optimizer": optimizer.state_dict(), "rng": g.get_state(),
                 "step": step, "log": json.dumps(log), "runs": json.dumps([*runs, this_run()])}  # fmt: skip
        torch.save(state, out / (CHECKPOINT + ".tmp"))
        os.replace(out / (CHECKPOINT + ".tmp"), out / CHECKPOINT)
        save_pipeline(
            out / "pipeline", tokenizer, copy.deepcopy(ema_text).float(), copy.deepcopy(ema_unet).float()
        )

    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    run_unet, run_text = (
        (torch.compile(unet), torch.compile(text_encoder)) if compile else (unet, text_encoder)
    )
    start_time, first_step = time.perf_counter(), step

    def this_run() -> dict:
        return {"from_step": first_step, "to_step": step, "seconds": round(time.perf_counter() - start_time, 1),
                "device": device, "compile": compile, "batch_size": config.batch_size, "lr": config.lr,
                "offset_noise": config.offset_noise, "snr_gamma": config.snr_gamma,
                "fronted_high_t_share": config.fronted_high_t_share, "high_t_from": config.high_t_from}  # fmt: skip

    bar = tqdm(total=config.steps, initial=step, disable=not progress, unit="it")
    running, counted = torch.zeros((), device=device), 0
    while step < config.steps:
        if max_minutes is not None and time.perf_counter() - start_time > 60 * max_minutes:
            break
        index = torch.randint(0, len(dataset), (config.batch_size,), generator=g)
        captions = sample_captions(dataset, index, config.data, g)
        present = torch.rand(config.batch_size, generator=g) >= config.camera_dropout
        cams = camera_condition(dataset.elevation_deg[index], dataset.azimuth_deg[index], present).to(device)
        t = draw_timesteps(config, fronted[index], abar.shape[0], g).to(device)
        noise = torch.randn(config.batch_size, *images.shape[1:], generator=g)
        if config.offset_noise > 0:
            noise += config.offset_noise * torch.randn(config.batch_size, images.shape[1], 1, 1, generator=g)
        noise = noise.to(device)
        x = images[index.to(device)].float()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            emb = run_text(tokens(captions))[0]
            pred = run_unet(
                add_noise(x, noise, t, abar), t, encoder_hidden_states=emb, class_labels=cams
            ).sample
            if config.snr_gamma is None:
                loss = F.mse_loss(pred.float(), noise)
            else:
                snr = abar[t] / (1 - abar[t])
                weight = snr.clamp(max=config.snr_gamma) / snr
                loss = (weight * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - config.ema_decay)
        running += loss.detach()
        counted += 1
        step += 1
        bar.update(1)
        if step % 100 == 0 or step == config.steps:
            # The mean over the steps summed since the last entry (fewer than 100 right after a resume).
            log.append({"step": step, "loss": float(running) / counted})
            running.zero_()
            counted = 0
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
        if step % config.checkpoint_every == 0:
            checkpoint()
        if step in snapshots:
            save_pipeline(out / f"pipeline-step{step}", tokenizer, copy.deepcopy(ema_text).float(),
                          copy.deepcopy(ema_unet).float())  # fmt: skip
    bar.close()
    checkpoint()
    summary = {"steps": step, "seconds_this_run": round(time.perf_counter() - start_time, 1),
               "data_seconds": round(data_seconds, 1), "images": len(dataset), "device": device,
               "runs": [*runs, this_run()], "config": asdict(config), "log": log}  # fmt: skip
    (out / "train_log.json").write_text(json.dumps(summary, indent=2))
    return summary


def draw_timesteps(
    config: PriorTrainConfig, fronted: torch.Tensor, steps: int, g: torch.Generator
) -> torch.Tensor:
    """t ~ U{0…T−1} for each sample [B], except that a share `fronted_high_t_share` of the fronted
    objects' samples (`fronted` [B] bool) draw from U{high_t_from…T−1}."""
    t = torch.randint(0, steps, fronted.shape, generator=g)
    if config.fronted_high_t_share > 0:
        high = fronted & (torch.rand(fronted.shape, generator=g) < config.fronted_high_t_share)
        t = torch.where(high, torch.randint(config.high_t_from, steps, fronted.shape, generator=g), t)
    return t


def load_weights(folder: Path, text_encoder, unet, tokenizer=None) -> None:
    """Copy the text encoder's and U-Net's weights from a diffusers folder (safetensors) into the
    given modules, which must have the same architecture. With `tokenizer` the folder's vocabulary
    may differ from it (a prior trained before words were added): token embeddings are copied by
    token, and a token the folder lacks keeps the module's fresh initialisation."""
    from safetensors.torch import load_file

    for module, sub in ((text_encoder, "text_encoder"), (unet, "unet")):
        files = sorted((folder / sub).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {folder / sub}")
        state = {k: v.float() for f in files for k, v in load_file(f).items()}
        if module is text_encoder and tokenizer is not None:
            key = next(k for k in state if k.endswith(TOKEN_EMBEDDING))
            state[key] = _embeddings_by_token(
                state[key], json.loads((folder / "tokenizer" / "vocab.json").read_text()),
                module.state_dict()[key], tokenizer.get_vocab(),
            )  # fmt: skip
        module.load_state_dict(state, strict=True)


TOKEN_EMBEDDING = "token_embedding.weight"  # the key's end (transformers' prefixes vary)


def _embeddings_by_token(
    old: torch.Tensor, old_vocab: dict[str, int], fresh: torch.Tensor, vocab: dict[str, int]
) -> torch.Tensor:
    """`fresh` [len(vocab), D] with the rows of tokens that `old_vocab` also has copied from `old`."""
    out = fresh.detach().clone().float()
    for token, i in vocab.items():
        if token in old_vocab:
            out[i] = old[old_vocab[token]]
    return out
