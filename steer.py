"""
Steer generation with one neuron: set its activation to a value at every position (after the
TopK mask, alpha = 0) and compare with unsteered samples drawn with the same seeds.

    python steer.py --out_dir=out-toy --layer=1 --neuron=42 --scale=2
    python steer.py --out_dir=out-toy --concept="job office salary manager career boss"

--concept finds the neuron with search.py: candidates from what neurons read, predict and write,
ranked by a steering trial; the --n_finalists best are each swept here. Hit rate: the fraction
of samples whose continuation holds a concept word (whole word, any case). Fluency: each
continuation's perplexity under the unsteered model, averaged. Without --scale or --value the
strength is swept over --scales from the weakest up to the first past --max_ppl_ratio x the
baseline's perplexity (all of them with --full_sweep=True), then --refine more strengths are tried
by bisection where fluency breaks; the best hit rate within the bound is kept. The last output
line is one JSON object. steer_concept() is the same search and sweep as a call (sae.py uses it).
"""
import json
import math
import os
import re

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt
import torch
from torch.nn import functional as F

from common import atomic_write, decode, encode_prompt, resolve_device, run_folder
from configurator import configure, die
from dictionary import attach_file
from model import load_model
from neurons import collect, contexts_text, decoder_directions, is_topk, run_eval_tokens, steering
from search import concept_search, concept_token_ids, concept_words, trial_strength

# the defaults of steer_concept() and of the flags below
PROMPTS = ('The story began', 'On Monday,', 'Anna said that', 'Here is what happened')  # neutral prompts
SCALES = (0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4)

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run to steer (its ckpt.pt), or a checkpoint file
layer = -1  # the neuron's layer (with --concept alone: restrict the search to it; -1 = all TopK layers)
neuron = -1  # the neuron's index in its layer (-1 with --concept: search for it)
concept = ''  # words naming a concept, e.g. "job salary boss": picks the neuron, scores samples
value = float('nan')  # the activation to set, absolute; nan = a multiple of the neuron's max
scale = float('nan')  # strength as a multiple of the neuron's max on evaluation data; nan = sweep --scales
scales = ','.join(map(str, SCALES))  # the strengths swept when neither --scale nor --value is given
max_ppl_ratio = 2.0  # the sweep keeps strengths whose steered perplexity is at most this times the baseline's
refine = 3  # with a sweep: strengths tried by bisection where fluency breaks, between the last fluent scale and the next
full_sweep = False  # with a sweep: sample every scale; False stops at the first scale past the fluency bound
plot = False  # with a sweep: write hit rate and perplexity against scale to OUT_DIR/analysis/steering_L_J.png
prompts = '|'.join(PROMPTS)  # neutral prompts, separated by |
num_samples = 10  # samples per prompt, baseline and steered each
max_new_tokens = 60  # tokens generated per sample
temperature = 0.8  # sampling temperature
top_k = 200  # sample among the top_k most likely tokens; 0 = all
seed = 1337  # the baseline and steered samples of a prompt share this seed
eval_data = ''  # data dir (val shards) or .txt file to find the neuron / its max; '' = the run's data_dir
eval_tokens = 32768  # evaluation tokens for --concept and --scale
top_m = 32  # top-activating positions kept per neuron
candidates = 6  # with --concept: the best neurons of each layer by each signal, tried by steering
n_finalists = 4  # with --concept: the candidates swept: each layer's best by the trial, then the next best
batch_size = 16  # sequences per forward pass on evaluation data
dictionary = ''  # an SAE or transcoder file from sae.py: steer its latents (in place of its layer's neurons)
device = 'auto'
# -----------------------------------------------------------------------------


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


def steer_and_score(model, layer, neuron, strengths, peak, prompt_ids, pattern, settings, refine=0, max_ratio=2.0,
                    full_sweep=True):
    """Baseline and one steered set per strength (a multiple of peak, or absolute if peak is
    None): (quality() of the baseline, [the same plus 'scale', 'value'] per strength, by scale).
    settings: num_samples, max_new_tokens, temperature, top_k, seed. Without full_sweep the
    strengths are tried from the weakest up to the first that is not fluent (perplexity beyond
    max_ratio x the baseline's): stronger ones break fluency further. With refine, that many more
    strengths are tried by bisection between the last fluent strength and the next one, which is
    not: fluency breaks somewhere in that gap, and the hit rate is usually best just before it does."""
    def row(s):  # sampled with the neuron set to v, scored without (fluency under the unsteered model)
        v = s * peak if peak is not None else s
        return dict(scale=s, value=v, **quality(model, prompt_ids, sample_continuations(
            model, prompt_ids, layer, neuron, v, **settings), pattern))
    base = quality(model, prompt_ids, sample_continuations(model, prompt_ids, layer, neuron, None, **settings), pattern)
    fluent = lambda r: r['ppl'] <= max_ratio * base['ppl']
    sweep = []  # every row is sampled from its own seeds, so the order they are sampled in changes no row
    for s in sorted(strengths):
        sweep.append(row(s))
        if not full_sweep and not fluent(sweep[-1]):
            break
    for _ in range(refine):
        gap = fluency_gap(sweep, fluent)
        if gap is None:
            break
        sweep = sorted(sweep + [row(sum(gap) / 2)], key=lambda r: r['scale'])
    return base, sweep


def fluency_gap(sweep, fluent):
    """(last fluent scale, the next scale, which is not fluent) of a sweep sorted by scale, or None
    when no fluent row is followed by one that is not."""
    for lo, hi in zip(sweep, sweep[1:]):
        if fluent(lo) and not fluent(hi):
            return lo['scale'], hi['scale']
    return None


def steer_finalists(model, finalists, strengths, prompt_ids, pattern, settings, max_ratio=2.0, refine=0,
                    full_sweep=True):
    """Each finalist ({layer, neuron, peak}) steered at the strengths beside its own baseline
    (see steer_and_score for refine and full_sweep); pick_scale keeps one row of each, and the
    winner is the finalist whose kept row is fluent (perplexity within max_ratio of its
    baseline's) with the best hit rate, the earlier on a tie.
    Returns ([(finalist, baseline, sweep, kept)], index of the winner)."""
    results = []
    for f in finalists:
        base, sweep = steer_and_score(model, f['layer'], f['neuron'], strengths, f['peak'], prompt_ids, pattern,
                                      settings, refine, max_ratio, full_sweep)
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
                                   hit_pattern(words), settings, max_ppl_ratio, refine, full_sweep)
    return results[win]


def plot_sweep(path, sweep, base, title):
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


# -----------------------------------------------------------------------------
# the command line: main() and its steps, which read the flags above


def checked_flags():
    """The flags checked before a model loads: (the strengths of a sweep, the prompts' token ids)."""
    for flag, v in (('max_new_tokens', max_new_tokens), ('num_samples', num_samples), ('candidates', candidates),
                    ('n_finalists', n_finalists)):
        if v < 1:
            die(f"--{flag} must be at least 1, got {v}")
    if refine < 0:
        die(f"--refine must be at least 0, got {refine}")
    if not max_ppl_ratio > 0:
        die(f"--max_ppl_ratio must be positive, got {max_ppl_ratio}")
    try:
        sweep = [float(s) for s in scales.split(',')]
    except ValueError:
        die(f"--scales expects numbers separated by commas, e.g. 0.5,1,2,4, got {scales!r}")
    return sweep, [encode_prompt(p, '--prompts') for p in prompts.split('|')]  # dies on an empty prompt


def steered_layer(model, search, site):
    """--layer checked against the model (-1: every TopK layer, for a search); with a dictionary
    attached at layer site, that layer."""
    l = layer
    if site is not None:
        if layer not in (-1, site):
            die(f"--layer={layer}, but --dictionary={dictionary} sits at layer {site}")
        l = site
    n_layer = len(model.transformer.h)
    if not -1 <= l < n_layer or (l == -1 and not search):
        die(f"--layer must be in [0, {n_layer - 1}], got {l}" + ("" if concept else " (or give --concept)"))
    if not search and not 0 <= neuron < decoder_directions(model, l).size(1):
        die(f"--neuron must be in [0, {decoder_directions(model, l).size(1) - 1}], got {neuron}")
    return l


def searched_finalists(model, tokens, words, l):
    """(stats, finalists) of the concept search over layer l, or every TopK layer for l = -1."""
    ids = concept_token_ids(words)
    n_layer = len(model.transformer.h)
    layers = [l] if l >= 0 else [i for i in range(n_layer) if is_topk(model, i)]
    if not layers:
        print("note: this model has no TopK block (topk = 0); searching its dense blocks")
        layers = list(range(n_layer))
    stats, finalists = concept_search(model, tokens, ids, layers, trial_strength(value, scale), top_m, candidates,
                                      n_finalists, batch_size)
    print(f"concept tokens: {' '.join(repr(decode([t])) for t in ids)}")
    for f in finalists:
        print(f"finalist {f['layer']}:{f['neuron']}, proposed by {'+'.join(f['signals'])} (" +
              ", ".join(f"{k} {v:.2f}" for k, v in f['scores'].items()) +
              f"), steered concept probability {f['probability']:.4f}")
    return stats, finalists


def given_finalist(model, tokens, l):
    """(stats or None, [the --layer/--neuron finalist]), with its max activation for a --scale."""
    stats = None if tokens is None else collect(model, tokens, [l], top_m, batch_size)
    peak = None if stats is None else stats[l]['values'][0, neuron].item()
    if peak is not None and peak <= 0:
        die(f"--neuron={neuron} of layer {l} never fires on the evaluation data; give --value instead of --scale")
    return stats, [dict(layer=l, neuron=neuron, peak=peak, signals=None)]


def quality_text(r, with_hits):
    return (f"hit rate {r['hit_rate']:.2f}, " if with_hits else "") + f"perplexity {r['ppl']:.2f}"


def chosen_line(best, base, kept, absolute, with_hits, max_ratio):
    """What was kept and why: the best (without a concept, the strongest) fluent strength, else the most fluent."""
    line = f"chosen: neuron {best['layer']}:{best['neuron']} at {'value' if absolute else 'scale'} {kept['scale']:g}, "
    if kept['ppl'] <= max_ratio * base['ppl']:
        return line + ("the best hit rate" if with_hits else "the strongest") + \
            f" with perplexity within {max_ratio:g}x the baseline's"
    return line + f"no strength stayed within {max_ratio:g}x the baseline perplexity: the most fluent"


def report_sweeps(results, win, absolute, with_hits):
    """Every finalist's sweep beside its baseline, and the strength kept."""
    for f, base, sweep, kept in results:
        print(f"neuron {f['layer']}:{f['neuron']}" + (f", max activation {f['peak']:.3f}" if f['peak'] else "") +
              f"; baseline: {quality_text(base, with_hits)}")
        for r in sweep:
            print(f"  {'value' if absolute else 'scale'} {r['scale']:g} (value {r['value']:.3f}): "
                  f"{quality_text(r, with_hits)}")
    best, base, _, kept = results[win]
    print(chosen_line(best, base, kept, absolute, with_hits, max_ppl_ratio))


def report_samples(base, kept, with_hits, prompt_list):
    """The samples at the kept strength beside their baselines (same seeds), then both qualities."""
    for i, text in enumerate(prompt_list):
        for n in range(num_samples):
            print(f"--- prompt {text!r}, sample {n + 1}")
            print(f"baseline: {text + base['texts'][i][n]!r}")
            print(f" steered: {text + kept['texts'][i][n]!r}")
    print(f"over {len(prompt_list) * num_samples} samples: baseline {quality_text(base, with_hits)}; "
          f"steered {quality_text(kept, with_hits)}")


def main():
    configure(globals())
    sweep_scales, prompt_ids = checked_flags()
    model, ckpt = load_model(out_dir, resolve_device(device))
    site = attach_file(model, dictionary) if dictionary else None  # its latents are steered as neurons
    search = bool(concept) and neuron == -1  # else the given neuron is steered (and scored on the concept)
    l = steered_layer(model, search, site)
    absolute = not math.isnan(value)
    words = concept_words(concept)
    tokens = run_eval_tokens(eval_data, ckpt, eval_tokens, model.config.block_size) if search or not absolute else None
    stats, finalists = searched_finalists(model, tokens, words, l) if search else given_finalist(model, tokens, l)
    if absolute:  # the strength is the value itself, not a multiple of a max
        finalists = [dict(f, peak=None) for f in finalists]
    strengths = [value] if absolute else [scale] if not math.isnan(scale) else sweep_scales
    settings = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, seed=seed)
    pattern = hit_pattern(words) if words else None
    results, win = steer_finalists(model, finalists, strengths, prompt_ids, pattern, settings, max_ppl_ratio, refine,
                                   full_sweep)
    best, base, sweep, kept = results[win]
    report_sweeps(results, win, absolute, pattern is not None)
    if stats is not None:
        print("\n".join(contexts_text(tokens, stats[best['layer']], best['neuron'])))
    if not is_topk(model, best['layer']):
        print(f"note: layer {best['layer']} is a dense GELU block, not TopK: its neurons are not sparse features")
    if plot and len(sweep) > 1:
        path = os.path.join(run_folder(out_dir), 'analysis', f"steering_{best['layer']}_{best['neuron']}.png")
        plot_sweep(path, sweep, base, f"neuron {best['layer']}:{best['neuron']}" + (f", concept: {concept}" if concept else ""))
        print(f"wrote {path}")
    report_samples(base, kept, pattern is not None, prompts.split('|'))
    print(json.dumps({'layer': best['layer'], 'neuron': best['neuron'], 'value': kept['value'],
                      'baseline_hit_rate': base['hit_rate'], 'steered_hit_rate': kept['hit_rate'],
                      'baseline_ppl': base['ppl'], 'steered_ppl': kept['ppl'],
                      'scale': None if absolute else kept['scale'], 'signals': best['signals'],
                      'sweep': [{k: r[k] for k in ('scale', 'value', 'hit_rate', 'ppl')} for r in sweep],
                      'finalists': [f"{f['layer']}:{f['neuron']}" for f, *_ in results]}))


if __name__ == '__main__':
    main()
