"""DeiT / ViT in plain PyTorch with SDPA attention.

Module and parameter names mirror HF transformers' so its state dicts load with no renaming; timm checkpoints are
converted in ``checkpoints.py``. Inference only: no dropout, no attention weights returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.model.architecture import Architecture, DeiTConfig


class PatchEmbeddings(nn.Module):
    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class Embeddings(nn.Module):
    """Patch embeddings with the CLS (and, for DeiT, distillation) token prepended and positions added."""

    def __init__(self, config: DeiTConfig, use_mask_token: bool = False) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if config.has_distillation_token:
            self.distillation_token = nn.Parameter(torch.zeros(1, 1, d))
        if use_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embeddings = PatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_position_embeddings, d))

    def positions_for(self, height: int, width: int) -> Tensor:
        """Position embeddings for an input of ``height``×``width`` pixels (bicubic-resized grid)."""
        prefix = self.config.num_prefix_tokens if self.config.prefix_position_embeddings else 0
        pos = self.position_embeddings
        grid_h, grid_w = height // self.config.patch_size, width // self.config.patch_size
        stored = pos.shape[1] - prefix
        if grid_h * grid_w == stored and grid_h == grid_w:
            return pos
        side = round(int(stored) ** 0.5)  # a traced export sees the stored grid's size as a tensor: it is a constant
        dim = pos.shape[-1]
        patch_pos = pos[:, prefix:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((pos[:, :prefix], patch_pos), dim=1)

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        batch, _, height, width = pixel_values.shape
        x = self.patch_embeddings(pixel_values)
        if bool_masked_pos is not None:
            mask = bool_masked_pos.unsqueeze(-1).to(x.dtype)
            x = x * (1.0 - mask) + self.mask_token.expand(batch, x.shape[1], -1) * mask
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.config.has_distillation_token:
            prefix.append(self.distillation_token.expand(batch, -1, -1))
        if not self.config.prefix_position_embeddings:
            return torch.cat([*prefix, x + self.positions_for(height, width)], dim=1)
        x = torch.cat([*prefix, x], dim=1)
        return x + self.positions_for(height, width)


class SelfAttention(nn.Module):
    """Multi-head self-attention; q/k/v loaded as transformers' three Linears, run as one after ``fuse``."""

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(d, d, bias=config.qkv_bias)
        self.key = nn.Linear(d, d, bias=config.qkv_bias)
        self.value = nn.Linear(d, d, bias=config.qkv_bias)
        self.qkv: nn.Linear | None = None

    def fuse(self) -> None:
        """Replace the three projections by one ``[3D, D]`` Linear: one matmul reads the activations once."""
        if self.qkv is not None:
            return
        parts = (self.query, self.key, self.value)
        weight = torch.cat([p.weight for p in parts])
        biases = [p.bias for p in parts]
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if biases[0] is not None:
            fused.bias = nn.Parameter(torch.cat([b for b in biases if b is not None]), requires_grad=False)
        self.qkv = fused
        del self.query, self.key, self.value

    def forward(self, x: Tensor, scratch: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        if self.qkv is not None:
            qkv = self.qkv(x) if scratch is None else linear_into(self.qkv, x, scratch)
            # [b, n, 3·D] -> three [b, heads, n, head_dim] views of the one output.
            q, k, v = qkv.view(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            shape = (b, n, self.num_heads, head_dim)
            q = self.query(x).view(shape).transpose(1, 2)
            k = self.key(x).view(shape).transpose(1, 2)
            v = self.value(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, d)


class AttentionOutput(nn.Module):
    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class Attention(nn.Module):
    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.output = AttentionOutput(config)

    def forward(self, x: Tensor, scratch: Tensor | None = None) -> Tensor:
        return self.output(self.attention(x, scratch))


class Dense(nn.Module):
    """A Linear under the attribute name ``dense``, as HF's intermediate/output blocks are laid out."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class LayerScale(nn.Module):
    """DeiT III's per-channel residual-branch scale (named as transformers' Dinov2 names it)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Only ever given a branch's fresh output, which it may scale in place when serving (see ``Layer``).
        return x.mul_(self.lambda1) if torch.is_inference_mode_enabled() else x * self.lambda1


class Layer(nn.Module):
    """Pre-norm transformer block: ``h = x + attn(ln(x))``, ``out = h + mlp(ln(h))`` with exact GELU.

    With layer scale (DeiT III) each branch's output is multiplied by its learned per-channel scale first.
    """

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.layernorm_before = nn.LayerNorm(d, eps=eps)
        self.attention = Attention(config)
        self.layernorm_after = nn.LayerNorm(d, eps=eps)
        self.intermediate = Dense(d, config.intermediate_size)
        self.output = Dense(config.intermediate_size, d)
        self.layer_scale1: nn.Module = LayerScale(d) if config.layer_scale else nn.Identity()
        self.layer_scale2: nn.Module = LayerScale(d) if config.layer_scale else nn.Identity()

    def forward(self, x: Tensor, scratch: Tensor | None = None) -> Tensor:
        """One block. ``scratch`` (serving only, see ``Encoder``): a flat buffer of ``x``'s dtype that the fused
        q/k/v projection and then the MLP's first Linear write into instead of allocating their outputs."""
        if not torch.is_inference_mode_enabled():  # autograd or an export may need every intermediate as it was
            x = x + self.layer_scale1(self.attention(self.layernorm_before(x)))
            return x + self.layer_scale2(self.output(F.gelu(self.intermediate(self.layernorm_after(x)))))
        # Serving: the GELU and both residual adds write into the buffer they read (x + y and y + x are the same
        # sum, so results are bit-identical). The q/k/v are read by the attention before the MLP reuses the scratch.
        x = self.layer_scale1(self.attention(self.layernorm_before(x), scratch)).add_(x)
        normed = self.layernorm_after(x)
        hidden = self.intermediate(normed) if scratch is None else linear_into(self.intermediate.dense, normed, scratch)
        return self.layer_scale2(self.output(torch.ops.aten.gelu_(hidden))).add_(x)

    def scratch_width(self) -> int:
        """Values per token this block writes into a scratch buffer; 0 when it cannot (an int8 Linear, unfused
        q/k/v): then no block gets one."""
        qkv, hidden = self.attention.attention.qkv, self.intermediate.dense
        if type(qkv) is not nn.Linear or type(hidden) is not nn.Linear:
            return 0
        return max(qkv.out_features, hidden.out_features)


def linear_into(linear: nn.Linear, x: Tensor, scratch: Tensor) -> Tensor:
    """``linear(x)``, written into the front of the flat buffer ``scratch`` instead of a new tensor."""
    rows = x.numel() // x.shape[-1]
    out = scratch[: rows * linear.out_features].view(rows, linear.out_features)
    flat = x.reshape(rows, x.shape[-1])
    bias: Tensor | None = linear.bias  # None where the checkpoint has no q/k/v bias
    if bias is None:
        torch.mm(flat, linear.weight.t(), out=out)
    else:
        torch.addmm(bias, flat, linear.weight.t(), out=out)
    return out.view(*x.shape[:-1], linear.out_features)


class Encoder(nn.Module):
    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor) -> Tensor:
        # Serving: one scratch buffer for every block's widest outputs (q/k/v, the MLP's hidden layer). Allocated
        # afresh in each block, these are what the C allocator returns to the OS and faults in again page by page;
        # with the in-place GELU and adds of ``Layer``, the forward runs far fewer page faults, same results.
        scratch = None
        if torch.is_inference_mode_enabled():
            widths = [block.scratch_width() for block in self.layer]  # type: ignore[operator]
            if widths and min(widths) > 0:
                scratch = x.new_empty(x.shape[0] * x.shape[1] * max(widths))
        for block in self.layer:
            x = block(x, scratch)
        return x


class Pooler(nn.Module):
    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence: Tensor) -> Tensor:
        return torch.tanh(self.dense(sequence[:, 0]))


class Backbone(nn.Module):
    """The bare encoder (HF ``DeiTModel`` / ``ViTModel``): final-normed token sequence, optional pooler."""

    def __init__(self, config: DeiTConfig, add_pooling_layer: bool = False, use_mask_token: bool = False) -> None:
        super().__init__()
        self.embeddings = Embeddings(config, use_mask_token=use_mask_token)
        self.encoder = Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = Pooler(config) if add_pooling_layer else None

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        return self.layernorm(self.encoder(self.embeddings(pixel_values, bool_masked_pos)))


class DeiT(nn.Module):
    """Any of the DeiT architectures behind one interface, split as timm splits its models:
    ``forward_features`` gives the final-normed token sequence and ``forward_head`` a classifier's logits from it
    (``DistilledDeiT`` overrides only the head). Pooling tokens into embeddings is the caller's
    (``service.model.pooling``).

    ``forward`` returns classification logits for the classifiers, the final hidden states for the bare model, and
    the reconstruction for MIM.
    """

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.config = config
        arch = config.architecture
        if arch is Architecture.DISTILLED and not isinstance(self, DistilledDeiT):
            raise TypeError("a distilled config builds a DistilledDeiT (build_deit), whose two heads it needs")
        backbone = Backbone(
            config,
            add_pooling_layer=config.add_pooling_layer and arch is Architecture.BARE,
            use_mask_token=arch is Architecture.MASKED_IMAGE_MODELING,
        )
        # Registered under "deit" or "vit" so parameter names match the checkpoint's.
        self.backbone_name = config.model_type
        self.add_module(self.backbone_name, backbone)
        if arch is Architecture.SINGLE_HEAD:
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        elif arch is Architecture.MASKED_IMAGE_MODELING:
            stride = config.encoder_stride
            self.decoder = nn.Sequential(
                nn.Conv2d(config.hidden_size, stride**2 * config.num_channels, kernel_size=1),
                nn.PixelShuffle(stride),
            )

    @property
    def backbone(self) -> Backbone:
        module = getattr(self, self.backbone_name)
        assert isinstance(module, Backbone)
        return module

    def forward_features(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        """The final-normed token sequence ``[N, prefix + patches, hidden_size]``."""
        return self.backbone(pixel_values, bool_masked_pos)

    def forward_head(self, features: Tensor) -> Tensor:
        """Class logits from the token sequence: the single head reads the CLS token."""
        if not self.config.architecture.classifies:
            raise ValueError(f"a {self.config.architecture.value} has no classification head")
        return self.classifier(features[:, 0])

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        seq = self.forward_features(pixel_values, bool_masked_pos)
        arch = self.config.architecture
        if arch.classifies:
            return self.forward_head(seq)
        if arch is Architecture.MASKED_IMAGE_MODELING:
            patches = seq[:, self.config.num_prefix_tokens :]
            grid_h = pixel_values.shape[-2] // self.config.patch_size
            grid_w = pixel_values.shape[-1] // self.config.patch_size
            grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, grid_h, grid_w)
            return self.decoder(grid)
        return seq

    def fuse_attention_projections(self) -> DeiT:
        """Fuse every block's q/k/v projections (``SelfAttention.fuse``); the outputs stay equal up to fp32 rounding.

        Done after loading, so checkpoints keep transformers' tensor names; ``state_dict`` then names ``qkv``.
        """
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.fuse()
        return self

    def head_logits(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """The distilled model's CLS-head and distillation-head logits, separately (for evaluation)."""
        raise ValueError("head_logits needs a distilled (two-head) model")

    def pooled(self, pixel_values: Tensor) -> Tensor:
        """Pooler output of a bare model that has a pooler."""
        backbone = self.backbone
        if backbone.pooler is None:
            raise ValueError("this model has no pooler")
        return backbone.pooler(backbone(pixel_values))


class DistilledDeiT(DeiT):
    """DeiT with a distillation token: two heads, CLS and distillation, whose logits it averages."""

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__(config)
        self.cls_classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.distillation_classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward_head(self, features: Tensor) -> Tensor:
        return (self.cls_classifier(features[:, 0]) + self.distillation_classifier(features[:, 1])) / 2

    def head_logits(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        seq = self.forward_features(pixel_values)
        return self.cls_classifier(seq[:, 0]), self.distillation_classifier(seq[:, 1])


def build_deit(config: DeiTConfig) -> DeiT:
    """The model class of ``config``'s architecture (on the current default device)."""
    return DistilledDeiT(config) if config.architecture is Architecture.DISTILLED else DeiT(config)
