"""
The strength sweep: a neuron's samples steered at several strengths beside the unsteered baseline
from the same seeds, scored by hit rate (a concept word in the continuation) and fluency (its
perplexity under the unsteered model); the strength kept, and the finalist of search.py that wins.
steer.py runs the sweep on its flags and prints it; steer_concept() is `steer.py --concept` as a
call (sae.py compares the routes with it); explore.py samples and scores one steering request with
sample_continuations() and continuation_perplexity(), and marks concept words with hit_pattern().
"""
import math
import re

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt
import torch
from torch.nn import functional as F

from toolkit.data import atomic_write, decode, encode_prompt
from toolkit.neurons import steering
from toolkit.search import concept_search, concept_token_ids, trial_strength

# the defaults of steer_concept() and of steer.py's flags
PROMPTS = ('The story began', 'On Monday,', 'Anna said that', 'Here is what happened')  # neutral prompts
SCALES = (0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4)


def hit_pattern(words):
    return re.compile(r'\b(?:' + '|'.join(map(re.escape, words)) + r')\b', re.IGNORECASE)


@torch.no_grad()
def continuation_perplexity(model, prompt, continuations):
    """Fluency: per row of continuations (n, L), exp of the mean next-token loss of its L tokens
    under the model, given the prompt and the tokens before. Beyond block_size tokens, the last
    block_size + 1 are scored in one window (the continuation's last block_size tokens)."""
    rows = torch.cat([torch.tensor(prompt).expand(len(continuations), -1), continuations.cpu()], 1)
    rows = rows[:, -(model.config.block_size + 1):].to(next(model.parameters()).device)
    logits = model.logits(rows[:, :-1])
    L = min(continuations.size(1), rows.size(1) - 1)
    nll = F.cross_entropy(logits[:, -L:].transpose(1, 2).float(), rows[:, -L:], reduction='none')
    return nll.mean(1).exp().cpu()


def sample_continuations(model, prompt_ids, layer, neuron, value, num_samples, max_new_tokens, temperature,
                         top_k, seed):
    """num_samples continuations (token tensors (num_samples, max_new_tokens)) of each prompt,
    with neuron (layer, neuron) set to value, or through the same hooked path unchanged when value
    is None, so that a steered set and its baseline differ by the steering alone. Prompt i draws
    from seed + i in both."""
    dev, out = next(model.parameters()).device, []
    for i, ids in enumerate(prompt_ids):
        torch.manual_seed(seed + i)
        with steering(model, layer, neuron, value):
            y = model.generate(torch.tensor([ids] * num_samples, device=dev), max_new_tokens,
                               temperature=temperature, top_k=top_k or None)
        out.append(y[:, len(ids):].cpu())
    return out


def quality(model, prompt_ids, continuations, pattern):
    """Hit rate (None without a pattern), mean perplexity under `model` as called (unsteered: no hook
    is on when steer_and_score calls this) and texts of continuations (one tensor per prompt)."""
    texts = [[decode(row.tolist()) for row in c] for c in continuations]
    hits = [bool(pattern.search(t)) for ts in texts for t in ts] if pattern else []
    ppl = torch.cat([continuation_perplexity(model, p, c) for p, c in zip(prompt_ids, continuations)])
    return dict(hit_rate=sum(hits) / len(hits) if hits else None, ppl=ppl.mean().item(), texts=texts,
                continuations=continuations)


def pick_scale(sweep, baseline_ppl, max_ratio=2.0):
    """The sweep row to keep: among rows with perplexity at most max_ratio x the baseline's, the best
    hit rate (on a tie the gentler strength; without hit rates the strongest); else the most fluent."""
    fluent = [r for r in sweep if r['ppl'] <= max_ratio * baseline_ppl]
    if not fluent:
        return min(sweep, key=lambda r: r['ppl'])
    if all(r['hit_rate'] is None for r in fluent):
        return max(fluent, key=lambda r: r['scale'])
    return max(fluent, key=lambda r: (r['hit_rate'], -r['scale']))


def steered_row(model, target, s, prompt_ids, pattern, settings):
    """quality() of the samples with target's neuron set to s x its peak (to s when the peak is
    None), with 'scale' s and 'value'. Scored without the hook: fluency under the unsteered model."""
    v = s * target['peak'] if target['peak'] is not None else s
    continuations = sample_continuations(model, prompt_ids, target['layer'], target['neuron'], v, **settings)
    return dict(scale=s, value=v, **quality(model, prompt_ids, continuations, pattern))


def steer_and_score(model, target, strengths, prompt_ids, pattern, settings, refine=0, max_ratio=2.0,
                    full_sweep=True):
    """Baseline and one steered set per strength for target ({layer, neuron, peak}; a strength is a
    multiple of peak, or absolute if peak is None): (quality() of the baseline, steered_row() per
    strength, by scale). settings: num_samples, max_new_tokens, temperature, top_k, seed. Without
    full_sweep the strengths are tried from the weakest up to the first that is not fluent
    (perplexity beyond max_ratio x the baseline's): stronger ones break fluency further. With
    refine, that many more strengths are tried by bisection between the last fluent strength and
    the next one, which is not: fluency breaks somewhere in that gap, and the hit rate is usually
    best just before it does."""
    base = quality(model, prompt_ids, sample_continuations(model, prompt_ids, target['layer'], target['neuron'], None,
                                                           **settings), pattern)
    bound = max_ratio * base['ppl']
    sweep = []  # every row is sampled from its own seeds, so the order they are sampled in changes no row
    for s in sorted(strengths):
        sweep.append(steered_row(model, target, s, prompt_ids, pattern, settings))
        if not full_sweep and not sweep[-1]['ppl'] <= bound:
            break
    for _ in range(refine):
        gap = fluency_gap(sweep, bound)
        if gap is None:
            break
        sweep = sorted(sweep + [steered_row(model, target, sum(gap) / 2, prompt_ids, pattern, settings)],
                       key=lambda r: r['scale'])
    return base, sweep


def fluency_gap(sweep, bound):
    """(last fluent scale, the next scale, which is not fluent: perplexity beyond bound) of a sweep
    sorted by scale, or None when no fluent row is followed by one that is not."""
    for lo, hi in zip(sweep, sweep[1:]):
        if lo['ppl'] <= bound and not hi['ppl'] <= bound:
            return lo['scale'], hi['scale']
    return None


def steer_finalists(model, finalists, strengths, prompt_ids, pattern, settings, refine=0, max_ratio=2.0,
                    full_sweep=True):
    """Each finalist ({layer, neuron, peak}) steered at the strengths beside its own baseline
    (see steer_and_score for refine and full_sweep); pick_scale keeps one row of each, and the
    winner is the finalist whose kept row is fluent (perplexity within max_ratio of its
    baseline's) with the best hit rate, the earlier on a tie.
    Returns ([(finalist, baseline, sweep, kept)], index of the winner)."""
    results = []
    for f in finalists:
        base, sweep = steer_and_score(model, f, strengths, prompt_ids, pattern, settings, refine, max_ratio, full_sweep)
        results.append((f, base, sweep, pick_scale(sweep, base['ppl'], max_ratio)))
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
                  refine=3, full_sweep=False, batch_size=16):
    """What `python steer.py --concept=WORDS` does, as a call with the same defaults: the concept
    search over `layers` on the evaluation tokens, then every finalist swept over the scales.
    Returns the winner's (finalist, baseline quality, sweep, kept row), as steer_finalists()."""
    ids = concept_token_ids(words)
    _, finalists = concept_search(model, tokens, ids, layers, trial_strength(math.nan, math.nan), top_m,
                                  candidates, n_finalists, batch_size)
    settings = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, seed=seed)
    results, win = steer_finalists(model, finalists, list(scales), [encode_prompt(p) for p in prompts],
                                   hit_pattern(words), settings, refine, max_ppl_ratio, full_sweep)
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
