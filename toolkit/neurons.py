"""
Where the neurons of a TopK LM (or of its dense twin) are read and written: forward hooks that
capture and steer them, activations streamed over evaluation tokens, what each neuron writes
into the residual stream, and the three signals the concept search in search.py starts from.

* neuron (l, j): unit j of the output of transformer.h[l].mlp.act, shape (B, T, d_ff), read
  with a forward hook. A dense block is read at the same place (its GELU output), so TopK and
  dense runs go through the same code.
* fires: activation > 0. In a TopK block at alpha = 0 that means kept among the k (and a
  positive pre-activation: GELU turns a negative one into a small negative number that is not
  "on"); in a dense block, a positive pre-activation. One rule for both keeps them comparable.
* decoder direction: what neuron j adds to the residual stream per unit of activation, column j
  of c_proj.weight. Through ln_f and lm_head it promotes some tokens. ln_f acts on a direction
  through its linear part: d - mean(d), times ln_f's gain. Its division by the residual's norm is
  a positive scale per token that changes no ranking, and its bias is the same for every neuron,
  so both are left out.

A dictionary from dictionary.py can sit in place of a block's mlp with the same two members
(`act`, `c_proj`), so everything here reads and steers its latents as neurons.
"""
import contextlib
import math
import os

import numpy as np
import torch

from configurator import die
from toolkit.data import EOT, decode, encode, read_shard, shard_paths


def load_eval_tokens(source, n_tokens, seq_len):
    """The first n_tokens of a data dir's val shards (or of a .txt file, after <|endoftext|>)
    as (n_seq, seq_len) rows; always the same tokens, so checkpoints and runs compare."""
    if n_tokens < seq_len:
        die(f"--eval_tokens={n_tokens} is less than one sequence of {seq_len} tokens")
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            tokens = np.array([EOT] + encode(f.read()))
    else:
        tokens = np.concatenate([read_shard(p) for p in shard_paths(source, "val")])
    n_seq = min(n_tokens, len(tokens)) // seq_len
    if n_seq == 0:
        die(f"{source} has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
    return torch.from_numpy(tokens[:n_seq * seq_len].astype(np.int64)).view(n_seq, seq_len)


def run_eval_tokens(eval_data, ckpt, n_tokens, seq_len):
    """load_eval_tokens from eval_data (a data dir or .txt file), or if it is '' from the val shards
    the run of checkpoint ckpt trained with."""
    return load_eval_tokens(eval_data or ckpt.get("config", {}).get("data_dir", ""), n_tokens, seq_len)


def mlp_acts(model):
    return [block.mlp.act for block in model.transformer.h]


def is_topk(model, layer):
    """Whether the layer's neurons are sparse: a TopK block, or a dictionary's TopK latents."""
    return hasattr(mlp_acts(model)[layer], "k")


def decoder_directions(model, layer):
    """(n_embd, d_ff): what each neuron of the layer writes into the residual stream per unit of
    activation, its c_proj column (for a dictionary in place of the mlp, its decoder's)."""
    return model.transformer.h[layer].mlp.c_proj.weight


def parse_neuron(spec, model, flag="--neuron"):
    """LAYER:NEURON of a neuron of model, checked against its shape."""
    try:
        l, j = (int(x) for x in spec.split(":"))
    except ValueError:
        die(f"{flag} expects LAYER:NEURON, e.g. 1:42, got {spec!r}")
    n_layer = len(model.transformer.h)
    if not 0 <= l < n_layer:
        die(f"{flag}: layer {l} out of range [0, {n_layer - 1}]")
    n = decoder_directions(model, l).size(1)
    if not 0 <= j < n:
        die(f"{flag}: neuron {j} out of range [0, {n - 1}]")
    return l, j


@contextlib.contextmanager
def capture(model, layers, mlp_io=False):
    """Inside the block, captured[l] is the last activation tensor (B, T, d_ff) of layer l; with
    mlp_io, the (input, output) pair of the layer's whole MLP instead, each (B, T, n_embd): what a
    transcoder maps from and to, and what an SAE reconstructs (the output)."""
    captured = {}
    modules = [model.transformer.h[l].mlp if mlp_io else mlp_acts(model)[l] for l in layers]
    hooks = [m.register_forward_hook(lambda mod, inp, out, l=l: captured.__setitem__(
        l, (inp[0].detach(), out.detach()) if mlp_io else out.detach())) for l, m in zip(layers, modules)]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def steering(model, layer, neuron, value):
    """Set neuron (layer, neuron) to value at every position, after the TopK mask. value=None
    leaves it as it is, but like any hook sends the block through the reference path (see
    sparse_mlp.applies): a baseline run that way differs from a steered one by the steering
    alone, not by float rounding."""
    with steering_rows(model, [(layer, neuron, value)]):
        yield


@contextlib.contextmanager
def steering_rows(model, rows):
    """Steer each row of a batch its own way: rows[i] is (layer, neuron, value) for row i, or None
    to leave row i alone; a list of one entry steers every row alike (steering's case). So one
    forward or generate call carries a baseline, every strength and every candidate neuron at
    once. A hooked layer takes every row through the reference path, so a row left alone there is
    the baseline of its steered neighbours, not a rounding away from it."""
    per_layer = {}
    for i, row in enumerate(rows):
        if row is not None:
            per_layer.setdefault(row[0], []).append((i, row[1], row[2]))

    def hook_of(entries):
        kept = [(i, j, v) for i, j, v in entries if v is not None]
        which = torch.tensor([i for i, _, _ in kept], dtype=torch.long)
        neuron = torch.tensor([j for _, j, _ in kept], dtype=torch.long)
        values = torch.tensor([v for _, _, v in kept], dtype=torch.float32)

        def hook(module, inp, out):
            if not kept:
                return None  # a hook that returns None keeps the module's output
            if len(rows) > 1 and out.size(0) != len(rows):
                raise ValueError(f"steering_rows: {len(rows)} rows given for a batch of {out.size(0)}")
            out = out.clone()
            v = values.to(out.device, out.dtype)
            if len(rows) == 1:
                out[..., neuron[0]] = v[0]
            else:  # row which[r], every position, its own neuron[r]
                out[which.to(out.device), :, neuron.to(out.device)] = v[:, None]
            return out  # a hook's return value replaces the module's output
        return hook
    acts = mlp_acts(model)
    handles = [acts[l].register_forward_hook(hook_of(entries)) for l, entries in per_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect(model, tokens, layers, top_m, batch_size=16, marks=None, by_token=False):
    """Stream tokens (n_seq, T) through the model; per layer, per neuron: the top_m activations
    and their positions (flat indices into tokens), firing count, sum of positive activations,
    and that sum over each set of marked positions in `marks` ({name: bool (n_seq, T) tensor},
    e.g. concept_marks()). Memory stays O(top_m * d_ff) per layer whatever the number of tokens.
    by_token: also the sums per token id, at the token and before it (concept_stats() then gives
    any concept's marks without another pass), O(distinct tokens * d_ff) per layer."""
    dev = next(model.parameters()).device
    marks = marks or {}
    stats = {}
    vocab, inverse = torch.unique(tokens, return_inverse=True) if by_token else (None, None)
    with capture(model, layers) as captured:
        for b0 in range(0, len(tokens), batch_size):
            model(tokens[b0:b0 + batch_size].to(dev))
            pos = torch.arange(b0 * tokens.size(1), (b0 + len(captured[layers[0]])) * tokens.size(1))
            batch_marks = {name: m[b0:b0 + batch_size].flatten().float() for name, m in marks.items()}
            for l in layers:
                a = captured[l].flatten(0, 1).float().cpu()  # (tokens in batch, d_ff)
                s = stats.setdefault(l, dict(
                    values=torch.full((top_m, a.size(1)), -math.inf), positions=torch.full((top_m, a.size(1)), -1),
                    fires=torch.zeros(a.size(1)), sum=torch.zeros(a.size(1)), n_tokens=0, topk=is_topk(model, l),
                    mark_sum={name: torch.zeros(a.size(1)) for name in marks}, mark_count=dict.fromkeys(marks, 0)))
                # the running top-M: the best of (previous top-M, this batch), per neuron
                vals, idx = torch.cat([s["values"], a]).topk(top_m, dim=0)
                old = idx < top_m  # still one of the previous top-M, else this batch's row idx - M
                s["positions"] = torch.where(old, s["positions"].gather(0, idx.clamp(max=top_m - 1)),
                                             pos[(idx - top_m).clamp(min=0)])
                s["values"] = vals
                s["fires"] += (a > 0).sum(0)
                on = a.clamp(min=0)  # activation mass: what the neuron does when it fires
                s["sum"] += on.sum(0)
                s["n_tokens"] += len(a)
                for name, m in batch_marks.items():
                    s["mark_sum"][name] += m @ on
                    s["mark_count"][name] += int(m.sum())
                if by_token:
                    add_token_sums(s, vocab, inverse[b0:b0 + batch_size], on)
    return stats


def add_token_sums(s, vocab, inverse, on):
    """Add a batch's activation mass per token id to s: at each token ("at"), and at the position
    before it ("before"; a row's last position has no next token in view), with the counts."""
    if "vocab" not in s:
        s.update(vocab=vocab, **{f"{w}_{k}": torch.zeros(len(vocab), *shape) for w in ("at", "before")
                                 for k, shape in (("sum", on.shape[1:]), ("count", ()))})
    B, T = inverse.shape
    here, nxt = inverse.flatten(), inverse[:, 1:].flatten()
    s["at_sum"].index_add_(0, here, on)
    s["at_count"].index_add_(0, here, torch.ones(len(here)))
    s["before_sum"].index_add_(0, nxt, on.view(B, T, -1)[:, :-1].flatten(0, 1))
    s["before_count"].index_add_(0, nxt, torch.ones(len(nxt)))


def concept_stats(s, concept_ids):
    """collect()'s stats of one layer with the concept_marks() sums, from its by_token sums: what
    collect(..., marks=concept_marks(tokens, concept_ids)) gives, without streaming the tokens again."""
    rows = torch.isin(s["vocab"], torch.as_tensor(concept_ids))
    return dict(s, mark_sum={"concept": s["at_sum"][rows].sum(0), "next_is_concept": s["before_sum"][rows].sum(0)},
                mark_count={"concept": int(s["at_count"][rows].sum()), "next_is_concept": int(s["before_count"][rows].sum())})


def unembedded(model, layer):
    """The decoder directions through ln_f's linear part, d - mean(d) times its gain (module
    docstring): their dot product with a token's lm_head row is the logit they add to it."""
    d = decoder_directions(model, layer)
    return (d - d.mean(0)) * model.transformer.ln_f.weight[:, None]


@torch.no_grad()
def promoted_tokens(model, layer, j, n=8):
    logits = model.lm_head.weight[:EOT + 1] @ unembedded(model, layer)[:, j]  # rows past EOT are padding
    return logits.topk(n).indices.tolist()


def contexts_text(tokens, s, j, n=8, before=12, after=4):
    """The neuron's top n contexts as text lines, the firing token in [[ ]]."""
    flat, T, lines = tokens.flatten(), tokens.size(1), []
    for v, p in zip(s["values"][:n, j].tolist(), s["positions"][:n, j].tolist()):
        if v <= 0:
            break
        lo, hi = p - min(before, p % T), p + min(after, T - 1 - p % T)
        text = decode(flat[lo:p].tolist()) + "[[" + decode([flat[p]]) + "]]" + decode(flat[p + 1:hi + 1].tolist())
        lines.append(f"  {v:7.3f}  {text!r}")
    return lines


# -----------------------------------------------------------------------------
# the signals of the concept search: a neuron can read a concept (fire on its tokens), predict
# it (fire just before them) or write it (raise their logits); search.py tries what they propose


def concept_marks(tokens, concept_ids):
    """The positions collect() sums over for the signals: the concept's tokens, and the positions
    whose next token is one (the last of a row has no next token in view: not marked)."""
    concept = torch.isin(tokens, torch.as_tensor(concept_ids))
    before = torch.zeros_like(concept)
    before[:, :-1] = concept[:, 1:]
    return {"concept": concept, "next_is_concept": before}


def selectivity(s, mark):
    """Per neuron: (mean activation on the marked positions - mean elsewhere) / its max activation.
    High when it is strongly on for the marked positions in general, not just some of them, and
    off elsewhere; dividing by the max makes neurons of different scales comparable."""
    n_on = s["mark_count"][mark]
    on = s["mark_sum"][mark] / max(n_on, 1)
    off = (s["sum"] - s["mark_sum"][mark]) / max(s["n_tokens"] - n_on, 1)
    return (on - off) / s["values"][0].clamp(min=1e-9)


def reads(s):
    """What a neuron reads: how selectively it fires on the concept's own tokens."""
    return selectivity(s, "concept")


def predicts(s):
    """What a neuron predicts: how selectively it fires where the next token is the concept's.
    Often the useful signal in a language model: a neuron active before a word is one the model
    uses to produce the word."""
    return selectivity(s, "next_is_concept")


@torch.no_grad()
def writes(model, layer, concept_ids, spread=None):
    """What a neuron writes: how much its decoder direction, through ln_f and lm_head, raises the
    concept tokens' logits above the average token's, in standard deviations of the logits it
    gives all tokens (so the length of the direction does not matter). It ignores the blocks
    between the layer and the output; the steering trial then takes them into account.
    spread: logit_spread(model, layer), when the caller keeps it (it holds for every concept)."""
    d = unembedded(model, layer).float()
    U = model.lm_head.weight[:EOT + 1].float()
    spread = logit_spread(model, layer) if spread is None else spread
    return ((U[torch.as_tensor(concept_ids)] - U.mean(0)).mean(0) @ d) / spread.clamp(min=1e-9)


@torch.no_grad()
def logit_spread(model, layer):
    """Per neuron of the layer: the standard deviation over tokens of the logits its unembedded
    direction gives, relative to the average token (writes()'s unit)."""
    U = model.lm_head.weight[:EOT + 1].float()
    return (((U - U.mean(0)) @ unembedded(model, layer).float()) ** 2).mean(0).sqrt()
