"""sasr's rollout engine: a decode loop over a preallocated KV cache, built for GRPO's many short rollouts.

What it does that ``model.generate`` does not:

- the KV cache is allocated once per (batch, length) as ``[B, H_kv, L, D]`` per layer and written in place:
  no per-token concatenation, and tensors whose addresses never move;
- sampling (temperature, top-k, top-p, min_new_tokens) happens on the device, and the log-prob of each
  sampled token under ``softmax(logits / temperature)`` is kept: it is pi_old, so no forward pass recomputes it;
- rows that have finished (EOS) are dropped: the batch is compacted to its live rows;
- a float32 LoRA model decodes with each adapter merged into its layer's matrix, at the cost of the base
  model, and on a CPU every weight matrix is prepacked for oneDNN (``sasr.rollout.decode_weights``);
- on CUDA each decode step is captured once as a CUDA graph per (batch bucket, cache length) and replayed,
  which removes the per-kernel launch cost that dominates decoding a small model.

The model is any transformers decoder whose attention calls ``cache.update(k, v, layer_idx)`` and
accepts a ready 4-D attention mask (Llama, Qwen2, Mistral, SmolLM, ...), wrapped by peft or not.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sasr.errors import SasrError
from sasr.logprobs import unique_prompts
from sasr.rollout.decode_weights import decode_weights

# generate() arguments the engine understands besides the ones rollout.generate names explicitly.
ENGINE_KWARGS = {"min_new_tokens", "top_k"}
LENGTH_QUANTUM = 128  # cache lengths are rounded up to this, so CUDA graphs are reused across batches
# KV caches (and their graphs) kept per engine on CUDA for reuse, least recently used out first.
POOL_BYTES = 4 * 2**30


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    min_new_tokens: int = 0


class StaticKVCache:
    """Preallocated keys/values per layer; the transformers ``Cache`` calls a decoder layer makes.

    ``write_at`` holds the cache columns the next forward writes (the prompt columns for a prefill, one for a
    decode step); it is a device tensor so that a captured CUDA graph advances it itself.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_at: torch.Tensor) -> None:
        self.keys, self.values, self.write_at = keys, values, write_at  # keys[l]: [b, H_kv, L, D]
        self.visible: int | None = None  # columns attention reads; None: all L (a graph's shapes are fixed)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states: [b, H_kv, q, D] -> the cache [b, H_kv, visible or L, D]; the mask hides unwritten columns
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_at, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_at, value_states.to(values.dtype))
        if self.visible is not None:
            return keys[:, :, : self.visible], values[:, :, : self.visible]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only used when position_ids are missing
        return 0


# (input_ids [b, q], position_ids [b, q], attention_mask [b, 1, q, visible], cache) -> logits [b, V] of the
# last position: how the engine calls a model (``model_forward``).
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, StaticKVCache], torch.Tensor]


def model_forward(model) -> Forward:
    """The engine's call of a transformers model (or its compiled version) over the static cache."""

    def forward(input_ids, position_ids, attention_mask, cache):
        return model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]

    return forward


def _kv_shape(model) -> tuple[int, int, int, torch.dtype]:
    """(layers, kv heads, head dim, dtype) from the model's config and weights."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return cfg.num_hidden_layers, kv_heads, head_dim, dtype


def kv_cache_bytes(model, batch: int, length: float) -> float:
    """Bytes of keys and values for ``batch`` rows of ``length`` positions."""
    n_layers, kv_heads, head_dim, dtype = _kv_shape(model)
    return 2 * n_layers * batch * kv_heads * length * head_dim * dtype.itemsize


def exponential_race(probs: torch.Tensor) -> torch.Tensor:
    """argmax(p / E), E ~ Exp(1): the same law as multinomial, with no host sync, so it fits a CUDA graph."""
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def inverse_cdf(probs: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """One draw per row from unnormalised probabilities with two uniforms: a block of the vocabulary by the
    blocks' masses, then a token within it. [b, V] -> [b]

    On a CPU this is much cheaper than V exponentials (multinomial draws those too; docs/performance.md). Two levels instead of
    one cumulative sum over V keeps float32 rounding to about 1e-7 of a block's mass per token; a token of
    probability 0 is never drawn (u < 1 puts the draw strictly below the last cumulative sum).
    """
    b, V = probs.shape
    blocks = torch.nn.functional.pad(probs, (0, -V % block)).view(b, -1, block)  # [b, nb, block]
    u = torch.rand(b, 2, device=probs.device)  # [b, 2] in [0, 1)
    outer = blocks.sum(-1).cumsum(-1)  # [b, nb]
    mass = outer[:, -1]
    if not bool((torch.isfinite(mass) & (mass > 0)).all()):  # multinomial refuses these too
        raise SasrError(
            "the model's next-token probabilities are NaN, infinite or all zero (its weights have probably "
            "diverged): lower optim.learning_rate or optim.max_grad_norm, or check the model"
        )
    k = torch.searchsorted(outer, u[:, :1] * mass[:, None], right=True)  # [b, 1] block index
    inner = blocks.gather(1, k[:, :, None].expand(b, 1, block)).squeeze(1).cumsum(-1)  # [b, block]
    j = torch.searchsorted(inner, u[:, 1:] * inner[:, -1:], right=True)  # [b, 1] index in the block
    return (k * block + j).squeeze(1)


def sample(
    logits: torch.Tensor, params: SamplingParams, eos_token_id: int | tuple[int, ...], eos_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-prob under softmax(logits / T), all on the device. [b, V] -> [b], [b]

    The log-prob is the unprocessed one (no top-k/top-p/min-length), the quantity the GRPO ratio uses.
    """
    temperature = 1.0 if params.greedy else params.temperature
    scaled = logits.float() / temperature  # [b, V]
    filtered = scaled.clone()
    stops = (
        eos_token_id if isinstance(eos_token_id, int) else list(eos_token_id)
    )  # one or several stop tokens
    filtered[:, stops] += eos_bias  # -inf while min_new_tokens forbids stopping
    if params.greedy:
        token = filtered.argmax(-1)
    else:
        if params.top_k > 0:
            kth = filtered.topk(min(params.top_k, filtered.size(-1)), dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = filtered.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            outside = probs.cumsum(-1) - probs > params.top_p  # mass before this token already covers top_p
            filtered = filtered.scatter(1, order, sorted_logits.masked_fill(outside, float("-inf")))
        probs = filtered.softmax(-1)
        token = exponential_race(probs) if probs.is_cuda else inverse_cdf(probs)
    logprob = scaled.gather(1, token[:, None]).squeeze(1) - scaled.logsumexp(-1)
    return token, logprob


class _DecodeState:
    """The live rows of one decode: their cache, next inputs and bookkeeping. Fixed addresses, so graphable.

    One state is allocated per (batch, length); ``view(b)`` gives the state of its first b rows, sharing the
    storage, with a CUDA graph of its own. Compaction moves the live rows to the front and steps a smaller view,
    so dropping finished rows costs no allocation.
    """

    BUFFERS = ("tokens", "positions", "mask", "next_token", "next_logprob", "rows", "done")

    def __init__(self, batch: int, length: int, parent: _DecodeState | None = None, model=None, device=None):
        self.batch, self.length = batch, length
        self.graph: torch.cuda.CUDAGraph | None = None
        self.views: dict[int, _DecodeState] = {}
        # A view refers to its root weakly (the root's `views` holds the views), so no reference cycle keeps a
        # finished decode's cache alive until Python's next cyclic collection.
        self._root = weakref.ref(parent) if parent is not None else None
        if parent is not None:  # the first `batch` rows of every buffer of the parent
            for name in self.BUFFERS:
                setattr(self, name, getattr(parent, name)[:batch])
            self.cache = StaticKVCache(
                [k[:batch] for k in parent.cache.keys],
                [v[:batch] for v in parent.cache.values],
                parent.decode_at,
            )
            self.decode_at, self.eos_bias = parent.decode_at, parent.eos_bias
            return
        n_layers, kv_heads, head_dim, dtype = _kv_shape(model)
        shape = (batch, kv_heads, length, head_dim)
        self.decode_at = torch.zeros(1, dtype=torch.long, device=device)  # [1] column a decode step writes
        self.cache = StaticKVCache(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            self.decode_at,
        )
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [b, 1] next input
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [b, 1]
        self.mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)  # [b, 1, 1, L] visible
        self.next_token = torch.zeros(batch, dtype=torch.long, device=device)  # [b]
        self.next_logprob = torch.zeros(batch, dtype=torch.float32, device=device)  # [b]
        self.rows = torch.zeros(batch, dtype=torch.long, device=device)  # [b] output row of each slot
        self.done = torch.ones(batch, dtype=torch.bool, device=device)  # [b] finished or empty slot
        self.eos_bias = torch.zeros((), dtype=torch.float32, device=device)  # -inf while EOS is held back

    @property
    def root(self) -> _DecodeState:
        """The state whose storage this one views (itself when it is the root); views are taken of it."""
        return self if self._root is None else self._root()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.keys + self.cache.values)

    def view(self, batch: int) -> _DecodeState:
        if batch == self.batch:
            return self
        if batch not in self.views:
            self.views[batch] = _DecodeState(batch, self.length, parent=self)
        return self.views[batch]

    def move_rows(self, pick: torch.Tensor, into: _DecodeState) -> None:
        """``into``'s slot i takes this state's slot ``pick[i]`` (``into`` is a view of the same storage)."""
        for mine, theirs in zip(self.cache.keys + self.cache.values, into.cache.keys + into.cache.values):
            theirs.copy_(mine.index_select(0, pick))  # index_select copies first: overlapping storage is safe
        for name in ("tokens", "positions", "mask", "rows"):
            getattr(into, name).copy_(getattr(self, name).index_select(0, pick))

    def step(
        self, forward: Forward, params: SamplingParams, eos_token_id: int, visible: int | None = None
    ) -> None:
        """One decode step, in place: this column becomes visible, the model runs, a token is sampled.

        ``visible``: the cache columns written so far, this one included; attention then reads only those
        (outside a CUDA graph, whose shapes are fixed, so it reads all L under the mask).
        """
        self.mask.index_fill_(3, self.decode_at, True)
        self.cache.visible = visible
        mask = self.mask if visible is None else self.mask[..., :visible]
        logits = forward(self.tokens, self.positions, mask, self.cache)  # [b, V]
        token, logprob = sample(logits, params, eos_token_id, self.eos_bias)
        self.next_token.copy_(token)
        self.next_logprob.copy_(logprob)
        self.tokens.copy_(token[:, None])
        self.positions.add_(1)
        self.decode_at.add_(1)

    def capture(self, forward: Forward, params: SamplingParams, eos_token_id: int) -> None:
        """Record one step as a CUDA graph. The warm-up runs mutate the inputs (and write cache columns not yet
        visible), so the inputs are restored after."""
        held = (self.tokens, self.positions, self.mask, self.decode_at)
        saved = [t.clone() for t in held]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, workspaces) happens outside the graph
                self.step(forward, params, eos_token_id)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step(forward, params, eos_token_id)
        for t, s in zip(held, saved):
            t.copy_(s)


class RolloutEngine:
    """Decodes batches of left-padded prompts for one model; on CUDA it keeps states and graphs between calls."""

    def __init__(self, model, *, cuda_graphs: bool = True, compile: bool = False) -> None:
        self.model = model
        self.cuda_graphs = cuda_graphs
        # torch.compile fuses the decode step's small kernels; each new batch bucket costs a compilation,
        # so it pays off for long or repeated rollouts of one shape.
        self.forward = torch.compile(model, dynamic=False) if compile else model
        self._graph_forward = model_forward(self.forward)
        self._states: OrderedDict[tuple, _DecodeState] = OrderedDict()
        # Of the last decode(): steps, rows computed, CUDA graphs captured, prompts and tokens prefilled.
        self.stats = {
            "decode_steps": 0,
            "row_steps": 0,
            "graph_captures": 0,
            "prefill_rows": 0,
            "prefill_tokens": 0,
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _graphs(self) -> bool:
        return self.cuda_graphs and self.device.type == "cuda"

    def _state(
        self, batch: int, length: int, params: SamplingParams, eos_token_id: int, merged: bool
    ) -> _DecodeState:
        """The root state for this shape: pooled on CUDA (its views keep their graphs), fresh elsewhere."""
        if not self._graphs():
            return _DecodeState(batch, length, model=self.model, device=self.device)
        key = (batch, length, params, eos_token_id, merged)  # a graph of merged LoRA reads other weights
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        need = kv_cache_bytes(self.model, batch, length)
        while self._states and sum(st.nbytes for st in self._states.values()) + need > POOL_BYTES:
            self._states.popitem(last=False)  # its cache, graphs and graph memory go with it
        self._states[key] = _DecodeState(batch, length, model=self.model, device=self.device)
        return self._states[key]

    def _graphed(self, state: _DecodeState, params: SamplingParams, eos_token_id: int) -> _DecodeState:
        if self._graphs() and state.graph is None:
            state.capture(self._graph_forward, params, eos_token_id)
            self.stats["graph_captures"] += 1
        return state

    def _bucket(self, live: int, current: int) -> int:
        """Batch size to compact ``live`` rows into: exact on CPU, powers of two under CUDA graphs."""
        if not self._graphs():
            return live
        size = 1
        while size < live:
            size *= 2
        return min(size, current)

    @torch.no_grad()
    def decode(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int | tuple[int, ...],
        pad_token_id: int,
        params: SamplingParams,
        share_prefix: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Completions and their sampling log-probs for left-padded prompts. [B, P] -> [B, T], [B, T]

        Tokens after a row's EOS are ``pad_token_id`` with log-prob 0; T is the longest row's length.
        ``share_prefix``: the prompts' common first tokens (a system prompt) go through the model once.
        """
        model, device = self.model, self.device
        B, P = prompt_ids.shape
        length = (
            -(-(P + max_new_tokens) // LENGTH_QUANTUM) * LENGTH_QUANTUM
            if self._graphs()
            else P + max_new_tokens
        )
        out_ids = torch.full((B + 1, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        out_logp = torch.zeros(B + 1, max_new_tokens, device=device)  # row B: where empty slots write
        was_training = model.training
        model.eval()
        self.stats = dict.fromkeys(self.stats, 0)
        try:
            # Graphs read the merged matrices' addresses: they stay allocated, and are keyed with the state.
            # torch.compile does its own weight layout, so prepacking is left to the eager path.
            weights = decode_weights(model, rows=B, keep_buffers=self._graphs(), pack=self.forward is model)
            with weights as w:
                prefill = model_forward(model)  # the prefill is one call: never compiled
                forward = model_forward(self.forward)
                state = self._state(B, length, params, eos_token_id, w.merged)
                state = self._graphed(state, params, eos_token_id)
                first_token, first_logp = self._prefill(
                    state, prompt_ids, prompt_mask, params, eos_token_id, prefill, share_prefix
                )
                state.rows.copy_(torch.arange(B, device=device))
                state.done.zero_()
                t_end = self._loop(
                    state,
                    first_token,
                    first_logp,
                    out_ids,
                    out_logp,
                    max_new_tokens,
                    params,
                    eos_token_id,
                    pad_token_id,
                    prompt_length=P,
                    forward=forward,
                )
        finally:
            model.train(was_training)
        return out_ids[:B, :t_end], out_logp[:B, :t_end]

    def _prefill(
        self,
        state,
        prompt_ids,
        prompt_mask,
        params,
        eos_token_id,
        forward: Forward,
        share_prefix: bool = False,
    ):
        """Run the prompts through the model, writing their keys and values to the cache's first P columns (pad
        columns may be left unwritten: they are masked); sample the first token.

        Repeated prompts (GRPO's G rows per prompt are consecutive) go through the model once; their keys and
        values are then copied to every row that shares them. With ``share_prefix`` the first tokens all
        prompts share go through the model once too (``_prefill_prefix``), and the rest of each prompt after.
        """
        B, P = prompt_ids.shape
        device = prompt_ids.device
        first, inverse = unique_prompts(prompt_ids, prompt_mask)  # [U], [B]
        U = first.numel()
        unique_ids, unique_mask = prompt_ids[first], prompt_mask[first].long()  # [U, P]
        C, W = (  # a shared prefix leaves the last W columns to compute
            self._prefill_prefix(state, unique_ids, unique_mask, forward)
            if share_prefix and U > 1
            else (0, P)
        )
        positions = (unique_mask.cumsum(-1) - 1).clamp(min=0)[:, P - W :]  # [U, W]
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()[P - W :]  # [W, P]
        visible = causal[None] & unique_mask.bool()[:, None, :]  # [U, W(query), P(key)]
        visible |= torch.eye(P, dtype=torch.bool, device=device)[None, P - W :]  # pads see themselves
        full = torch.zeros(U, 1, W, state.length, dtype=torch.bool, device=device)
        full[:, 0, :, :P] = visible
        first_rows = StaticKVCache(  # the first U rows of the state's cache, written at the last W columns
            [k[:U] for k in state.cache.keys],
            [v[:U] for v in state.cache.values],
            torch.arange(P - W, P, device=device),
        )
        self.stats["prefill_rows"] = U
        self.stats["prefill_tokens"] = C + U * W
        logits = forward(unique_ids[:, P - W :], positions, full, first_rows)  # [U, V]
        if U < B:  # spread: index_select copies first, so reading rows [:U] while writing [:B] is safe
            for t in state.cache.keys + state.cache.values:
                t[:, :, :P].copy_(t[:U, :, :P].index_select(0, inverse))
            logits = logits.index_select(0, inverse)  # [B, V]
        mask = prompt_mask.bool()
        # Decode state: the prompt's real tokens are visible, generation starts at column P.
        state.decode_at.fill_(P)
        state.mask.zero_()
        state.mask[:, 0, 0, :P] = mask
        state.positions.copy_(prompt_mask.long().sum(-1, keepdim=True))
        state.eos_bias.fill_(float("-inf") if params.min_new_tokens > 0 else 0.0)
        token, logprob = sample(logits, params, eos_token_id, state.eos_bias)
        state.tokens.copy_(token[:, None])
        return token, logprob

    def _prefill_prefix(
        self, state, ids: torch.Tensor, mask: torch.Tensor, forward: Forward
    ) -> tuple[int, int]:
        """The C first real tokens every prompt shares, through the model once as a batch of one; their keys
        and values are written to each row's columns of them. [U, P], [U, P] -> (C, W): W is the number of
        last columns still to compute (P when no prefix is shared).

        A row's first real token is at column ``pad_i``, so its prefix fills columns pad_i .. pad_i + C - 1;
        every row keeps at least one token of its own, whose logits give its first completion token.
        """
        U, P = ids.shape
        lengths = mask.sum(-1)  # [U] real tokens of each row
        pad = P - lengths  # [U] left padding of each row
        shortest = int(lengths.min())
        cols = pad[:, None] + torch.arange(shortest, device=ids.device)  # [U, shortest]
        aligned = ids.gather(1, cols)  # [U, shortest]: each row's real tokens from its first
        agree = (aligned == aligned[:1]).all(0).long()  # [shortest]
        C = min(int(agree.cumprod(0).sum()), shortest - 1)
        if C <= 0:
            return 0, P
        keys = [torch.empty_like(k[:1, :, :C]) for k in state.cache.keys]  # [1, H_kv, C, D] per layer
        values = [torch.empty_like(v[:1, :, :C]) for v in state.cache.values]
        causal = torch.ones(1, 1, C, C, dtype=torch.bool, device=ids.device).tril()  # [1, 1, C, C]
        at = torch.arange(C, device=ids.device)  # [C]
        forward(aligned[:1, :C], at[None], causal, StaticKVCache(keys, values, at))
        where = cols[:, None, :C, None]  # [U, 1, C, 1]: row i's prefix columns
        for mine, whole in zip(keys + values, state.cache.keys + state.cache.values):
            rows = whole[:U]  # [U, H_kv, L, D]
            rows.scatter_(2, where.expand(U, rows.size(1), C, rows.size(3)), mine.expand(U, -1, -1, -1))
        return C, P - int((pad + C).min())

    def _loop(
        self,
        state,
        token,
        logprob,
        out_ids,
        out_logp,
        max_new_tokens,
        params,
        eos_token_id,
        pad_token_id,
        prompt_length,
        forward: Forward,
    ):
        """Record token t of every live row, stop finished rows, compact, step. Returns the columns used."""
        scratch = out_ids.size(0) - 1
        check_every = 4 if state.graph is not None else 1  # a live-row count is a host sync: not every step
        t = 0
        stops = torch.tensor(eos_token_id, device=token.device)  # [] or [k]: the stop tokens
        while True:
            out_ids[state.rows, t] = torch.where(state.done, pad_token_id, token)
            out_logp[state.rows, t] = torch.where(state.done, 0.0, logprob)
            state.done |= torch.isin(token, stops)
            t += 1
            if t == max_new_tokens:
                return t
            if t == params.min_new_tokens:
                state.eos_bias.fill_(0.0)
            if t % check_every == 0:
                live = (~state.done).nonzero().squeeze(1)  # [n]
                if live.numel() == 0:
                    return t
                size = self._bucket(live.numel(), state.batch)
                if size < state.batch:
                    state = self._compact(state, live, size, params, eos_token_id, scratch)
            self.stats["decode_steps"] += 1
            self.stats["row_steps"] += state.batch  # rows computed: finished ones are dropped
            if state.graph is not None:
                state.graph.replay()
            else:
                # This step writes column P + t - 1: attention reads the P + t columns written by then.
                state.step(forward, params, eos_token_id, visible=prompt_length + t)
            token, logprob = state.next_token, state.next_logprob

    def _compact(self, old, live, size, params, eos_token_id, scratch) -> _DecodeState:
        """Move the live rows to the front; spare slots repeat a live row and write to the scratch row."""
        n = live.numel()
        pick = torch.cat([live, live[:1].expand(size - n)])  # [size]
        new = self._graphed(old.root.view(size), params, eos_token_id)  # captured before the rows move
        old.move_rows(pick, new)
        new.rows[n:] = scratch
        new.done.zero_()
        new.done[n:] = True
        return new


# model -> {(cuda_graphs, compile): engine}: one engine per option set, so evaluating with other options
# between two GRPO steps never throws away the GRPO engine's graphs or compiled code.
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(model, cuda_graphs: bool = True, compile: bool = False) -> RolloutEngine:
    """The model's engine for these options, kept alive with the model so its CUDA graphs are captured once."""
    engines = _ENGINES.setdefault(model, {})
    if (cuda_graphs, compile) not in engines:
        engines[cuda_graphs, compile] = RolloutEngine(model, cuda_graphs=cuda_graphs, compile=compile)
    return engines[cuda_graphs, compile]


def unsupported_kwargs(generation_kwargs: dict) -> str | None:
    """What is wrong with these generate() arguments for the engine, or None."""
    unknown = sorted(set(generation_kwargs) - ENGINE_KWARGS)
    if not unknown:
        return None
    return (
        f"generation_kwargs {unknown} are not supported by the sasr rollout engine (it takes "
        f"{sorted(ENGINE_KWARGS)}); set grpo.generation_backend=hf to pass them to model.generate"
    )
