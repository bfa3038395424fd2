"""GPT over VQGAN codes (stage two), in the minGPT form of taming-transformers.

Parameter names follow taming's `taming/modules/transformer/mingpt.py`, so a taming
GPT state dict loads with strict=True once its `*.attn.mask` buffers are dropped (see
`strip_taming_gpt_keys`). Attention runs through `F.scaled_dot_product_attention`.

Sampling: `GPT.generate` samples with temperature, top-k and top-p, with a KV cache by
default, in the gpt-fast style (pytorch-labs/gpt-fast): the cache is a list of preallocated
(k, v) tensors of a fixed length, one pair per layer, from `GPT.allocate_cache`. The prompt is
run once by `GPT.forward_cached` (the prefill); every later token by `GPT.decode_step`, whose
shapes never change with the position (it attends over the whole cache, the unwritten slots
masked), so one `torch.compile` graph, or one CUDA graph, serves every step:
`compile_decode_step` builds it and `generate(..., decode_step=...)` uses it. The tokens do not
depend on which step runs: same seed, same tokens (tests/test_mingpt.py pins them).
`generate` takes a `logits_processor(logits, idx) -> logits` hook for per-step edits of one
batch's logits (e.g. banning tokens). Classifier-free guidance needs two batches per step, so
write that loop yourself with `allocate_cache`, `forward_cached` and `decode_step` (see
`generate` for the pattern, transformer.py for the guided loop).
"""

import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Named model sizes (n_layer, n_head, n_embd); pass them as GPTConfig(..., **GPT_PRESETS[name]).
GPT_PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32),  # for tests
    # trains on a laptop CPU in minutes; small enough that training on cached codes is ~4.6x faster
    # than encoding each batch through the demo VQGAN (benchmark_code_cache)
    "demo": dict(n_layer=4, n_head=4, n_embd=128),
    "paper": dict(n_layer=24, n_head=16, n_embd=1024),  # taming-transformers' stage-two GPT
}


@dataclass
class GPTConfig:
    """Hyperparameters of the GPT; defaults are taming's `GPT` constructor defaults."""

    vocab_size: int
    block_size: int
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    n_unmasked: int = 0  # the first n_unmasked positions attend to each other both ways


def strip_taming_gpt_keys(sd):
    """Return a copy of a taming GPT state dict without its `*.attn.mask` buffers."""
    # Taming stores the causal mask as a buffer; here the mask comes from is_causal (or is
    # rebuilt from n_unmasked), so those keys have no home in this module.
    return {k: v for k, v in sd.items() if not k.endswith(".attn.mask")}


def attention_mask(pos, T, n_unmasked, device=None):
    """Bool mask (T, pos + T), True where query pos + i may attend to key j."""
    q = torch.arange(pos, pos + T, device=device)[:, None]  # (T, 1) absolute query positions
    k = torch.arange(pos + T, device=device)[None, :]  # (1, pos + T) absolute key positions
    allowed = k <= q
    if n_unmasked > 0:
        # Taming: mask[:n_unmasked, :n_unmasked] = 1, a bidirectional prefix.
        allowed = allowed | ((q < n_unmasked) & (k < n_unmasked))
    return allowed


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   cfg_scale: float = 1.0, keep_fraction: float = 0.5, labels_given: bool | None = None,
                   flags: bool = False, labels_name: str = "labels"):
    """The one check of sampling settings, shared by the library and the three scripts that sample.

    Raises ValueError naming the first setting out of range, its allowed range and a typical value:
    temperature a finite number >= 0 (0: greedy); top_k None or a whole number >= 1; top_p None or
    in (0, 1]; cfg_scale a finite number >= 0 (1: no guidance), and != 1 only with labels
    (labels_given False is refused; None: not known here); keep_fraction in [0, 1]. With `flags`
    the settings are named as command-line flags (--top-k), else as arguments (top_k); the rest
    of the wording is the same, so a script's one-line error reads like the library's."""
    def name(arg: str) -> str:
        return "--" + arg.replace("_", "-") if flags else arg

    def finite(v) -> bool:
        return (isinstance(v, numbers.Real) and not isinstance(v, bool)
                and (isinstance(v, numbers.Integral) or math.isfinite(v)))

    if not (finite(temperature) and temperature >= 0):
        raise ValueError(f"{name('temperature')} {temperature} is out of range: it must be a finite number >= 0 "
                         "(0: greedy, 1: the model's own distribution)")
    if top_k is not None and not (isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool)
                                  and top_k >= 1):
        raise ValueError(f"{name('top_k')} {top_k} is out of range: it must be a whole number >= 1, "
                         "e.g. 100 (none: sample from all codes)")
    if top_p is not None and not (finite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"{name('top_p')} {top_p} is out of range: it must be in (0, 1], e.g. 0.9 (none: off)")
    if not (finite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"{name('cfg_scale')} {cfg_scale} is out of range: it must be a finite number >= 0, "
                         "e.g. 3 (1: no guidance)")
    if cfg_scale != 1 and labels_given is False:
        raise ValueError(f"{name('cfg_scale')} {cfg_scale} needs {labels_name}: guidance mixes class-conditional "
                         f"and unconditional predictions; give {labels_name}, or leave {name('cfg_scale')} at 1")
    if not (finite(keep_fraction) and 0 <= keep_fraction <= 1):
        raise ValueError(f"{name('keep_fraction')} {keep_fraction} is out of range: it must be in [0, 1], "
                         "the share of code rows kept, e.g. 0.5")


def top_k_top_p_filter(logits, top_k=None, top_p=None):
    """Return logits (..., V) with tokens outside the top-k and the top-p nucleus set to -inf."""
    check_sampling(top_k=top_k, top_p=top_p)
    if top_k is not None:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # (..., V)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold >= top_p of the mass:
        # this keeps the smallest set with cumulative prob >= top_p, and always the top token.
        remove_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, do_sample=True, generator=None):
    """Pick one token per row from logits (B, V): greedy if temperature == 0 or not do_sample; returns (B, 1)."""
    check_sampling(temperature, top_k, top_p)
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # Shifted so the largest logit is 0 before dividing, and the temperature kept within the dtype's
    # normal numbers (it would round to 0 or inf): a tiny temperature then sends the other logits to
    # -inf, where dividing the raw ones would overflow to inf and softmax would give NaN. +inf (a huge
    # guidance scale overflows) becomes the dtype's largest number, so the shift never takes inf - inf.
    finfo = torch.finfo(logits.dtype)
    logits = logits.clamp(max=finfo.max)
    t = min(max(temperature, finfo.tiny), finfo.max)
    logits = logits - logits.amax(dim=-1, keepdim=True)  # (B, V), max 0
    # top-k before the division: it does not depend on the scale, and a huge temperature would flush
    # the scaled logits to 0 and tie them all; top-p needs the tempered distribution
    logits = top_k_top_p_filter(logits, top_k, None) / t
    logits = top_k_top_p_filter(logits, None, top_p)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


# decode_step attends over every slot of the cache it is given, so on the CPU generate hands it views of
# the first n slots rounded up to a multiple of this: each step reads at most this many slots it needs
# not. Measured at 4 layers x 16 heads x 1024, batch 8, one thread: attending over 256 slots instead
# of 64 added ~5 ms to a ~19 ms compiled step.
CACHE_WINDOW = 32


def cache_window(cache, n):
    """Views of the first n (rounded up to a multiple of CACHE_WINDOW, at most the cache length) slots of
    each layer's (k, v) in cache; decode_step's writes go through them into cache. On CUDA the whole
    cache: a CUDA graph replays with the same (static) tensors at every step."""
    k0 = cache[0][0]
    m = min(k0.size(2), -(-n // CACHE_WINDOW) * CACHE_WINDOW)
    if k0.is_cuda or m == k0.size(2):
        return cache
    return [(k[:, :, :m], v[:, :, :m]) for k, v in cache]


def compile_decode_step(gpt, freeze=True):
    """torch.compile of gpt.decode_step (one graph, fullgraph) -> a callable with its signature, for generate.

    On CUDA: CUDA graphs (inductor's triton.cudagraphs, as gpt-fast's mode="reduce-overhead"), replaying
    one recorded step per token; allocate_cache marks the cache as static so it is written in place.
    On the CPU: with `freeze`, inductor's freezing folds the weights into the graph as constants and
    pre-packs them for oneDNN's matmul. That pays only with dynamic shapes (inductor packs fp32 weights
    for oneDNN only when the batch size is symbolic; with a fixed one it uses MKL's packed GEMM, which
    was no faster): at batch 8, 4 layers x 1024, one thread, the compiled step sampled ~1.5x as many
    tokens/s as the eager one (benchmark.py). A frozen graph keeps the weights it was compiled with:
    build it again after the weights change (during training, sample with the eager step).
    The first calls compile (tens of seconds on a CPU); later calls of the same shapes reuse it."""
    if gpt.head.weight.is_cuda:
        return torch.compile(gpt.decode_step, fullgraph=True, options={"triton.cudagraphs": True})
    compiled = torch.compile(gpt.decode_step, fullgraph=True, dynamic=True)

    def step(idx, cache, pos):
        # freezing is read when the first call compiles; torch.compile(options=...) does not reach it
        with torch._inductor.config.patch(freezing=freeze):
            return compiled(idx, cache, pos)

    return step


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate key/query/value projections (taming names)."""

    def __init__(self, n_embd, n_head, attn_pdrop, resid_pdrop, n_unmasked):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.key = nn.Linear(n_embd, n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.attn_pdrop = attn_pdrop
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.n_unmasked = n_unmasked

    def forward(self, x, cache=None, pos=0):
        """x: (B, T, C) hidden states at positions pos..pos+T-1; cache: (k, v) each (B, nh, max_len, hs) or None.

        pos is an int, or a (1,) int64 tensor for the static one-token step (T == 1, see GPT.decode_step)."""
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q = self.query(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.value(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if torch.is_tensor(pos):
            y = self._static_step(q, k, v, cache, pos)  # (B, nh, 1, hs)
            y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, 1, C)
            return self.resid_drop(self.proj(y))
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, pos : pos + T] = k
            v_cache[:, :, pos : pos + T] = v
            k = k_cache[:, :, : pos + T]  # (B, nh, pos + T, hs)
            v = v_cache[:, :, : pos + T]  # (B, nh, pos + T, hs)
        elif pos != 0:
            raise ValueError("pos > 0 needs a cache holding the earlier keys and values")

        dropout_p = self.attn_pdrop if self.training else 0.0
        if T == 1:
            # One query at the newest position sees every cached key, so no mask is needed
            # (also under n_unmasked: the keys it could add are all at positions < pos + 1).
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        elif pos == 0 and self.n_unmasked == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # is_causal aligns the mask top-left, which is wrong for a chunk after a cached
            # prefix, and it can't express the n_unmasked prefix: build the mask explicitly.
            mask = attention_mask(pos, T, self.n_unmasked, device=x.device)  # (T, pos + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))

    @staticmethod
    def _static_step(q, k, v, cache, pos):
        """q, k, v: (B, nh, 1, hs) of one new token at position pos ((1,) int64 tensor); writes k, v into
        cache slot pos and attends over all max_len slots, the ones after pos masked -> (B, nh, 1, hs).

        Written out rather than F.scaled_dot_product_attention: with a mask and one query, the CPU's
        SDPA kernel made the whole 4-layer x 1024 decode step ~20% slower eager and ~25% slower
        compiled (benchmark.py's sampling, 1 thread); for one query the product is a matrix-vector one."""
        k_cache, v_cache = cache
        k_cache.index_copy_(2, pos, k)  # in place, shape unchanged: the step's shapes never depend on pos
        v_cache.index_copy_(2, pos, v)
        hs = q.size(-1)
        att = (q @ k_cache.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, 1, max_len)
        valid = torch.arange(k_cache.size(2), device=q.device) <= pos  # (max_len,): slots 0..pos are written
        att = att.masked_fill(~valid, float("-inf")).softmax(dim=-1)
        return att @ v_cache  # (B, nh, 1, hs)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, n_embd, n_head, attn_pdrop, resid_pdrop, n_unmasked):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, attn_pdrop, resid_pdrop, n_unmasked)
        # A Sequential, so the parameter names are taming's mlp.0 and mlp.2.
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(resid_pdrop),
        )

    def forward(self, x, cache=None, pos=0):
        """x: (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.ln1(x), cache, pos)
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    """minGPT over code indices, with learned absolute position embeddings and an optional embedding prefix."""

    def __init__(
        self,
        vocab_size,
        block_size,
        n_layer=12,
        n_head=8,
        n_embd=256,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        n_unmasked=0,
    ):
        super().__init__()
        if not 0 <= n_unmasked <= block_size:
            raise ValueError(f"n_unmasked must be in [0, block_size], got {n_unmasked}")
        self.config = GPTConfig(
            vocab_size, block_size, n_layer, n_head, n_embd, embd_pdrop, resid_pdrop, attn_pdrop, n_unmasked
        )
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.drop = nn.Dropout(embd_pdrop)
        self.blocks = nn.ModuleList(
            [Block(n_embd, n_head, attn_pdrop, resid_pdrop, n_unmasked) for _ in range(n_layer)]
        )
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)

    @classmethod
    def from_config(cls, cfg):
        """Build a GPT from a GPTConfig."""
        return cls(**asdict(cfg))

    def _init_weights(self, module):
        """minGPT init: N(0, 0.02) for Linear and Embedding weights, zero biases, LayerNorm ones/zeros."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, GPT):
            # Position embeddings start at zero, as in minGPT and taming.
            nn.init.zeros_(module.pos_emb)

    def load_taming_state_dict(self, sd, strict=True):
        """Load a taming GPT state dict (keys relative to the GPT, e.g. `transformer.` stripped)."""
        return self.load_state_dict(strip_taming_gpt_keys(sd), strict=strict)

    def _embed(self, idx, embeddings, pos):
        """idx: (B, t) int64 in [0, vocab); embeddings: (B, te, C) or None -> (B, te + t, C) at positions pos..."""
        x = self.tok_emb(idx)  # (B, t, C)
        if embeddings is not None:
            x = torch.cat((embeddings, x), dim=1)  # (B, te + t, C)
        T = x.size(1)
        if pos + T > self.block_size:
            raise ValueError(
                f"sequence of length {pos + T} exceeds block_size {self.block_size}"
            )
        return self.drop(x + self.pos_emb[:, pos : pos + T])  # (B, T, C)

    def _logits(self, x):
        """x: (B, T, C) -> logits (B, T, vocab)."""
        return self.head(self.ln_f(x))

    def forward(self, idx, embeddings=None, targets=None):
        """idx: (B, t) int64 codes; embeddings: (B, te, C) prefix or None; targets: (B, te + t) -> (logits (B, te + t, V), loss or None)."""
        x = self._embed(idx, embeddings, 0)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self._logits(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def allocate_cache(self, batch_size, max_len=None):
        """Preallocate a KV cache: per layer (k, v), each (B, nh, max_len, hs) of zeros, on the model's device and dtype.

        Zeros, not empty memory: decode_step multiplies the masked slots' values by 0, and 0 * NaN is NaN.
        On CUDA the tensors are marked as static addresses, so a CUDA graph of decode_step can keep
        writing into them in place (as Hugging Face's StaticCache does)."""
        cfg = self.config
        max_len = cfg.block_size if max_len is None else max_len
        if max_len > cfg.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size {cfg.block_size}")
        p = self.head.weight
        shape = (batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        cache = [(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(cfg.n_layer)]
        if p.is_cuda:
            for k, v in cache:
                torch._dynamo.mark_static_address(k)
                torch._dynamo.mark_static_address(v)
        return cache

    def forward_cached(self, idx_new, cache, pos, embeddings=None):
        """Run tokens idx_new (B, t) at positions pos.. against cache (filled for 0..pos-1); returns logits (B, te + t, V)."""
        if embeddings is not None and pos != 0:
            raise ValueError("an embeddings prefix is only allowed in the prefill (pos == 0)")
        x = self._embed(idx_new, embeddings, pos)  # (B, T, C)
        T = x.size(1)
        if pos + T > cache[0][0].size(2):
            raise ValueError(f"positions up to {pos + T} exceed the cache length {cache[0][0].size(2)}")
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, layer_cache, pos)
        return self._logits(x)  # (B, T, V)

    def decode_step(self, idx, cache, pos):
        """One token per row, idx (B, 1) at position pos, a (1,) int64 tensor on the model's device, against
        cache (filled for 0..pos-1, from allocate_cache) -> logits (B, V); writes cache slot pos.

        Static shapes: the same for every pos, so torch.compile builds one graph (see compile_decode_step).
        pos is not checked against the cache length here (that would read the device); callers do."""
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, pos])  # (B, 1, C)
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, layer_cache, pos)
        return self._logits(x)[:, -1]  # (B, V)

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        use_cache=True,
        generator=None,
        do_sample=True,
        logits_processor=None,
        decode_step=None,
    ):
        """Append max_new_tokens sampled tokens to idx (B, t); greedy if temperature == 0 or not do_sample; returns (B, t + max_new_tokens).

        decode_step: what runs each token after the first with the cache, by default self.decode_step;
        pass compile_decode_step(self) for the compiled one (same signature, same tokens)."""
        check_sampling(temperature, top_k, top_p)
        B, t = idx.shape
        if max_new_tokens <= 0:
            return idx
        # The last sampled token is never fed back, so the model sees t + max_new_tokens - 1.
        total = t + max_new_tokens - 1
        if total > self.block_size:
            raise ValueError(
                f"prompt ({t}) + max_new_tokens ({max_new_tokens}) - 1 = {total} exceeds block_size {self.block_size}"
            )
        if use_cache and t < self.config.n_unmasked:
            # Cached keys of the bidirectional prefix would miss the prefix tokens that come later.
            raise ValueError(f"cached generation needs a prompt of at least n_unmasked ({self.config.n_unmasked}) tokens")

        cache = self.allocate_cache(B, total) if use_cache else None
        decode_step = decode_step or self.decode_step
        pos = torch.full((1,), t - 1, dtype=torch.long, device=idx.device)  # position of the token fed next
        out = idx.new_empty(B, t + max_new_tokens)  # (B, t + max_new_tokens), filled as we go
        out[:, :t] = idx
        for i in range(max_new_tokens):
            n = t + i  # tokens so far
            if not use_cache:
                logits = self(out[:, :n])[0][:, -1]  # (B, V), recomputes the whole prefix
            elif i == 0:
                logits = self.forward_cached(out[:, :n], cache, 0)[:, -1]  # prefill, (B, V)
            else:
                pos += 1  # in place: no new host-to-device copy per token
                logits = decode_step(out[:, n - 1 : n], cache_window(cache, n), pos)  # (B, V)
            if logits_processor is not None:
                logits = logits_processor(logits, out[:, :n])
            out[:, n : n + 1] = sample_next_token(logits, temperature, top_k, top_p, do_sample, generator)
        return out

    def configure_optimizers(self, weight_decay, learning_rate, betas, fused=True):
        """AdamW with weight decay on Linear weights only; biases, LayerNorm, embeddings and pos_emb are not decayed.

        fused: AdamW's fused kernels (CUDA and CPU; for stage one's Adam on one CPU thread 3x faster than the
        per-parameter loop); the weights differ from the loop's by ~1e-6 after 3 steps (the order of the
        decoupled weight decay's operations). False: torch's default (foreach on CUDA, the loop on the CPU)."""
        decay, no_decay = [], []
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                # Only the matmul weights of Linear layers decay, as in minGPT.
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True if fused else None)

    def num_params(self):
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())
