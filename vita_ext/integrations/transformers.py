"""Drop-in acceleration of Hugging Face transformers' Qwen2 and InternVL models with vita_ext's ops.

Two lines::

    import vita_ext
    vita_ext.patch_qwen2(model)      # or vita_ext.patch_internvl(model); vita_ext.unpatch(model) undoes it

What is replaced, and how (numbers equal the unpatched model's up to float rounding):

- Attention. ``attention_lse`` is registered through transformers' public extension point,
  ``AttentionInterface.register("vita_ext", ...)``, with sdpa's mask builder registered under the same
  name in ``AttentionMaskInterface`` (so padding is never dropped). An instance patch switches the model
  (and its vision tower) to it with ``model.set_attn_implementation("vita_ext")``; importing this module
  also lets ``from_pretrained(..., attn_implementation="vita_ext")`` pick it. RoPE and the KV cache stay
  HF's. Served: no mask (plain causal, including KV-cache decode, bottom-right aligned), left padding
  (each row's keys start after its padding, e.g. batched ``generate``) and empty static-cache slots.
  Anything else -- right padding, packed sequences, custom 4D masks, attention dropout, softcap, sinks,
  paged caches -- runs HF's own sdpa function with the same mask (counted in ``ATTENTION_CALLS`` and
  warned about once per reason).
- LM head + loss. ``forward`` of ``Qwen2ForCausalLM`` / ``InternVLForConditionalGeneration`` is
  replaced: logits are computed with ``masked_lm_head`` at the ``logits_to_keep`` positions only; with
  ``labels`` the loss is ``masked_linear_cross_entropy`` (HF's ``ForCausalLMLoss``: labels shifted, fp32,
  mean over non-ignored targets or sum / ``num_items_in_batch``), the [T, V] logits are never built, and
  ``logits`` is None unless ``return_logits=True`` was given to the patch. A custom ``loss_function``,
  an lm_head that is not a bias-free ``nn.Linear`` or mismatched dtypes run HF's original computation.
- InternVL projector. ``InternVLModel.get_image_features``'s ``pixel_shuffle`` + ``InternVLMultiModalProjector``
  becomes one ``pixel_shuffle_projector`` call (HF's order is InternVL's "v2" shuffle; the projector's
  biases and LayerNorm eps are passed through). Only ``downsample_ratio == 0.5``, exact (erf) GELU and
  the stock projector layout are accepted.

``patch_*(model)`` patches one instance and raises on a model or configuration it cannot serve;
``patch_*()`` with no model patches the classes (models created before or after), serving only models
that use the default ``sdpa`` attention and falling back (with a warning) where a configuration is not
supported. Patching twice is harmless; ``unpatch(model)`` / ``unpatch()`` restore the originals.
Tested with transformers 5.23 (``pip install vita_ext[hf]``); other versions get a warning.
"""
from __future__ import annotations

import math
import types
import warnings
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from vita_ext.ops import attention_lse, masked_linear_cross_entropy, masked_lm_head, pixel_shuffle_projector

try:
    import transformers as _hf
    from transformers import AttentionInterface, GenerationMixin  # noqa: F401  (GenerationMixin: import check)
    from transformers.activations import GELUActivation
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import slice_logits_to_keep
    from transformers.models.internvl import modeling_internvl as _internvl
    from transformers.models.qwen2 import modeling_qwen2 as _qwen2
    from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
    from transformers.utils.output_capturing import select_hidden_states
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vita_ext.integrations.transformers needs Hugging Face transformers 5.23 "
        f"(`pip install vita_ext[hf]`); importing it failed: {exc}") from exc

__all__ = ["ATTN_IMPLEMENTATION", "ATTENTION_CALLS", "TESTED_TRANSFORMERS", "patch", "patch_internvl", "patch_qwen2",
           "unpatch", "vita_ext_attention_forward"]

ATTN_IMPLEMENTATION = "vita_ext"
TESTED_TRANSFORMERS = ("5.23.0", "5.24.0")  # [lowest tested, first untested)
# How attention calls were served: "vita_ext" or "fallback:<reason>". For diagnostics and tests.
ATTENTION_CALLS: Counter = Counter()

_MISSING = object()
_WARNED: set = set()
_STATE_ATTR = "_vita_ext_patch"


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_version() -> None:
    from packaging.version import Version

    found = Version(Version(_hf.__version__).base_version)
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    if not low <= found < high:
        warnings.warn(
            f"vita_ext.patch_*: transformers {_hf.__version__} is outside the tested range "
            f">={TESTED_TRANSFORMERS[0]},<{TESTED_TRANSFORMERS[1]}; the patched models may fail or compute "
            "something different. Install the tested version with `pip install vita_ext[hf]`.",
            UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------

_MASK_CACHE: dict = {}


def _key_ranges(mask, sq: int, sk: int):
    """Per-row key ranges [(lo, hi)] if ``mask`` is exactly "key j in [lo, hi) and j <= i + hi - Sq" (causal,
    bottom-right aligned to the range's end) for every row, else None. lo > 0 is left padding; hi < Sk are
    the empty slots of a static cache. The check costs as much as building the mask did; layers share one
    mask object, so the answer is cached on that object."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (sq, sk):
        return None
    cached = _MASK_CACHE.get("entry")
    if cached is not None and cached[0]() is mask and cached[1] == mask._version:
        return cached[2]
    m = mask[:, 0]
    masked_last = (~m[:, -1, :]).to(torch.int32)  # the last query sees every key of its range
    lo = masked_last.cumprod(-1).sum(-1)
    hi = sk - masked_last.flip(-1).cumprod(-1).sum(-1)
    i = torch.arange(sq, device=m.device)[None, :, None]
    j = torch.arange(sk, device=m.device)[None, None, :]
    expected = (j >= lo[:, None, None]) & (j <= i + (hi[:, None, None] - sq))
    ok = bool((hi > lo).all()) and torch.equal(m, expected)
    result = list(zip(lo.tolist(), hi.tolist())) if ok else None
    _MASK_CACHE["entry"] = (weakref.ref(mask), mask._version, result)
    return result


def _unsupported(query, key, value, attention_mask, dropout, kwargs) -> str | None:
    if dropout and dropout > 0:
        return "attention dropout"
    for name in ("softcap", "position_bias", "cache", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return name
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {query.dtype}"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return "mixed q/k/v dtypes"
    d = query.shape[-1]
    if d > 256 or key.shape[-1] != d or value.shape[-1] != d or query.shape[1] % key.shape[1] != 0:
        return "head shape"
    return None


def vita_ext_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function (``AttentionInterface``) served by ``vita_ext.attention_lse``.

    Args follow transformers' convention: query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] (after RoPE and
    the cache update), attention_mask from sdpa's mask builder (bool [B, 1, Sq, Sk] or None).
    Returns (attn_output [B, Sq, Hq, D], None). Semantics are sdpa_attention_forward's: with no mask,
    causal attention (``is_causal`` or ``module.is_causal``); a single query sees every key; a prefill into a
    larger static cache (Sk > Sq > 1, no mask) attends to the first Sq keys, as sdpa does.
    """
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    sq, sk = query.shape[2], key.shape[2]
    reason = _unsupported(query, key, value, attention_mask, dropout, kwargs)
    ranges = None
    if reason is None and attention_mask is not None:
        ranges = _key_ranges(attention_mask, sq, sk)
        if ranges is None:
            reason = "attention mask other than causal + left padding"
    if reason is None and attention_mask is None and causal and sk < sq:  # sdpa aligns top-left there
        reason = "fewer keys than queries"
    if reason is not None:
        ATTENTION_CALLS["fallback:" + reason] += 1
        _warn_once("attn:" + reason, f"vita_ext attention: {reason} is not served by attention_lse; running "
                   "transformers' sdpa attention for these calls (same results, no vita_ext speed-up).")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    ATTENTION_CALLS["vita_ext"] += 1
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # -> [B, S, H, D], last dim contiguous
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if attention_mask is None:
        if causal and 1 < sq < sk:  # prefill into a static cache: keys past Sq are empty slots (cf. sdpa)
            k, v = k[:, :sq], v[:, :sq]
        return attention_lse(q, k, v, causal=causal, softmax_scale=scaling)[0], None
    # Each row attends causally to its key range [lo, hi), bottom-right aligned to hi (left padding, static
    # cache slots): slicing the range out keeps that alignment, so attention_lse needs no mask.
    if len(set(ranges)) == 1:
        lo, hi = ranges[0]
        return attention_lse(q, k[:, lo:hi], v[:, lo:hi], causal=True, softmax_scale=scaling)[0], None
    rows = [attention_lse(q[b:b + 1], k[b:b + 1, lo:hi], v[b:b + 1, lo:hi], causal=True, softmax_scale=scaling)[0]
            for b, (lo, hi) in enumerate(ranges)]
    return torch.cat(rows, dim=0), None


def _register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, vita_ext_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


_register()


def _sdpa_override() -> AttentionInterface:
    """A model-local AttentionInterface whose "sdpa" entry is ours (transformers' documented way for a
    modeling file to override an implementation locally); used by the class-level patches."""
    interface = AttentionInterface()
    interface["sdpa"] = vita_ext_attention_forward
    return interface


# ----------------------------------------------------------------------------------------------------------
# LM head + loss
# ----------------------------------------------------------------------------------------------------------

def _head_weight(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """lm_head.weight if lm_head is a plain bias-free Linear in hidden's dtype and device, else None."""
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        return None
    w = lm_head.weight
    return w if (w.dtype == hidden.dtype and w.device == hidden.device) else None


def _kept_positions(logits_to_keep, b: int, s: int, device):
    """(flat row indices into [B*S] or None for all rows in order, leading shape of the logits), following
    ``slice_logits_to_keep``; NotImplemented for forms it does not know."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)):
        return NotImplemented
    base = torch.arange(b, device=device)[:, None] * s
    if isinstance(logits_to_keep, int):
        cols = range(s)[slice(-logits_to_keep, None)]
        if len(cols) == s:
            return None, (b, s)
        idx = torch.arange(cols.start, cols.stop, device=device)[None]
        return (base + idx).reshape(-1), (b, len(cols))
    keep = logits_to_keep.to(device)
    if keep.ndim == 2 and keep.dtype == torch.bool:
        if tuple(keep.shape) != (b, s):
            raise ValueError(f"logits_to_keep: a boolean mask must be [batch, seq] = {(b, s)}, got {tuple(keep.shape)}")
        pos = keep.reshape(-1).nonzero().squeeze(1)
        return pos, (pos.numel(),)
    if keep.ndim not in (1, 2) or keep.dtype.is_floating_point or keep.dtype == torch.bool:
        return NotImplemented
    idx = keep.long()
    idx = torch.where(idx < 0, idx + s, idx)
    if keep.ndim == 1:
        idx = idx[None].expand(b, -1)
    return (base + idx).reshape(-1), tuple(idx.shape)


def _causal_lm_loss(flat, weight, positions, labels, kwargs) -> torch.Tensor:
    """HF ForCausalLMLoss on the kept rows without their logits."""
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(device=flat.device, dtype=torch.long)
    rows = flat if positions is None else flat.index_select(0, positions)
    if rows.shape[0] != shift_labels.numel():
        raise ValueError(f"labels give {shift_labels.numel()} targets but logits_to_keep keeps {rows.shape[0]} "
                         "positions; as in transformers they must match (use logits_to_keep=0 with labels, or "
                         "pass shift_labels for the kept positions)")
    num_items = kwargs.get("num_items_in_batch")
    loss = masked_linear_cross_entropy(rows, weight, shift_labels, ignore_index,
                                       "mean" if num_items is None else "sum")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss


def _head_and_loss(model, hidden, labels, logits_to_keep, vocab_size, return_logits, kwargs):
    """(loss, logits) as HF's forward computes them, with the [T, V] logits built only where kept."""
    weight = _head_weight(model.lm_head, hidden)
    kept = _kept_positions(logits_to_keep, hidden.shape[0], hidden.shape[1], hidden.device)
    if weight is None or kept is NotImplemented or (labels is not None and model.loss_function is not ForCausalLMLoss):
        logits = model.lm_head(slice_logits_to_keep(hidden, logits_to_keep))  # HF's own computation
        loss = None if labels is None else model.loss_function(logits=logits, labels=labels,
                                                                vocab_size=vocab_size, **kwargs)
        return loss, logits
    positions, lead = kept
    flat = hidden.reshape(-1, hidden.shape[-1])
    loss = logits = None
    if labels is not None:
        loss = _causal_lm_loss(flat, weight, positions, labels, kwargs)
    if labels is None or return_logits:
        if positions is None:
            positions = torch.arange(flat.shape[0], device=flat.device)
        logits = masked_lm_head(flat, weight, positions).view(*lead, -1)
    return loss, logits


def _make_qwen2_forward(return_logits: bool):
    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        loss, logits = _head_and_loss(self, outputs.last_hidden_state, labels, logits_to_keep,
                                      self.config.vocab_size, return_logits, kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    forward.__doc__ = ("Qwen2ForCausalLM.forward patched by vita_ext: masked LM head at logits_to_keep, fused "
                       f"linear cross-entropy with labels (logits returned with labels: {return_logits}).")
    forward._vita_ext = True
    return forward


def _make_internvl_forward(return_logits: bool):
    @can_return_tuple
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, vision_feature_layer=None,
                vision_feature_select_strategy=None, labels=None, logits_to_keep=0, image_sizes=None,
                mm_encoder_outputs=None, **kwargs):
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy,
                             image_sizes=image_sizes, mm_encoder_outputs=mm_encoder_outputs, **kwargs)
        loss, logits = _head_and_loss(self, outputs[0], labels, logits_to_keep,
                                      self.config.text_config.vocab_size, return_logits, kwargs)
        return _internvl.InternVLCausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, image_hidden_states=outputs.image_hidden_states)

    forward.__doc__ = ("InternVLForConditionalGeneration.forward patched by vita_ext: masked LM head, fused "
                       f"linear cross-entropy with labels (logits returned with labels: {return_logits}).")
    forward._vita_ext = True
    return forward


# ----------------------------------------------------------------------------------------------------------
# InternVL pixel shuffle + projector
# ----------------------------------------------------------------------------------------------------------

def _is_exact_gelu(act: nn.Module) -> bool:
    return type(act) is GELUActivation or (type(act) is nn.GELU and act.approximate == "none")


def _overrides(cls: type, base: type, attr: str) -> bool:
    """True if a class between cls and base (exclusive) defines attr itself."""
    for klass in cls.__mro__:
        if klass is base:
            return False
        if attr in klass.__dict__:
            return True
    return True


def _projector_problems(core) -> list[str]:
    """Why InternVLModel ``core``'s pixel_shuffle + projector is not exactly pixel_shuffle_projector."""
    problems = []
    if core.config.downsample_ratio != 0.5:
        problems.append(f"downsample_ratio={core.config.downsample_ratio} (only 0.5 is supported)")
    if _overrides(type(core), _internvl.InternVLModel, "pixel_shuffle"):
        problems.append(f"{type(core).__name__} overrides pixel_shuffle")
    proj = core.multi_modal_projector
    if type(proj) is not _internvl.InternVLMultiModalProjector:
        return problems + [f"projector class {type(proj).__name__} (expected InternVLMultiModalProjector)"]
    ln = proj.layer_norm
    if type(ln) is not nn.LayerNorm or ln.weight is None or ln.bias is None:
        problems.append("projector layer_norm is not an affine nn.LayerNorm with bias")
    if type(proj.linear_1) is not nn.Linear or type(proj.linear_2) is not nn.Linear:
        problems.append("projector linear_1/linear_2 are not nn.Linear")
    if not _is_exact_gelu(proj.act):
        problems.append(f"projector activation {type(proj.act).__name__} "
                        f"(projector_hidden_act={core.config.projector_hidden_act!r}; only exact 'gelu' is supported)")
    return problems


@merge_with_config_defaults
@can_return_tuple
@select_hidden_states("vision_feature_layer")
def _fused_get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                              **kwargs):
    """InternVLModel.get_image_features with pixel_shuffle + projector served by pixel_shuffle_projector."""
    pixel_values = pixel_values.to(dtype=self.dtype)
    vision_outputs = self.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
    if vision_feature_layer == -1:
        features = vision_outputs.last_hidden_state
    else:
        features = vision_outputs.hidden_states[vision_feature_layer]
    if vision_feature_select_strategy == "default":
        features = features[:, 1:, :]
    length = features.shape[1]
    side = math.isqrt(length)
    if side * side != length or side % 2:
        raise ValueError(f"vita_ext InternVL projector: {length} vision features per image do not form an even "
                         f"square grid (vision_feature_select_strategy={vision_feature_select_strategy!r})")
    p = self.multi_modal_projector
    vision_outputs.pooler_output = pixel_shuffle_projector(
        features.contiguous(), p.layer_norm.weight, p.layer_norm.bias, p.linear_1.weight, p.linear_2.weight,
        eps=p.layer_norm.eps, b1=p.linear_1.bias, b2=p.linear_2.bias)
    return vision_outputs


_fused_get_image_features._vita_ext = True


def _class_get_image_features(self, *args, **kwargs):
    """Class-level patch: the fused path where the configuration allows it, HF's original otherwise."""
    problems = _projector_problems(self)
    if problems:
        _warn_once("proj:" + ";".join(problems), "vita_ext.patch_internvl(): this InternVL configuration is not "
                   f"served by pixel_shuffle_projector ({'; '.join(problems)}); using transformers' projector.")
        return _CLASS_PATCHES["internvl.projector"][2](self, *args, **kwargs)
    return _fused_get_image_features(self, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------------------------

_CLASS_PATCHES: dict = {}  # key -> (owner, attribute, original value or _MISSING)


def _set_class_attr(key: str, owner, attr: str, value) -> None:
    if key not in _CLASS_PATCHES:
        _CLASS_PATCHES[key] = (owner, attr, owner.__dict__.get(attr, _MISSING))
    setattr(owner, attr, value)


def _restore_class_attrs(prefix: str = "") -> None:
    for key in [k for k in _CLASS_PATCHES if k.startswith(prefix)][::-1]:
        owner, attr, original = _CLASS_PATCHES.pop(key)
        if original is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)


def _attn_spec(config) -> dict:
    """The attention implementation of config and its sub-configs, in set_attn_implementation's dict form."""
    spec = {"": config._attn_implementation}
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None:
            spec[name] = _attn_spec(sub)
    return spec


def _plain_head_problem(model) -> str | None:
    lm_head = model.lm_head
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        return f"lm_head is {type(lm_head).__name__} (bias={getattr(lm_head, 'bias', None) is not None}), " \
               "not a bias-free nn.Linear (pass lm_head=False)"
    return None


def _wrapped_instance_problem(model, attr: str) -> str | None:
    """Someone else (e.g. accelerate's hooks under device_map) already replaced ``attr`` on this instance;
    replacing it again would drop their wrapper, so the instance patch refuses."""
    if attr in model.__dict__ and not getattr(model.__dict__[attr], "_vita_ext", False):
        return (f"{type(model).__name__}.{attr} is already wrapped on this instance (e.g. by accelerate hooks); "
                "use the class-level patch (no model argument) or switch this part off")
    return None


def _apply_instance(model, state: dict, *, attention: bool, forward=None, core=None) -> None:
    if attention:
        state["attn"] = _attn_spec(model.config)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(state.pop("attn"))
            raise RuntimeError(f"vita_ext: {type(model).__name__} refused set_attn_implementation('vita_ext')")
    if forward is not None:
        model.forward = types.MethodType(forward, model)
        state["forward"] = True
    if core is not None:
        core.get_image_features = types.MethodType(_fused_get_image_features, core)
        state["image_features"] = core
    setattr(model, _STATE_ATTR, state)


def _check_kind(model, kinds: tuple, fn: str) -> None:
    if not isinstance(model, kinds):
        names = ", ".join(k.__name__ for k in kinds)
        raise TypeError(f"vita_ext.{fn}: unsupported model class {type(model).__name__}; supported: {names}. "
                        "Other architectures are not patched (nothing was changed).")


def patch_qwen2(model: nn.Module | None = None, *, lm_head: bool = True, attention: bool = True,
                return_logits: bool = False):
    """Serve a transformers Qwen2 model with vita_ext's kernels.

    Args:
        model: a ``Qwen2ForCausalLM`` (or a subclass that does not override ``forward``; with
            ``lm_head=False`` any subclass) or a ``Qwen2Model`` (attention only). None patches the classes:
            ``Qwen2ForCausalLM.forward`` and the attention of every Qwen2 model using the default "sdpa".
        lm_head: replace the LM head + loss (masked_lm_head at ``logits_to_keep``,
            masked_linear_cross_entropy with labels; ``logits`` is None when labels are given).
        attention: serve attention with attention_lse (instance: ``set_attn_implementation("vita_ext")``).
        return_logits: also return the kept logits when labels are given (costs the [T, V] logits).

    Returns:
        The model (patched in place), or None for the class-level patch.

    Raises:
        TypeError for another model class; ValueError for a configuration the patch cannot serve exactly
        (nothing is changed then). Warns for a transformers version outside ``TESTED_TRANSFORMERS``.
    """
    _check_version()
    if model is None:
        _restore_class_attrs("qwen2.")
        if attention:
            _set_class_attr("qwen2.attention", _qwen2, "ALL_ATTENTION_FUNCTIONS", _sdpa_override())
        if lm_head:
            _set_class_attr("qwen2.head", _qwen2.Qwen2ForCausalLM, "forward", _make_qwen2_forward(return_logits))
        return None
    _check_kind(model, (_qwen2.Qwen2ForCausalLM, _qwen2.Qwen2Model), "patch_qwen2")
    head = lm_head and isinstance(model, _qwen2.Qwen2ForCausalLM)
    problems = []
    if head and _overrides(type(model), _qwen2.Qwen2ForCausalLM, "forward"):
        problems.append(f"{type(model).__name__} overrides forward (pass lm_head=False to patch attention only)")
    if head and (p := _plain_head_problem(model)):
        problems.append(p)
    if head and (p := _wrapped_instance_problem(model, "forward")):
        problems.append(p)
    if problems:
        raise ValueError("vita_ext.patch_qwen2: cannot patch this model: " + "; ".join(problems))
    unpatch(model)
    _apply_instance(model, {}, attention=attention, forward=_make_qwen2_forward(return_logits) if head else None)
    return model


def patch_internvl(model: nn.Module | None = None, *, lm_head: bool = True, attention: bool = True,
                   projector: bool = True, return_logits: bool = False):
    """Serve a transformers InternVL model (Qwen2 text model) with vita_ext's kernels.

    Args:
        model: an ``InternVLForConditionalGeneration`` or ``InternVLModel`` whose ``text_config`` is Qwen2.
            None patches the classes (``InternVLForConditionalGeneration.forward``,
            ``InternVLModel.get_image_features``, and the "sdpa" attention of the InternVL vision tower and
            of Qwen2 models).
        lm_head: replace the LM head + loss (as ``patch_qwen2``); only for ``InternVLForConditionalGeneration``.
        attention: serve the vision tower's and the language model's attention with attention_lse.
        projector: serve pixel_shuffle + InternVLMultiModalProjector with pixel_shuffle_projector. Needs
            ``downsample_ratio == 0.5``, ``projector_hidden_act == "gelu"`` (exact erf GELU) and the stock
            LayerNorm -> Linear -> GELU -> Linear projector (its biases and LayerNorm eps are used).
        return_logits: also return the kept logits when labels are given.

    Returns:
        The model, or None for the class-level patch.

    Raises:
        TypeError for another model class; ValueError for a configuration it cannot serve (nothing is
        changed then). Warns for a transformers version outside ``TESTED_TRANSFORMERS``.
    """
    _check_version()
    if model is None:
        _restore_class_attrs("internvl.")
        if attention:
            _set_class_attr("internvl.attention", _internvl, "ALL_ATTENTION_FUNCTIONS", _sdpa_override())
            _set_class_attr("qwen2.attention", _qwen2, "ALL_ATTENTION_FUNCTIONS", _sdpa_override())
        if projector:
            _set_class_attr("internvl.projector", _internvl.InternVLModel, "get_image_features",
                            _class_get_image_features)
        if lm_head:
            _set_class_attr("internvl.head", _internvl.InternVLForConditionalGeneration, "forward",
                            _make_internvl_forward(return_logits))
        return None
    cg = _internvl.InternVLForConditionalGeneration
    _check_kind(model, (cg, _internvl.InternVLModel), "patch_internvl")
    core = model.model if isinstance(model, cg) else model
    head = lm_head and isinstance(model, cg)
    problems = []
    text_type = getattr(model.config.text_config, "model_type", None)
    if text_type != "qwen2":
        problems.append(f"text model {text_type!r} (only 'qwen2' is supported)")
    if projector:
        problems += _projector_problems(core)
    if head and _overrides(type(model), cg, "forward"):
        problems.append(f"{type(model).__name__} overrides forward (pass lm_head=False)")
    if head and (p := _plain_head_problem(model)):
        problems.append(p)
    if head and (p := _wrapped_instance_problem(model, "forward")):
        problems.append(p)
    if projector and (p := _wrapped_instance_problem(core, "get_image_features")):
        problems.append(p)
    if problems:
        raise ValueError("vita_ext.patch_internvl: cannot patch this model: " + "; ".join(problems))
    unpatch(model)
    _apply_instance(model, {}, attention=attention, forward=_make_internvl_forward(return_logits) if head else None,
                    core=core if projector else None)
    return model


def unpatch(model: nn.Module | None = None):
    """Undo ``patch_qwen2`` / ``patch_internvl``: on ``model`` (restoring its attention implementations,
    forward and get_image_features), or with no argument every class-level patch. Unpatching something that
    is not patched does nothing. Returns the model (or None)."""
    if model is None:
        _restore_class_attrs()
        return None
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    if "attn" in state:
        model.set_attn_implementation(state["attn"])
    if state.get("forward"):
        del model.forward
    if "image_features" in state:
        del state["image_features"].get_image_features
    return model


def patch(model: nn.Module, **options):
    """Patch a transformers model instance with vita_ext's kernels, choosing by its class:
    InternVL models go to ``patch_internvl``, Qwen2 models to ``patch_qwen2`` (options are passed on).

    Returns the model. Raises TypeError for any other class (nothing is changed).
    """
    if isinstance(model, (_internvl.InternVLForConditionalGeneration, _internvl.InternVLModel)):
        return patch_internvl(model, **options)
    if isinstance(model, (_qwen2.Qwen2ForCausalLM, _qwen2.Qwen2Model)):
        return patch_qwen2(model, **options)
    raise TypeError(f"vita_ext.patch: unsupported model class {type(model).__name__}; supported: Qwen2ForCausalLM, "
                    "Qwen2Model, InternVLForConditionalGeneration, InternVLModel (nothing was changed)")
