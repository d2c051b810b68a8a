"""LoRA (Hu et al. 2021) on nn.Linear or NF4 Linear4bit layers: the layers, the swap, the merge.

y = base(x) + (dropout(x) @ A^T @ B^T) * scaling,  A [r, in] Kaiming-uniform, B [out, r] zeros (so training
starts at the base model), scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).

How a LoRA layer takes an nn.Linear's place: `LoRALinearDense` / `LoRALinear4bit` subclass the base class
(nn.Linear / Linear4bit) with the LoRA mixin `LoRALinear` first in the MRO. The swap builds one of them
around the *same* tensors (parameters and buffers re-registered under the same names, plain attributes
copied), so
  - the state-dict keys are the base's keys unchanged (`...q_proj.weight`, plus `absmax` for NF4), with
    `lora_A.weight` / `lora_B.weight` beside them: PEFT's file is our lora_state_dict under a fixed prefix
    (model/adapter.py);
  - the base computation is the base class's own forward (`super().forward`), not a copy of it, and there is
    no `.base_layer` child to unwrap (PEFT's way, which moves every key; STYLE.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .llama import Llama
from .quant import Linear4bit, _keep_dtype

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Adapter(nn.Linear):
    """lora_A / lora_B: a bias-free linear whose weight stays float32 under model.to(dtype) (master weights:
    fp16 adapters would break loss scaling on a T4, bf16 ones lose small updates)."""

    def _apply(self, fn, recurse=True):
        return super()._apply(_keep_dtype(fn, {id(self.weight)}), recurse)


class LoRALinear:
    """The LoRA half of a LoRA layer, a mixin: the concrete classes are LoRALinearDense (nn.Linear base) and
    LoRALinear4bit (Linear4bit base), so `isinstance(m, LoRALinear)` finds every LoRA layer."""

    def init_lora(self, r: int, alpha: float, dropout: float, use_rslora: bool):
        device = self.weight.device
        self.r = r
        self.lora_A = _Adapter(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = _Adapter(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_scaling(alpha, use_rslora)

    def set_scaling(self, alpha: float, use_rslora: bool = False):
        self.lora_alpha, self.use_rslora = alpha, use_rslora
        self.scaling = alpha / math.sqrt(self.r) if use_rslora else alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # the base layer's own forward, on the same tensors
        # The branch runs in the input's dtype (as autocast would run it): the fp32 master weights are cast,
        # never the (B, T, in) activations, and their gradients come back to fp32 through the cast.
        h = self.lora_dropout(x)
        h = F.linear(h, self.lora_A.weight.to(h.dtype))  # (..., in) -> (..., r)
        if y.dtype != h.dtype:  # a base computing in another dtype: the plain expression
            return y + (F.linear(h, self.lora_B.weight.to(h.dtype)) * self.scaling).to(y.dtype)
        # y + scaling * (h @ B^T) as one GEMM: the add and the scaling ride on the matmul (beta=1, alpha=scaling),
        # so no (..., out) product or scaled copy is made, in forward or in backward (addmm's gradient for y is
        # the incoming gradient itself; the scaling then applies to (..., r) and [out, r] tensors only)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]),
                          self.lora_B.weight.to(h.dtype).t(), alpha=self.scaling)
        return out.view(y.shape)

    def merged_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W + B @ A * scaling, [out, in], computed in float32."""
        base = self.dequantize(torch.float32) if isinstance(self, Linear4bit) else self.weight.detach().float()
        delta = (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling
        return (base + delta).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}"


class LoRALinearDense(LoRALinear, nn.Linear):
    pass


class LoRALinear4bit(LoRALinear, Linear4bit):
    pass


def lora_layer(base: nn.Linear | Linear4bit, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               use_rslora: bool = False) -> LoRALinear:
    """A LoRA layer holding `base`'s own tensors (not copies) and attributes; `base` itself is not kept."""
    if isinstance(base, LoRALinear):
        raise ValueError("lora_layer: the layer already has LoRA adapters")
    cls = LoRALinear4bit if isinstance(base, Linear4bit) else LoRALinearDense
    assert type(base) in (nn.Linear, Linear4bit), f"LoRA targets nn.Linear or Linear4bit, not {type(base).__name__}"
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for key, value in vars(base).items():  # in_features, out_features, training, compute_dtype, blocksize, ...
        if not key.startswith("_"):
            setattr(layer, key, value)
    # Take over the base's tensors by name, through the public API: the same Parameter / buffer objects,
    # in the same order (so state-dict key order is kept too), buffers persistent exactly when the base
    # puts them in its state dict.
    persistent = set(base.state_dict(keep_vars=True))
    for name, p in base.named_parameters(recurse=False):
        layer.register_parameter(name, p)
    for name, b in base.named_buffers(recurse=False):
        layer.register_buffer(name, b, persistent=name in persistent)
    # nn.Linear(bias=False) registers `bias = None`, which named_parameters skips and the base forward reads
    # (Linear4bit keeps a None bias as a plain attribute, copied above)
    if not hasattr(layer, "bias"):
        layer.register_parameter("bias", None)
    layer.init_lora(r, alpha, dropout, use_rslora)
    # the new children (lora_A, lora_B, lora_dropout) are built in training mode; take the base's mode, or an
    # adapter loaded into an eval-mode model (extract, the demo, generate) would keep its dropout on
    layer.train(base.training)
    return layer


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: Llama, r: int = 16, alpha: float = 32.0, dropout: float = 0.0, targets=TARGETS,
               use_rslora: bool = False) -> Llama:
    """In place: every nn.Linear / Linear4bit whose attribute name is in `targets` becomes a LoRA layer, and
    every other parameter is frozen. The settings are kept as `model.lora_config` (for save_adapter)."""
    if model.lora_config:
        raise ValueError("apply_lora: the model already has LoRA adapters (load_adapter reuses them)")
    if r < 1:
        raise ValueError(f"apply_lora: r={r} must be >= 1")
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = []
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if attr in targets and type(module) in (nn.Linear, Linear4bit):
            setattr(model.get_submodule(parent_name), attr, lora_layer(module, r, alpha, dropout, use_rslora))
            swapped.append(attr)
    if not swapped:
        raise ValueError(f"apply_lora: no nn.Linear named any of {list(targets)} in the model; "
                         f"choose target modules among {list(TARGETS)}")
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                             target_modules=[t for t in targets if t in swapped])
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{`model.layers.0.self_attn.q_proj.lora_A.weight`: [r, in], ...}: the adapters only, float32."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.endswith((".lora_A.weight", ".lora_B.weight"))}


def merge_lora(model: Llama, dtype: torch.dtype = torch.float32) -> Llama:
    """A new full-precision Llama with every adapter folded in (W + B @ A * scaling) and every NF4 layer
    dequantized; plain nn.Linear layers only. The input model is left as it was."""
    special = {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, Linear4bit))}
    sd = {}
    for key, value in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in special or module.rpartition(".")[0] in special:  # `x.weight`/`x.absmax`, `x.lora_A.weight`
            continue
        sd[key] = value.to(dtype)
    for name, m in special.items():
        if isinstance(m, LoRALinear):
            sd[f"{name}.weight"] = m.merged_weight(dtype)
        else:
            sd[f"{name}.weight"] = m.dequantize(torch.float32).to(dtype)
        if m.bias is not None:
            sd[f"{name}.bias"] = m.bias.detach().to(dtype)
    with torch.device("meta"):
        merged = Llama(model.config)
    merged.load_state_dict(sd, assign=True, strict=True)
    if model.config.tie_word_embeddings:
        merged.lm_head.weight = merged.model.embed_tokens.weight
    for name, p in merged.named_parameters():
        assert p.device.type != "meta", f"{name} left on the meta device"
    merged.source = model.source  # lora_config stays None: the merged model has no adapters
    return merged.eval()


def fold_lora(model: Llama, dtype: torch.dtype) -> Llama:
    """merge_lora in place, for a model about to be written and dropped (engine.export --merge): each LoRA or NF4
    layer in turn becomes a plain nn.Linear holding its merged weight in `dtype`, and its adapters (and old weight,
    if another dtype) are freed before the next layer, so the peak is the model plus one layer's float32 product
    rather than a second model (merge_lora's copy: +13 GB for a 3B model in float32). The other tensors are cast
    to `dtype`."""
    names = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, Linear4bit))]  # names: no references
    for name in names:
        m = model.get_submodule(name)
        weight = m.merged_weight(dtype) if isinstance(m, LoRALinear) else m.dequantize(torch.float32).to(dtype)
        if isinstance(m, nn.Linear) and m.weight.dtype == dtype:
            # into the old weight's own memory: safetensors maps the checkpoint copy-on-write, so a new tensor
            # would leave the old weight's file pages resident beside it (+1 model of RSS)
            weight = m.weight.detach().copy_(weight)
        with torch.device("meta"):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if m.bias is not None:
            plain.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, plain)
        del m, weight  # the last references: the layer's adapters and old weight are freed before the next
    model.lora_config = None
    return model.to(dtype).eval()
