"""
A TopK Language Model (Takahashi et al. 2025, arXiv 2506.21468) in one file.

It is GPT-2 (as in nanoGPT) with one change: in all but the last `n_nontopk` blocks the
MLP activation keeps only the k largest of its d_ff = 4 * n_embd pre-activations per token.
The MLP hidden state is then a TopK sparse-autoencoder latent: c_fc is the encoder,
c_proj the decoder and d_ff the dictionary size, so its neurons can be read directly.
topk = 0 gives the dense baseline: exactly GPT-2.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    topk: int = 64  # k active MLP neurons per token; 0 = dense GPT-2
    n_nontopk: int = 2  # the last n_nontopk blocks keep the dense GELU MLP
    gelu: str = 'none'  # 'none': exact GELU; 'tanh': OpenAI GPT-2's approximation, for its weights

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.topk <= 4 * self.n_embd:
            raise ValueError(f"topk must be in [0, d_ff = 4 * n_embd = {4 * self.n_embd}], got {self.topk}")
        if not 0 <= self.n_nontopk <= self.n_layer:
            raise ValueError(f"n_nontopk must be in [0, n_layer = {self.n_layer}], got {self.n_nontopk}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gelu not in ('none', 'tanh'):
            raise ValueError(f"gelu must be 'none' or 'tanh', got {self.gelu!r}")


class TopK(nn.Module):
    """The TopK activation of the paper (arXiv 2506.21468). For one token's pre-activation x in R^d_ff:

        y = f(x) ⊙ (alpha + (1 - alpha) * m),   f = GELU,  m_i = 1 iff i is among topk(x, k)

    alpha = 1 is the dense GELU MLP, alpha = 0 keeps exactly k neurons; training anneals
    alpha from 1 to 0. The mask comes from topk *indices*, not from x >= (k-th largest), so
    ties (common in bf16) can never let more than k through. Selection is on x, before f.
    """

    def __init__(self, k, gelu='none'):
        super().__init__()
        self.k, self.gelu = k, gelu  # gelu: torch's `approximate`, as GPTConfig.gelu
        # a tensor, not a float: changing it every step must not make torch.compile recompile
        self.register_buffer("alpha", torch.tensor(0.0), persistent=False)
        self.annealed = True  # alpha == 0, kept as a Python bool so no forward reads alpha back

    def set_alpha(self, alpha):
        self.alpha.fill_(alpha)
        self.annealed = alpha == 0  # torch.compile guards on it: one recompile, when annealing ends

    def forward(self, x):
        top = x.topk(self.k, dim=-1)
        if self.annealed:
            # the same numbers as the formula at alpha = 0, but the backward saves only the k
            # indices and values per token, not the d_ff-wide x, mask and product
            return torch.zeros_like(x).scatter(-1, top.indices, F.gelu(top.values, approximate=self.gelu))
        m = torch.zeros_like(x).scatter_(-1, top.indices, 1.0)
        return F.gelu(x, approximate=self.gelu) * (self.alpha + (1 - self.alpha) * m)


def topk_layers(n_layer, topk, n_nontopk):
    """The blocks whose MLP is TopK: all but the last n_nontopk, none in a dense model (topk = 0)."""
    return list(range(n_layer - n_nontopk)) if topk else []


SCHEDULES = ('linear', 'cosine', 'step')


def annealed_alpha(it, span, schedule='linear'):
    """alpha at training iteration it: 1 (dense) at the start, 0 (exactly k kept) from iteration
    span on, which train.py fixes when a run starts (annealing_ratio * max_iters) and keeps when a
    run is extended. In between, with u = it / span:
      linear (the paper's):  1 - u
      cosine:                (1 + cos(pi u)) / 2, slow at both ends (the paper leaves non-linear
                             schedules to future work, section 2.1)
      step:                  0 throughout: TopK from the first iteration, no annealing."""
    if schedule == 'step' or span <= 0 or it >= span:
        return 0.0
    u = it / span
    return 1.0 - u if schedule == 'linear' else 0.5 * (1.0 + math.cos(math.pi * u))


def annealing_span(ckpt):
    """The iteration from which a checkpoint's run trains at alpha = 0: saved as 'anneal_span'
    (checkpoints written before it was saved: annealing_ratio * max_iters of their config)."""
    cfg = ckpt.get('config', {})
    return ckpt.get('anneal_span', cfg.get('annealing_ratio', 0) * cfg.get('max_iters', 0))


def trained_alpha(ckpt):
    """The alpha a checkpoint of train.py was trained with at its iteration (annealed_alpha)."""
    schedule = ckpt.get('config', {}).get('annealing_schedule', 'linear')
    return annealed_alpha(ckpt['iter_num'], annealing_span(ckpt), schedule)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(k, v)
        # is_causal aligns the mask top-left, which is right for a full sequence (or a prefill
        # into an empty cache); a single decoded token attends to everything cached (no mask)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0,
                                           is_causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config, topk):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = TopK(topk, config.gelu) if topk else nn.GELU(config.gelu)  # the neurons: hook here to read or steer
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, topk):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, topk)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every block for incremental decoding, preallocated to block_size."""

    def __init__(self, config):
        self.block_size = config.block_size
        self.k, self.v = [None] * config.n_layer, [None] * config.n_layer
        self.pos, self.layer = 0, 0  # tokens cached so far; block being run

    def append(self, k, v):
        i, T = self.layer, k.size(2)
        if self.k[i] is None:  # allocated on first use, in the dtype autocast gives k and v
            B, H, _, D = k.shape
            self.k[i] = k.new_empty(B, H, self.block_size, D)
            self.v[i] = v.new_empty(B, H, self.block_size, D)
        self.k[i][:, :, self.pos:self.pos + T] = k
        self.v[i][:, :, self.pos:self.pos + T] = v
        self.layer = (i + 1) % len(self.k)
        end = self.pos + T
        if self.layer == 0:  # every block has seen these tokens
            self.pos = end
        return self.k[i][:, :, :end], self.v[i][:, :, :end]


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        sparse = topk_layers(config.n_layer, config.topk, config.n_nontopk)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, config.topk if i in sparse else 0)
                             for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one per sublayer adding to x
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_alpha(0.0)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_alpha(self, alpha):
        """1 = dense GELU, 0 = exactly k neurons per token, on every TopK block."""
        for m in self.modules():
            if isinstance(m, TopK):
                m.set_alpha(alpha)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def trunk(self, idx, cache=None):
        """The residual stream after ln_f at every position: what lm_head reads."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache)
        return self.transformer.ln_f(x)

    def logits(self, idx):
        """The logits at every position and no loss, for scoring text (forward without targets
        gives the last position only, and with them computes a loss the caller would not use)."""
        return self.lm_head(self.trunk(idx))

    def forward(self, idx, targets=None, cache=None, return_logits=True):
        x = self.trunk(idx, cache)
        if targets is None:  # inference: only the last position's logits are needed
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return (logits if return_logits else None), loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, fused):
        # decay matmul weights and embeddings (2-D), not biases and LayerNorm gains (1-D)
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # fused: one kernel for all parameters instead of a loop (the caller knows where torch has it)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self):
        """Training FLOPs per token of the dense-equivalent model (PaLM appendix B): 6N + 12 L T C."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generators=None,
                 vocab_size=None):
        """Sample max_new_tokens continuations of idx (B, T). With use_cache, keys and values
        are kept so each step runs one token; past block_size it falls back to re-running
        the last block_size tokens, as without cache (positions are absolute). generators: one
        torch.Generator per equal block of consecutive rows, so a block draws what it would draw
        alone from its generator whatever rows sit beside it; None: torch's global generator.
        vocab_size: the tokenizer's, below config.vocab_size when the embedding is padded; the
        padded ids are never drawn (they have no text, yet a strongly steered neuron can favour one)."""
        cache = None
        for _ in range(max_new_tokens):
            if idx.size(1) > self.config.block_size:
                cache = None
                logits, _ = self(idx[:, -self.config.block_size:])
            elif use_cache and cache is not None:
                logits, _ = self(idx[:, -1:], cache=cache)
            elif use_cache:
                cache = KVCache(self.config)
                logits, _ = self(idx, cache=cache)
            else:
                logits, _ = self(idx)
            logits = logits[:, -1, :]
            if vocab_size is not None:
                logits[:, vocab_size:] = float('-inf')
            if temperature == 0:  # greedy
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is None:
                    idx_next = draw(F.softmax(logits, dim=-1), generators)
                else:  # draw among the top_k only: multinomial's cost grows with the candidates (on CPU it
                    # was most of a small model's decoding step over 50k tokens)
                    v, ix = torch.topk(logits, min(top_k, logits.size(-1)))
                    idx_next = ix.gather(-1, draw(F.softmax(v, dim=-1), generators))
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def draw(probs, generators=None):
    """One token per row of probs (B, V): from torch's global generator, or block by block of rows
    from generators (one per equal block)."""
    if generators is None:
        return torch.multinomial(probs, num_samples=1)
    blocks = probs.view(len(generators), -1, probs.size(-1))
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(blocks, generators)])
