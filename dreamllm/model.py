"""The DreamLLM model: LLM + frozen CLIP + visual projector + dream queries + condition projector + frozen SD.

Owns: embedding an interleaved token sequence (text, visual tokens, dream
queries), the training losses (next-token CE on text, diffusion MSE through
the frozen UNet on VAE latents), condition dropout, and the per-stage freeze
policy (`set_stage`, the one place where parameters are frozen).

Shapes: B rows, L tokens, H LLM width, V vocabulary, N_img image-input blocks
in the batch, P visual tokens per image, N_dr dream slots, Q dream queries,
D UNet cross-attention width, C latent channels, h x w latent side.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from . import components
from .config import STAGES, DreamLLMConfig
from .sequence import IGNORE
from .tokenizer import build_tokenizer, special_ids

# What each stage trains (the paper, Sec. 3.2); everything else is frozen.
# CLIP, the UNet and the VAE are frozen in every stage.
OWN_PARAMS = ("visual_projector", "dream_queries", "condition_projector", "new_token_embed", "new_token_head")
TRAINABLE = {"align": OWN_PARAMS, "igpt": OWN_PARAMS + ("llm",), "sft": OWN_PARAMS + ("llm",)}
ALWAYS_FROZEN = ("vision", "unet", "vae")


@dataclass
class DreamLLMOutput(ModelOutput):
    """Losses of one forward pass (weighted `loss` plus its parts, unweighted).

    A transformers `ModelOutput` (a dict too) rather than a plain dataclass: DeepSpeed ZeRO-3 finds a
    module's output tensors only in tensors, tuples and dicts, and it re-gathers the parameters DreamLLM
    holds itself (dream queries, added-token rows) for backward through hooks on those tensors.
    """

    loss: torch.Tensor | None = None
    loss_lm: torch.Tensor | None = None
    loss_diffusion: torch.Tensor | None = None
    num_text_tokens: int | None = None
    num_images_created: int | None = None


class DreamLLM(nn.Module):
    """DreamLLM built from its components; use `from_config` or `dreamllm.checkpoint.load_checkpoint`."""

    def __init__(self, cfg: DreamLLMConfig, tokenizer, llm, vision, unet, vae, noise_scheduler):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.ids = special_ids(tokenizer, cfg.tokenizer)
        self.llm, self.vision, self.unet, self.vae = llm, vision, unet, vae
        self.noise_scheduler = noise_scheduler
        H = llm.config.hidden_size
        Q = cfg.num_dream_queries
        n_new = len(tokenizer) - self.ids.base_vocab_size
        if llm.get_input_embeddings().num_embeddings < self.ids.base_vocab_size:
            raise ValueError(f"the LLM has {llm.get_input_embeddings().num_embeddings} embeddings but the "
                             f"tokenizer's base vocabulary is {self.ids.base_vocab_size}")
        with components._seeded(cfg.llm.seed + 7):
            self.visual_projector = nn.Linear(vision.config.hidden_size, H, bias=True)
            self.dream_queries = nn.Parameter(torch.randn(1, Q, H) * cfg.query_init_std)
            self.condition_projector = nn.Linear(H, cfg.diffusion.cross_attention_dim, bias=False)
        # Added tokens start at the mean of the existing rows (a common, stable init).
        emb = llm.get_input_embeddings().weight.detach()
        head = llm.get_output_embeddings().weight.detach()
        self.new_token_embed = nn.Parameter(emb.mean(0, keepdim=True).repeat(n_new, 1).clone())
        self.new_token_head = nn.Parameter(head.mean(0, keepdim=True).repeat(n_new, 1).clone())
        self.stage = "igpt"
        self.set_stage("igpt")
        if cfg.gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    @classmethod
    def from_config(cls, cfg: DreamLLMConfig, tokenizer=None) -> "DreamLLM":
        """Build every component from `cfg` (pretrained paths/ids or seeded random init)."""
        tokenizer = tokenizer or build_tokenizer(cfg.tokenizer)
        base_vocab = special_ids(tokenizer, cfg.tokenizer).base_vocab_size
        return cls(cfg, tokenizer, components.build_llm(cfg.llm, base_vocab), components.build_vision(cfg.vision),
                   components.build_unet(cfg.diffusion), components.build_vae(cfg.diffusion),
                   components.build_train_scheduler(cfg.diffusion))

    # ------------------------------------------------------------- freezing
    def set_stage(self, stage: str, train_llm: bool | None = None) -> "DreamLLM":
        """Apply the stage's freeze policy: only TRAINABLE[stage] gets gradients; frozen towers in eval().

        `train_llm` overrides the policy for the LLM (None: the paper's, frozen in stage I only).
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
        self.stage = stage
        self.requires_grad_(False)
        for name in TRAINABLE[stage]:
            getattr(self, name).requires_grad_(True)
        if train_llm is not None:
            self.llm.requires_grad_(train_llm)
        return self.train(self.training)

    def set_gradient_checkpointing(self, on: bool) -> "DreamLLM":
        """Recompute LLM and UNet activations in backward (less memory, ~30% more compute)."""
        was_on, self.cfg.gradient_checkpointing = self.cfg.gradient_checkpointing, on
        if on:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.unet.enable_gradient_checkpointing()
        elif was_on:
            self.llm.gradient_checkpointing_disable()
            self.unet.disable_gradient_checkpointing()
        return self

    def train(self, mode: bool = True) -> "DreamLLM":
        super().train(mode)
        for name in ALWAYS_FROZEN:  # frozen towers never run in training mode
            getattr(self, name).eval()
        return self

    def own_named_parameters(self) -> dict[str, nn.Parameter]:
        """DreamLLM's own parameters (projectors, queries, added-token rows), trainable in every stage."""
        return {n: p for n, p in self.named_parameters() if n.split(".")[0] in OWN_PARAMS}

    @property
    def llm_trainable(self) -> bool:
        return any(p.requires_grad for p in self.llm.parameters())

    @property
    def device(self) -> torch.device:
        return self.dream_queries.device

    # ------------------------------------------------------------ embedding
    def slot_masks(self, input_ids_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query_mask, patch_mask), each (B, L) bool: query slots inside dream slots, visual tokens elsewhere."""
        s = self.ids
        depth = (input_ids_BL == s.dream_start).long().cumsum(-1) - (input_ids_BL == s.dream_end).long().cumsum(-1)
        placeholder = input_ids_BL == s.im_patch
        return placeholder & (depth > 0), placeholder & (depth <= 0)

    def encode_images(self, pixel_values_N3SS: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens (N_img, P, H) from CLIP's selected layer, CLS dropped."""
        with torch.no_grad():
            out = self.vision(pixel_values_N3SS.to(self.visual_projector.weight.dtype), output_hidden_states=True)
            feats = out.hidden_states[self.cfg.vision.select_layer][:, 1:]
        return self.visual_projector(feats)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (..., H): the LLM's table for its vocabulary, `new_token_embed` for added tokens."""
        base = self.ids.base_vocab_size
        llm_emb = self.llm.get_input_embeddings()(input_ids.clamp(max=base - 1))
        new_emb = self.new_token_embed[(input_ids - base).clamp(min=0)].to(llm_emb.dtype)
        return torch.where((input_ids < base).unsqueeze(-1), llm_emb, new_emb)

    def embed(self, input_ids_BL: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (B, L, H) with visual tokens and dream queries placed in their slots.

        Visual tokens come from `pixel_values` (N_img, 3, S, S) or precomputed
        `image_embeds` (N_img, P, H), in order of appearance (row-major).
        """
        emb = self.embed_tokens(input_ids_BL)
        query_mask, patch_mask = self.slot_masks(input_ids_BL)
        n_patch = int(patch_mask.sum())
        if n_patch:
            if image_embeds is None:
                if pixel_values is None:
                    raise ValueError("the sequence has image-input blocks but no pixel_values were given")
                image_embeds = self.encode_images(pixel_values)
            if image_embeds.shape[0] * image_embeds.shape[1] != n_patch:
                raise ValueError(f"the sequence has {n_patch} visual-token slots but {image_embeds.shape[0]} images "
                                 f"x {image_embeds.shape[1]} tokens were given")
            emb = emb.masked_scatter(patch_mask.unsqueeze(-1), image_embeds.to(emb.dtype))
        n_query = int(query_mask.sum())
        if n_query:
            Q = self.cfg.num_dream_queries
            if n_query % Q:
                raise ValueError(f"{n_query} query slots is not a multiple of {Q} dream queries")
            queries = self.dream_queries.to(emb.dtype).expand(n_query // Q, -1, -1)
            emb = emb.masked_scatter(query_mask.unsqueeze(-1), queries)
        return emb

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) over the LLM vocabulary plus the added tokens."""
        base = self.llm.get_output_embeddings()(hidden)
        new = hidden @ self.new_token_head.to(hidden.dtype).t()
        return torch.cat([base, new], dim=-1)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed LLM hidden states (B, L, H).

        With `position_ids` restarting at 0 per packed example and no attention
        mask, transformers keeps attention inside each example (block-causal).
        """
        emb = self.embed(input_ids, pixel_values)
        out = self.llm.get_decoder()(inputs_embeds=emb, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    # ------------------------------------------------------------ diffusion
    def condition(self, hidden_BLH: torch.Tensor, query_mask_BL: torch.Tensor) -> torch.Tensor:
        """UNet conditions (N_dr, Q, D) from the hidden states at the query slots."""
        Q, H = self.cfg.num_dream_queries, hidden_BLH.shape[-1]
        return self.condition_projector(hidden_BLH[query_mask_BL].view(-1, Q, H))

    def prompt_condition(self, prompts: list[str]) -> torch.Tensor:
        """Conditions (B, Q, D) of `<s> prompt <dream_start> queries` for each prompt (the '' prompt = unconditional)."""
        slot = [self.ids.dream_start] + [self.ids.im_patch] * self.cfg.num_dream_queries + [self.ids.dream_end]
        rows = [[self.ids.bos] + self.tokenizer(p, add_special_tokens=False).input_ids + slot if p else
                [self.ids.bos] + slot for p in prompts]
        L = max(map(len, rows))
        # Right padding is safe: attention is causal and the pads come after the queries.
        ids = torch.full((len(rows), L), self.ids.pad, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        hidden = self.hidden_states(ids)
        return self.condition(hidden, self.slot_masks(ids)[0])

    def diffusion_loss(self, cond_NQD: torch.Tensor, latents: torch.Tensor | None = None,
                       latent_mean: torch.Tensor | None = None, latent_logvar: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE of the UNet's prediction (epsilon or v) on unscaled VAE latents, at the timesteps and with the
        weighting of `cfg.diffusion` (the paper: uniform timesteps, plain MSE); see `components.denoising_loss`.

        Give either a latent sample `latents` (N, C, h, w) or the posterior
        `latent_mean`/`latent_logvar`, from which a fresh sample is drawn.
        """
        if latents is None:
            if latent_mean is None or latent_logvar is None:
                raise ValueError("dream slots need latents or latent_mean + latent_logvar")
            latents = components.sample_latents(latent_mean, latent_logvar, generator)
        if latents.shape[0] != cond_NQD.shape[0]:
            raise ValueError(f"{cond_NQD.shape[0]} dream slots but {latents.shape[0]} target latents")
        x0 = latents.float() * self.vae.config.scaling_factor
        d = self.cfg.diffusion
        loss, _ = components.denoising_loss(self.unet, self.noise_scheduler, x0, cond_NQD, d.prediction_type,
                                            d.timestep_power, d.snr_gamma, generator)
        return loss

    # -------------------------------------------------------------- training
    def _own_params_term(self, like: torch.Tensor) -> torch.Tensor:
        """A scalar that depends on every own parameter (multiply by 0 to keep them all in the graph).

        The projectors are called on zero rows rather than their weights read: DeepSpeed ZeRO-3 holds a
        submodule's weights only inside that submodule's own forward (outside it they have no elements).
        """
        terms = [proj(like.new_zeros(0, proj.in_features)).sum()
                 for proj in (self.visual_projector, self.condition_projector)]
        terms += [p.sum() for p in (self.dream_queries, self.new_token_embed, self.new_token_head)]
        return sum(terms)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                latent_mean: torch.Tensor | None = None, latent_logvar: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> DreamLLMOutput:
        """Weighted loss of a (packed) batch from `dreamllm.sequence.collate`."""
        hidden = self.hidden_states(input_ids, position_ids, pixel_values)
        w = self.cfg.stage_losses[self.stage]

        # LM loss only where there is a label: logits over the whole vocabulary
        # for every position would dominate memory at 7b shapes.
        shift_labels = labels[:, 1:]
        valid = shift_labels != IGNORE
        n_text = int(valid.sum())
        zero = hidden.sum() * 0.0
        loss_lm = F.cross_entropy(self.logits(hidden[:, :-1][valid]).float(), shift_labels[valid]) if n_text else zero

        query_mask, _ = self.slot_masks(input_ids)
        n_dream = int(query_mask.sum()) // self.cfg.num_dream_queries
        loss_diff = zero
        if n_dream:
            cond = self.condition(hidden, query_mask)
            p = self.cfg.condition_dropout
            if self.training and p > 0:
                drop = torch.rand(n_dream, generator=generator) < p
                if drop.any():  # classifier-free guidance: some images learn from the unconditional input
                    cond = torch.where(drop.to(cond.device).view(-1, 1, 1), self.prompt_condition([""]), cond)
            loss_diff = self.diffusion_loss(cond, latents, latent_mean, latent_logvar, generator)

        # Every trainable own parameter joins the graph even when a batch has no
        # image of some kind, so data-parallel gradient reduction never waits on it.
        keep_graph = self._own_params_term(hidden) * 0.0
        loss = w.lm * loss_lm + w.diffusion * loss_diff + keep_graph
        return DreamLLMOutput(loss, loss_lm.detach(), loss_diff.detach(), n_text, n_dream)
