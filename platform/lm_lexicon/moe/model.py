"""The LM-Lexicon mixture of experts: the experts' dense model with every FFN replaced by N experts and a router.

Paper §3.3, eq. (2): at layer l, the FFN becomes

    FFN_MoE^l(x) = sum_i G(x)_i * FFN_i^l(x)

where FFN_i^l is expert i's FFN (trained on semantic domain i) and everything else — attention, norms, embeddings,
LM head — is the mean of the experts' weights (see :mod:`lm_lexicon.moe.merge`). The router G is one of four
policies (paper Table 4; Appendix Alg. 3):

=================  ====================================================  =============================================
policy             G                                                     cost per token
=================  ====================================================  =============================================
``domain``         one-hot of the sequence's domain label, given from    one FFN (exactly the dense model's cost)
                   outside: the nearest centroid of the prompt embedding
                   (:class:`lm_lexicon.partition.routing.DomainRouter`)
``token``          softmax over the top-k of ``W^l x`` (k=2), per token  k FFNs; + load-balancing auxiliary loss
``soft-sequence``  softmax of ``W^l x`` averaged over the sequence       N FFNs (a dense mixture)
``hard-sequence``  one-hot argmax of ``W^l x`` averaged over the sequence  one FFN
=================  ====================================================  =============================================

Under ``domain`` (and ``hard-sequence``) the MoE restricted to one sequence IS a dense model (shared weights +
expert i's FFN). So each sequence runs through its own expert only: the batch is grouped by expert, each group is
gathered, run through that one FFN and scattered back. The official implementation instead runs every expert on
the whole batch and multiplies by a 0/1 mask — N times the FFN cost for the same numbers.

How the routing inputs reach the FFNs: a transformers decoder layer calls ``self.mlp(hidden_states)`` with nothing
else, so the per-forward inputs (domain labels ``[batch]``, which positions vote in a sequence-level decision, the
router logits recorded for the auxiliary loss) live in one :class:`RoutingContext` shared by the model and all its
MoE blocks. :meth:`LexiconMoEForCausalLM.forward` fills it from its keyword arguments before running the layers.
``domain_labels`` is a forward argument, so ``generate(..., domain_labels=labels)`` carries it to every decoding step;
generation also expands it with the batch for ``num_return_sequences`` / beams, so every sequence keeps its label.
The context is left in place after the forward (and overwritten by the next one), so that activation
checkpointing, which re-runs layers during backward, routes the recomputation the same way — which means: with
checkpointing on, call ``backward()`` before the next forward (as any forward/backward loop does).

Sequence-level routing in a causal LM: a decision made from the whole sequence would let a position see the
future through the gate. The decision is therefore made from the positions in ``routing_mask`` (default: every real
token of the first forward) and, during cached generation, fixed at the prefill (the prompt) and reused for every
generated token. Pass ``routing_mask`` = the prompt positions when training so that training matches generation.

Key names: see :mod:`lm_lexicon.moe.ffn_spec` (``lm.model.layers.{l}.mlp.experts.{i}.*``, ``...mlp.gate.weight``).
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from lm_lexicon.moe.ffn_spec import MOE_PREFIX, FFNSpec, get_spec, spec_for_config
from lm_lexicon.moe.hf_config import ROUTING_POLICIES, SECTION, config_class

LexiconMoEConfig = config_class()
# the name of the KV cache in model outputs: `cache` in recent transformers, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# =================================================================================================== routing inputs
class RoutingContext:
    """Per-forward routing inputs shared by the model and all its MoE blocks (see the module docstring)."""

    def __init__(self) -> None:
        self.domain_labels: Optional[torch.Tensor] = None  # [batch] long: expert of each sequence (domain policy)
        self.domain_groups: list[tuple[int, torch.Tensor]] = []  # (expert, rows [B_e]) of each domain present
        self.sequence_mask: Optional[torch.Tensor] = None  # [batch, seq] bool: positions that vote (sequence policies)
        self.continuing = False  # this forward extends sequences already in the KV cache (a decoding step)
        self.record_router_logits = False  # token policy: keep gate logits for the auxiliary loss
        self.router_logits: dict[int, torch.Tensor] = {}  # layer -> [batch * seq, N]
        self.sequence_probs: dict[int, torch.Tensor] = {}  # layer -> [batch, N], decided at the prefill

    def begin(self, *, domain_labels, sequence_mask, continuing: bool, record_router_logits: bool) -> None:
        self.domain_labels = domain_labels
        # Grouped once per forward, not once per layer: every layer routes the same labels, and finding the groups
        # costs a host sync (unique, nonzero) that would otherwise be paid L times per decoding step.
        self.domain_groups = group_rows(domain_labels) if domain_labels is not None else []
        self.sequence_mask = sequence_mask
        self.continuing = continuing
        self.record_router_logits = record_router_logits
        self.router_logits = {}  # by layer index: a recomputation (activation checkpointing) overwrites, not appends
        if not continuing:
            self.sequence_probs = {}


def group_rows(expert_of_row: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(e, rows)]`` for each expert e present in ``expert_of_row`` ``[B]``, rows ``[B_e]`` in batch order."""
    experts = torch.unique(expert_of_row).tolist()
    if len(experts) == 1:
        return [(experts[0], torch.arange(expert_of_row.shape[0], device=expert_of_row.device))]
    return [(e, (expert_of_row == e).nonzero().squeeze(1)) for e in experts]


# =================================================================================================== the MoE layer
class MoEFeedForward(nn.Module):
    """One layer's FFN as N experts plus a router gate ``W^l``: a drop-in for the dense FFN module.

    ``experts`` are the family's own FFN modules (``LlamaMLP``, BERT's intermediate + output projection), each
    mapping ``[n, hidden] -> [n, hidden]``. The gate exists under every policy (unused by ``domain``), so one
    checkpoint can be re-routed with another policy and fine-tuned.
    """

    def __init__(self, experts: Sequence[nn.Module], hidden_size: int, routing: str, top_k: int, layer_index: int,
                 context: RoutingContext):
        super().__init__()
        if routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {routing!r}")
        self.gate = nn.Linear(hidden_size, len(experts), bias=False)  # W^l: [N, hidden]
        self.experts = nn.ModuleList(experts)
        self.routing = routing
        self.top_k = min(int(top_k), len(experts))
        self.layer_index = layer_index
        self.context = context  # a plain object shared with the model, not a submodule

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def extra_repr(self) -> str:
        return f"routing={self.routing!r}, n_experts={self.n_experts}, top_k={self.top_k}, layer={self.layer_index}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        if self.routing == "domain":
            return self._domain(hidden_states)
        if self.routing == "token":
            return self._token_top_k(hidden_states)
        if self.routing == "soft-sequence":
            return self._soft_sequence(hidden_states)
        return self._hard_sequence(hidden_states)

    # ---- domain: G(x) = one_hot(label of x's sequence) ----
    def _domain(self, x: torch.Tensor) -> torch.Tensor:
        labels = self.context.domain_labels  # [B]
        if labels is None:
            raise ValueError("domain routing needs domain_labels: pass domain_labels=[batch] (the DomainRouter's "
                             "domain of each prompt) to forward() or generate()")
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"{labels.shape[0]} domain labels for a batch of {x.shape[0]} sequences")
        return self._one_expert_per_sequence(x, self.context.domain_groups)

    def _one_expert_per_sequence(self, x: torch.Tensor, groups: list[tuple[int, torch.Tensor]],
                                 scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run each sequence ``x[b]`` ``[T, H]`` through its expert only. ``groups``: ``[(e, rows [B_e])]``;
        ``scale`` ``[B]`` multiplies each row's output (the straight-through weight of hard-sequence routing)."""
        if len(groups) == 1:  # one domain in the batch (serving per domain): no gather/scatter at all
            y = self.experts[groups[0][0]](x)  # [B, T, H]
            return y if scale is None else y * scale.view(-1, 1, 1).to(y.dtype)
        out = None
        for e, rows in groups:
            rows = rows.to(x.device)  # a no-op unless layers sit on several devices (pipeline parallel)
            y = self.experts[e](x.index_select(0, rows))  # [B_e, T, H]
            if scale is not None:
                y = y * scale.index_select(0, rows).view(-1, 1, 1).to(y.dtype)
            if out is None:
                out = x.new_empty(x.shape, dtype=y.dtype)  # expert dtype (autocast may differ from the residual's)
            out.index_copy_(0, rows, y)  # [B, T, H]: rows of different groups never overlap
        return out

    # ---- token top-k: G(x) = Softmax(TopK(W^l x)) ----
    def _token_top_k(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)  # [B*T, H]
        logits = self.gate(flat)  # [B*T, N]
        if self.context.record_router_logits:
            self.context.router_logits[self.layer_index] = logits
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # [B*T, k], [B*T, k]
        weights = F.softmax(top_logits, dim=-1, dtype=torch.float32)  # [B*T, k]: renormalised over the chosen k
        out = None
        for e in torch.unique(top_experts).tolist():
            token_idx, slot = (top_experts == e).nonzero(as_tuple=True)  # [n_e], [n_e]
            y = self.experts[e](flat.index_select(0, token_idx))  # [n_e, H]
            y = y * weights[token_idx, slot].unsqueeze(-1).to(y.dtype)
            if out is None:
                out = flat.new_zeros(flat.shape, dtype=y.dtype)
            out.index_add_(0, token_idx, y)  # [B*T, H]: each token sums its k weighted experts
        return out.view(batch, seq, hidden)

    # ---- sequence level: G from W^l x averaged over the sequence ----
    def _sequence_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``softmax(mean_t W^l x_t)`` ``[B, N]`` over the voting positions; during cached generation, the value
        computed at the prefill (the prompt) is reused for every generated token."""
        ctx = self.context
        if ctx.continuing:
            cached = ctx.sequence_probs.get(self.layer_index)
            if cached is None:
                raise RuntimeError("sequence-level routing got a KV cache but no routing decision for it: the "
                                   "cache must come from a previous forward of this model (the prefill)")
            if cached.shape[0] != x.shape[0]:
                raise RuntimeError(f"cached sequence routes are for {cached.shape[0]} sequences, batch has {x.shape[0]}")
            return cached
        logits = self.gate(x)  # [B, T, N]
        mask = ctx.sequence_mask  # [B, T] bool or None
        if mask is None:
            mean_logits = logits.mean(dim=1)  # [B, N]
        else:
            m = mask.to(logits.device, logits.dtype).unsqueeze(-1)  # [B, T, 1]
            mean_logits = (logits * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # [B, N]
        probs = F.softmax(mean_logits, dim=-1, dtype=torch.float32)  # [B, N]
        ctx.sequence_probs[self.layer_index] = probs.detach()
        return probs

    def _soft_sequence(self, x: torch.Tensor) -> torch.Tensor:
        probs = self._sequence_probs(x)  # [B, N]
        out = 0
        for e, expert in enumerate(self.experts):  # a dense mixture: every expert runs, by definition
            y = expert(x)  # [B, T, H]
            out = out + y * probs[:, e].view(-1, 1, 1).to(y.dtype)
        return out

    def _hard_sequence(self, x: torch.Tensor) -> torch.Tensor:
        probs = self._sequence_probs(x)  # [B, N]
        chosen = probs.argmax(dim=-1)  # [B]
        scale = None
        if probs.requires_grad:
            # Straight-through: the output is the chosen expert's, unscaled (value 1), while the gate still gets the
            # gradient of p_chosen — an argmax alone would leave W^l untrainable.
            p = probs.gather(1, chosen[:, None]).squeeze(1)  # [B]
            scale = p - p.detach() + 1.0
        return self._one_expert_per_sequence(x, group_rows(chosen), scale)


# =================================================================================================== auxiliary loss
def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-Transformer load balancing, averaged over layers: ``N * sum_e f_e * P_e``.

    ``f_e``: fraction of the (token, slot) assignments that went to expert e (sums to 1); ``P_e``: mean router
    probability of e. Equals 1 for perfectly balanced routing and grows to N when one expert takes everything.
    Averaged (not summed) over layers so the coefficient does not depend on depth. Padding tokens
    (``token_mask`` ``[n_tokens]`` False) do not count. (Mixtral's variant counts the k slots per token, i.e. k times
    this, and pools layers before the product.)
    """
    losses = []
    for logits in router_logits:  # [n_tokens, N]
        n_experts = logits.shape[-1]
        probs = F.softmax(logits.float(), dim=-1)  # [n, N]
        chosen = probs.topk(min(top_k, n_experts), dim=-1).indices  # [n, k]
        assigned = F.one_hot(chosen, n_experts).sum(dim=1).float()  # [n, N] 0/1
        if token_mask is None:
            w = torch.ones(probs.shape[0], 1, device=probs.device)
        else:
            w = token_mask.reshape(-1, 1).to(probs.device, torch.float32)  # [n, 1]
        total = w.sum().clamp_min(1.0)
        f = (assigned * w).sum(dim=0) / (total * chosen.shape[-1])  # [N]
        p = (probs * w).sum(dim=0) / total  # [N]
        losses.append(n_experts * (f * p).sum())
    return torch.stack([loss.to(losses[0].device) for loss in losses]).mean()


# =================================================================================================== the model
class LexiconMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """The experts' own ``*ForCausalLM`` (``self.lm``, built from ``config.text_config``) with every layer's FFN
    replaced by a :class:`MoEFeedForward`. A transformers model: ``from_pretrained``/``save_pretrained``/``generate``
    work as for the dense model, plus the routing arguments of :meth:`forward`."""

    config_class = LexiconMoEConfig
    config: LexiconMoEConfig
    base_model_prefix = "lm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: LexiconMoEConfig):
        super().__init__(config)
        self.spec: FFNSpec = get_spec(config.ffn_spec)
        self.routing_context = RoutingContext()
        self._default_routing_inputs: Optional[dict] = None  # see routing_inputs()
        lm = AutoModelForCausalLM.from_config(config.text_config)
        hidden_size = config.text_config.hidden_size
        for index, layer in enumerate(self.spec.decoder_layers(lm)):
            experts = [self.spec.take_ffn(layer) for _ in range(config.n_experts)]
            block = MoEFeedForward(experts, hidden_size, config.routing, config.num_experts_per_tok, index,
                                   self.routing_context)
            self.spec.install(layer, block)
        self.lm = lm
        self.post_init()

    # ---- plumbing transformers expects of a causal LM ----
    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.lm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.lm.set_output_embeddings(new_embeddings)

    def moe_blocks(self) -> list[MoEFeedForward]:
        """The MoE block of each layer, in layer order."""
        return [getattr(layer, self.spec.slot) for layer in self.spec.decoder_layers(self.lm)]

    @property
    def routing(self) -> str:
        return self.config.routing

    def set_routing(self, routing: str, top_k: Optional[int] = None) -> None:
        """Switch the routing policy in place (e.g. evaluate a domain-merged model with token routing)."""
        if routing not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {ROUTING_POLICIES}, got {routing!r}")
        section = dict(self.config.lm_lexicon_moe, routing=routing)
        if top_k is not None:
            section["top_k"] = int(top_k)
        self.config.lm_lexicon_moe = section
        for block in self.moe_blocks():
            block.routing = routing
            block.top_k = min(self.config.num_experts_per_tok, block.n_experts)

    @contextlib.contextmanager
    def routing_inputs(self, domain_labels: Any = None, routing_mask: Optional[torch.Tensor] = None):
        """Supply ``domain_labels`` / ``routing_mask`` to every forward inside the block that does not pass its own.

        For code that calls the model without knowing about routing, e.g. :func:`lm_lexicon.train.definition_nll`::

            with model.routing_inputs(domain_labels=batch_domains):
                nll, n = definition_nll(model, batch)
        """
        saved = self._default_routing_inputs
        self._default_routing_inputs = {"domain_labels": domain_labels, "routing_mask": routing_mask}
        try:
            yield self
        finally:
            self._default_routing_inputs = saved

    def set_trainable(self, experts: bool = True, gates: Optional[bool] = None, shared: bool = False) -> int:
        """Freeze everything but what the post-merge fine-tune trains (paper §3.3: "slightly fine-tune the router and
        expert layers"); return the number of trainable parameters.

        ``gates=None`` trains the gates unless routing is ``domain`` (its gates are unused: no gradient reaches them).
        ``shared=True`` also trains attention, norms, embeddings and the LM head (the averaged weights).
        """
        if gates is None:
            gates = self.config.routing != "domain"
        for p in self.parameters():
            p.requires_grad_(shared)
        for block in self.moe_blocks():
            block.gate.weight.requires_grad_(gates)
            for p in block.experts.parameters():
                p.requires_grad_(experts)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- forward ----
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        domain_labels: Any = None,
        routing_mask: Optional[torch.Tensor] = None,
        output_router_logits: Optional[bool] = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """The dense model's forward, plus:

        * ``domain_labels`` ``[batch]`` (or one int for the whole batch): the expert of each sequence under
          ``domain`` routing (required then, ignored otherwise). ``generate(..., domain_labels=...)`` passes it on.
        * ``routing_mask`` ``[batch, seq']`` (sequence policies): the positions whose gate logits decide the route,
          e.g. the prompt; positions beyond ``seq'`` (generated ones) never vote. Default: ``attention_mask``.
        * ``output_router_logits``: return the token policy's gate logits (per layer, ``[batch*seq, N]``).

        Returns ``MoeCausalLMOutputWithPast``; ``aux_loss`` is the load-balancing loss (token routing, computed in
        training mode, with ``labels`` or with ``output_router_logits``); ``loss`` (with ``labels``) already
        includes ``config.aux_loss_coef * aux_loss``.
        """
        if self._default_routing_inputs is not None:
            if domain_labels is None:
                domain_labels = self._default_routing_inputs["domain_labels"]
            if routing_mask is None:
                routing_mask = self._default_routing_inputs["routing_mask"]
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("pass input_ids or inputs_embeds")
        batch, seq = reference.shape[:2]
        device = reference.device
        # transformers renamed the KV cache argument: its generate() passes `cache=` (in **kwargs here), older
        # releases and older callers `past_key_values=`. Either one tells a decoding step from a prefill.
        cache = kwargs.get("cache", past_key_values)
        continuing = cache is not None and cache.get_seq_length() > 0
        token_routing = self.config.routing == "token"
        want_aux = token_routing and (self.training or labels is not None or bool(output_router_logits))
        token_mask = attention_mask[:, -seq:].bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        self.routing_context.begin(
            domain_labels=self._domain_labels(domain_labels, batch, device),
            sequence_mask=self._sequence_mask(routing_mask, token_mask, seq),
            continuing=continuing,
            record_router_logits=want_aux,
        )
        if past_key_values is not None:  # passed on under the caller's name, which this transformers accepts
            kwargs["past_key_values"] = past_key_values
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                      logits_to_keep=logits_to_keep, **kwargs)
        aux_loss, router_logits = None, None
        if want_aux:
            router_logits = tuple(self.routing_context.router_logits[i] for i in sorted(self.routing_context.router_logits))
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts_per_tok,
                                           token_mask.reshape(-1) if token_mask is not None else None)
        loss = out.loss
        if loss is not None and aux_loss is not None and self.config.aux_loss_coef > 0:
            loss = loss + self.config.aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=out.logits, hidden_states=out.hidden_states,
            attentions=out.attentions, router_logits=router_logits if output_router_logits else None,
            **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    def _domain_labels(self, domain_labels, batch: int, device) -> Optional[torch.Tensor]:
        if domain_labels is None:
            return None
        labels = torch.as_tensor(domain_labels, device=device)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"domain_labels must be integers, got {labels.dtype}")
        labels = labels.long()
        if labels.dim() == 0:
            labels = labels.expand(batch)
        labels = labels.reshape(-1)
        if labels.shape[0] != batch:
            raise ValueError(f"{labels.shape[0]} domain labels for a batch of {batch} sequences")
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= self.config.n_experts):
            raise ValueError(f"domain labels must lie in [0, {self.config.n_experts}), got "
                             f"{sorted(set(labels.tolist()))}")
        return labels

    @staticmethod
    def _sequence_mask(routing_mask, token_mask, seq: int) -> Optional[torch.Tensor]:
        if routing_mask is None:
            return token_mask
        mask = torch.as_tensor(routing_mask).bool()
        if mask.shape[1] < seq:  # generated positions (beyond the given prompt mask) never vote
            mask = F.pad(mask, (0, seq - mask.shape[1]), value=False)
        return mask[:, -seq:]


# =================================================================================================== building
def moe_config(text_config, n_experts: int, routing: str = "domain", top_k: int = 2, aux_loss_coef: float = 0.01,
               **section) -> LexiconMoEConfig:
    """A :class:`LexiconMoEConfig` for ``n_experts`` experts of architecture ``text_config``."""
    spec = spec_for_config(text_config)
    if not isinstance(text_config, dict):
        text_config = copy.deepcopy(text_config)  # the MoE sets attention/dtype fields on it: leave the dense one alone
    body = dict(section, n_experts=int(n_experts), routing=routing, top_k=int(top_k),
                aux_loss_coef=float(aux_loss_coef), ffn_spec=spec.name)
    config = LexiconMoEConfig(text_config=text_config, lm_lexicon_moe=body)
    config.architectures = [LexiconMoEForCausalLM.__name__]
    return config


def moe_from_dense(dense_model, n_experts: int, routing: str = "domain", top_k: int = 2,
                   aux_loss_coef: float = 0.01, seed: int = 0) -> LexiconMoEForCausalLM:
    """Upcycle one dense model in memory: every expert is a copy of its FFN, shared weights are its own, gates are
    ``N(0, initializer_range)`` drawn with ``seed``. With identical experts every policy computes the dense model's
    function — the first parity check of the MoE code."""
    config = moe_config(dense_model.config, n_experts, routing, top_k, aux_loss_coef, seed=seed)
    torch.manual_seed(seed)
    moe = LexiconMoEForCausalLM(config)
    spec = moe.spec
    state = {}
    for key, value in dense_model.state_dict().items():
        parsed = spec.parse_dense_key(key)
        if parsed is None:
            state[MOE_PREFIX + key] = value
        else:
            layer, rel = parsed
            for i in range(n_experts):
                state[spec.expert_key(layer, i, rel)] = value
    result = moe.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if spec.parse_moe_key(k)[0] != "gate"]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"dense weights do not fit the MoE: missing {missing[:5]}, "
                           f"unexpected {list(result.unexpected_keys)[:5]}")
    moe.generation_config = dense_model.generation_config
    return moe.to(next(dense_model.parameters()).dtype).eval()


@torch.no_grad()
def calibrate_gates(model: LexiconMoEForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    domain_labels: torch.Tensor, scale: float = 1.0) -> None:
    """Set each layer's gate so that it routes like the domains: row e of ``W^l`` = the mean FFN input of domain
    e's tokens minus the mean over all tokens (made orthogonal to that mean), normalised, times
    ``scale / sqrt(hidden)``.

    Why: the centroids live in the embedder's space, not in layer l's hidden space, so they can seed a gate only
    when both spaces coincide. Running the model once over a few labelled prompts gives the domains' centroids in
    each layer's own space; with the common component removed, ``W^l x`` scores how much x leans towards each
    domain (a nearest-centroid rule). The forward uses domain routing, so the features are those the domain
    experts produce. Call after loading, before token/sequence fine-tuning.
    """
    blocks = model.moe_blocks()
    captured: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0].detach()))
             for i, b in enumerate(blocks)]
    saved = model.config.routing
    try:
        model.set_routing("domain")
        model(input_ids=input_ids, attention_mask=attention_mask, domain_labels=domain_labels, use_cache=False)
    finally:
        model.set_routing(saved)
        for h in hooks:
            h.remove()
    labels = domain_labels.view(-1, 1).expand(input_ids.shape).reshape(-1)  # [B*T]
    real = attention_mask.reshape(-1).bool()  # [B*T]
    for i, block in enumerate(blocks):
        h = captured[i].reshape(-1, captured[i].shape[-1]).float()[real]  # [n, H]
        lab = labels[real]
        overall = h.mean(dim=0)  # [H]
        common = F.normalize(overall, dim=0)
        rows = torch.zeros_like(block.gate.weight, dtype=torch.float32)  # [N, H]
        for e in range(block.n_experts):
            if (lab == e).any():
                r = h[lab == e].mean(dim=0) - overall
                # orthogonal to the common mean, so that x . r = (x - mean) . r: the gate has no bias to subtract it
                rows[e] = F.normalize(r - (r @ common) * common, dim=0)
        block.gate.weight.copy_((rows * scale / h.shape[-1] ** 0.5).to(block.gate.weight.dtype))


# =================================================================================================== loading
class LoadedMoE(NamedTuple):
    """What :func:`load` returns: ready for ``generate`` (eval mode), plus the centroid router that picks domains."""

    model: LexiconMoEForCausalLM
    tokenizer: Any
    router: Any  # lm_lexicon.partition.routing.DomainRouter or None

    def domain_labels(self, prompts: Sequence[str]) -> torch.Tensor:
        """Domain of each prompt by the nearest centroid (the router needs its embedder: ``load(load_embedder=True)``)."""
        if self.router is None:
            raise ValueError("this MoE has no router directory")
        return torch.as_tensor(self.router.route_prompts(list(prompts)), dtype=torch.long, device=self.model.device)


def read_moe_config(path: str | Path) -> dict:
    """The raw ``config.json`` of an MoE directory (checks that it is one)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    if raw.get("model_type") != LexiconMoEConfig.model_type or SECTION not in raw:
        raise ValueError(f"{path} is not an lm_lexicon MoE (model_type={raw.get('model_type')!r})")
    return raw


def load(path: str | Path, *, dtype: str = "float32", device: str | torch.device | None = None,
         routing: Optional[str] = None, load_router: bool = True, load_embedder: bool = False,
         embedder: Any = None, padding_side: str = "left") -> LoadedMoE:
    """Load an MoE directory written by :func:`lm_lexicon.moe.merge.merge_experts` (or ``save_pretrained``).

    Weights come from safetensors only (``use_safetensors=True``: a directory holding only pickled weights is an
    error, never unpickled) and nothing is downloaded. ``routing`` overrides the saved policy. The router is read
    from ``router/`` (JSON + safetensors); its embedder is built only with ``load_embedder=True`` (or pass one).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    raw = read_moe_config(path)
    torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                   "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    model, info = LexiconMoEForCausalLM.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True,
                                                        local_files_only=True, output_loading_info=True)
    problems = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                                    "mismatched_keys") and v}
    if problems:  # transformers only warns; a half-initialised MoE must not pass for a trained one
        raise RuntimeError(f"{path}: weights do not match the MoE architecture: {problems}")
    if routing is not None:
        model.set_routing(routing)
    if device is not None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    router = None
    router_dir = path / (raw[SECTION].get("router_dir") or "router")
    if load_router and (router_dir / "router.json").is_file():
        from lm_lexicon.partition.routing import DomainRouter

        router = DomainRouter.load(router_dir, embedder=embedder, load_embedder=load_embedder)
        if router.n_clusters != model.config.n_experts:
            raise ValueError(f"{router_dir}: router has {router.n_clusters} domains, "
                             f"the MoE {model.config.n_experts} experts")
    return LoadedMoE(model.eval(), tokenizer, router)
