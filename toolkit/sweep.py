"""
The strength sweep: a neuron's samples steered at several strengths beside the unsteered baseline
from the same seeds, scored by hit rate (a concept word in the continuation) and fluency (its
perplexity under the unsteered model); the strength kept, and the finalist of search.py that wins.
steer.py runs the sweep on its flags and prints it; steer_concept() is `steer.py --concept` as a
call (sae.py compares the routes with it); explore.py samples and scores a steering request and
its baseline with steered_rows(), and marks concept words with hit_pattern(). Whatever is sampled
together is one batch: every finalist's next strength, and the baseline beside the first.
"""
import math
import re

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt
import torch
from torch.nn import functional as F

from toolkit.data import N_TOKENS, atomic_write, decode, encode_prompt
from toolkit.neurons import steering_rows
from toolkit.search import concept_search, concept_token_ids, trial_strength

# the defaults of steer_concept() and of steer.py's flags
PROMPTS = ('The story began', 'On Monday,', 'Anna said that', 'Here is what happened')  # neutral prompts
SCALES = (0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4)
MAX_SCALE = 32  # the sweep doubles past SCALES' top while fluent, up to this


def hit_pattern(words):
    # not \b: it needs a word character on its inner side, so "c++" or "u.s." could never match
    return re.compile(r'(?<!\w)(?:' + '|'.join(map(re.escape, words)) + r')(?!\w)', re.IGNORECASE)


@torch.no_grad()
def continuation_perplexity(model, prompt, continuations, positions=2048):
    """Fluency: per row of continuations (n, L), exp of the mean next-token loss of its L tokens
    under the model, given the prompt and the tokens before. Beyond block_size tokens, the last
    block_size + 1 are scored in one window (the continuation's last block_size tokens). A few
    rows at a time, so at most about `positions` x vocabulary logits live at once."""
    rows = torch.cat([torch.tensor(prompt).expand(len(continuations), -1), continuations.cpu()], 1)
    rows = rows[:, -(model.config.block_size + 1):].to(next(model.parameters()).device)
    L, out = min(continuations.size(1), rows.size(1) - 1), []
    for chunk in rows.split(max(1, positions // rows.size(1))):
        logits = model.logits(chunk[:, :-1])
        nll = F.cross_entropy(logits[:, -L:].transpose(1, 2).float(), chunk[:, -L:], reduction='none')
        out.append(nll.mean(1).exp().cpu())
    return torch.cat(out)


def sample_sets(model, prompt_ids, steered, num_samples, max_new_tokens, temperature, top_k, seed):
    """For each entry of steered, (layer, neuron, value) or None (unsteered), num_samples
    continuations of each prompt: [per entry [per prompt a (num_samples, max_new_tokens) tensor]].
    Every entry's rows of a prompt are one generate call (steering_rows gives each its neuron),
    and each entry draws prompt i's samples from its own generator seeded seed + i: what the entry
    gives alone, up to the float rounding of a larger batch. An unsteered entry beside steered ones
    goes through the same hooked path, so it differs from them by the steering alone."""
    dev, out = next(model.parameters()).device, [[] for _ in steered]
    for i, ids in enumerate(prompt_ids):
        generators = [torch.Generator(dev).manual_seed(seed + i) for _ in steered]
        with steering_rows(model, [e for e in steered for _ in range(num_samples)]):
            y = model.generate(torch.tensor([ids] * (num_samples * len(steered)), device=dev), max_new_tokens,
                               temperature=temperature, top_k=top_k or None, generators=generators,
                               vocab_size=N_TOKENS)
        for sets, part in zip(out, y[:, len(ids):].cpu().split(num_samples)):
            sets.append(part)
    return out


def qualities(model, prompt_ids, sets, pattern):
    """Per set of continuations (one tensor per prompt, as sample_sets gives): hit rate (None
    without a pattern), mean perplexity under `model` as called (no hook is on when the sweep
    calls this: fluency under the unsteered model), texts and the continuations. Each prompt's
    rows of every set are scored together."""
    ppl = [continuation_perplexity(model, p, torch.cat([c[i] for c in sets])).split([len(c[i]) for c in sets])
           for i, p in enumerate(prompt_ids)]
    out = []
    for k, continuations in enumerate(sets):
        texts = [[decode(row.tolist()) for row in c] for c in continuations]
        hits = [bool(pattern.search(t)) for ts in texts for t in ts] if pattern else []
        out.append(dict(hit_rate=sum(hits) / len(hits) if hits else None,
                        ppl=torch.cat([p[k] for p in ppl]).mean().item(), texts=texts, continuations=continuations))
    return out


def pick_scale(sweep, baseline_ppl, max_ratio=2.0):
    """The sweep row to keep: among rows with perplexity at most max_ratio x the baseline's, the best
    hit rate (on a tie the gentler strength; without hit rates the strongest); else the most fluent."""
    fluent = [r for r in sweep if r['ppl'] <= max_ratio * baseline_ppl]
    if not fluent:
        return min(sweep, key=lambda r: r['ppl'])
    if all(r['hit_rate'] is None for r in fluent):
        return max(fluent, key=lambda r: r['scale'])
    return max(fluent, key=lambda r: (r['hit_rate'], -r['scale']))


def steered_rows(model, asks, prompt_ids, pattern, settings):
    """qualities() of the samples of each (target, s) in asks, target's neuron set to s x its peak
    (to s when the peak is None; target None: unsteered), all sampled and scored in one batch per
    prompt; each row with its 'scale' s and 'value'."""
    values = [None if t is None else s * t['peak'] if t['peak'] is not None else s for t, s in asks]
    steered = [None if t is None else (t['layer'], t['neuron'], v) for (t, _), v in zip(asks, values)]
    scored = qualities(model, prompt_ids, sample_sets(model, prompt_ids, steered, **settings), pattern)
    return [dict(scale=s, value=v, **q) for (_, s), v, q in zip(asks, values, scored)]


def sweep_plan(strengths, bound, refine, full_sweep, max_scale):
    """One finalist's sweep as a generator: it yields the next strength to sample, is sent that
    strength's row, and returns the sweep (rows by scale). The strengths are tried from the weakest
    up; without full_sweep only to the first that is not fluent (perplexity beyond bound), since
    stronger ones break fluency further. If the last is still fluent, it goes on doubling up to
    max_scale (the grid's top may be too weak a push). With refine, that many more strengths are
    tried by bisection between the last fluent strength and the next, which is not: fluency breaks
    somewhere in that gap, and the hit rate is usually best just before it does."""
    sweep = []
    for s in sorted(strengths):
        sweep.append((yield s))
        if not full_sweep and not sweep[-1]['ppl'] <= bound:
            break
    else:  # the whole grid was tried: while its strongest is still fluent, double it
        while max_scale and sweep[-1]['ppl'] <= bound and 0 < 2 * sweep[-1]['scale'] <= max_scale:
            sweep.append((yield 2 * sweep[-1]['scale']))
    for _ in range(refine):
        gap = fluency_gap(sweep, bound)
        if gap is None:
            break
        sweep = sorted(sweep + [(yield sum(gap) / 2)], key=lambda r: r['scale'])
    return sweep


def fluency_gap(sweep, bound):
    """(last fluent scale, the next scale, which is not fluent: perplexity beyond bound) of a sweep
    sorted by scale, or None when no fluent row is followed by one that is not."""
    for lo, hi in zip(sweep, sweep[1:]):
        if lo['ppl'] <= bound and not hi['ppl'] <= bound:
            return lo['scale'], hi['scale']
    return None


def sweep_finalists(model, finalists, strengths, prompt_ids, pattern, settings, refine=0, max_ratio=2.0,
                    full_sweep=True, max_scale=0):
    """The unsteered baseline and every finalist ({layer, neuron, peak}; a strength is a multiple of
    peak, or absolute if peak is None) swept as sweep_plan says (max_scale 0: not past the grid),
    fluency bound max_ratio x the baseline's perplexity. settings: num_samples, max_new_tokens,
    temperature, top_k, seed. The sweeps run side by side: each round samples the next strength of
    every finalist still going in one batch (the first round with the baseline), so a finalist's
    rows are what its sweep alone would sample. Returns (baseline quality, [sweep per finalist])."""
    first = min(strengths)
    rows = steered_rows(model, [(None, None)] + [(f, first) for f in finalists], prompt_ids, pattern, settings)
    base, rows = rows[0], rows[1:]
    plans = [sweep_plan(strengths, max_ratio * base['ppl'], refine, full_sweep, max_scale) for _ in finalists]
    asks, sweeps = {}, {}
    for i, plan in enumerate(plans):
        next(plan)  # the weakest strength: sampled in the first round
        asks[i] = rows[i]
    while asks:
        nxt = {}
        for i, row in asks.items():
            try:
                nxt[i] = plans[i].send(row)
            except StopIteration as done:
                sweeps[i] = done.value
        batch = list(nxt.items())
        asks = dict(zip(nxt, steered_rows(model, [(finalists[i], s) for i, s in batch], prompt_ids, pattern,
                                          settings))) if batch else {}
    return base, [sweeps[i] for i in range(len(finalists))]


def steer_finalists(model, finalists, strengths, prompt_ids, pattern, settings, refine=0, max_ratio=2.0,
                    full_sweep=True, max_scale=0):
    """sweep_finalists, then pick_scale keeps one row of each, and the winner is the finalist whose
    kept row is fluent (perplexity within max_ratio of the baseline's) with the best hit rate, the
    earlier on a tie. Returns ([(finalist, baseline, sweep, kept)], index of the winner)."""
    base, sweeps = sweep_finalists(model, finalists, strengths, prompt_ids, pattern, settings, refine, max_ratio,
                                   full_sweep, max_scale)
    results = [(f, base, sweep, pick_scale(sweep, base['ppl'], max_ratio)) for f, sweep in zip(finalists, sweeps)]
    return results, pick_finalist([(base, kept) for _, base, _, kept in results], max_ratio)


def pick_finalist(pairs, max_ratio=2.0):
    """Index of the (baseline, kept row) pair that wins: among the fluent ones the best hit rate,
    else the least perplexity over its baseline's; on a tie the earlier (ranked higher by the trial)."""
    def rank(base, kept):
        ratio = kept['ppl'] / base['ppl']
        return (True, kept['hit_rate'] or 0) if ratio <= max_ratio else (False, -ratio)
    return max(range(len(pairs)), key=lambda i: (rank(*pairs[i]), -i))


def steer_concept(model, tokens, words, layers, prompts=PROMPTS, scales=SCALES, num_samples=10, max_new_tokens=60,
                  temperature=0.8, top_k=200, seed=1337, top_m=32, candidates=6, n_finalists=4, max_ppl_ratio=2.0,
                  refine=3, full_sweep=False, batch_size=16, max_scale=MAX_SCALE):
    """What `python steer.py --concept=WORDS` does, as a call with the same defaults: the concept
    search over `layers` on the evaluation tokens, then every finalist swept over the scales.
    Returns the winner's (finalist, baseline quality, sweep, kept row), as steer_finalists()."""
    ids = concept_token_ids(words)
    _, finalists = concept_search(model, tokens, ids, layers, trial_strength(math.nan, math.nan), top_m,
                                  candidates, n_finalists, batch_size)
    settings = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, seed=seed)
    results, win = steer_finalists(model, finalists, list(scales), [encode_prompt(p) for p in prompts],
                                   hit_pattern(words), settings, refine, max_ppl_ratio, full_sweep, max_scale)
    return results[win]


def plot_sweep(path, sweep, base, title):
    """Hit rate and perplexity against scale, each beside its baseline's, as a PNG at path."""
    x = [r['scale'] for r in sweep]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if base['hit_rate'] is not None:
        ax.plot(x, [r['hit_rate'] for r in sweep], 'o-', color='C0', label='steered hit rate')
        ax.axhline(base['hit_rate'], color='C0', ls=':', label='baseline hit rate')
    ax.set_xlabel('scale (x the neuron\'s max activation)')
    ax.set_ylabel('hit rate')
    ax.set_ylim(-0.05, 1.05)
    ax2 = ax.twinx()
    ax2.plot(x, [r['ppl'] for r in sweep], 's--', color='C3', label='steered perplexity')
    ax2.axhline(base['ppl'], color='C3', ls=':', label='baseline perplexity')
    ax2.set_ylabel('perplexity under the unsteered model')
    fig.legend(fontsize=8, loc='lower center', ncol=2)  # below the axes: the curves use the whole box
    ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=80))
    plt.close(fig)
