"""
The concept search: which neuron to steer for a concept named by words. A neuron can read a
concept (fire on its tokens), predict it (fire just before them) or write it (raise their logits);
neurons.py has the three signals. Each proposes candidates, and a steering trial ranks them by
the probability they give the concept's tokens; sweep.py (for steer.py) then samples the best
few at every strength, since the trial measures what a neuron pushes and only samples show whether
the text stays text.
"""
import math

import torch

from configurator import die
from toolkit.data import decode, encode
from toolkit.neurons import collect, concept_marks, predicts, reads, steering_rows, writes


def concept_words(text):
    """The words of a --concept: separated by spaces or commas."""
    return text.replace(',', ' ').split()


def concept_token_ids(words):
    """The single-token forms of each word: ' job', 'job', ' Job', 'Job' where each is one token;
    a one-line error if no word has one."""
    ids = sorted({t[0] for w in words for form in (' ' + w, w, ' ' + w.capitalize(), w.capitalize())
                  if len(t := encode(form)) == 1})
    if not ids:
        die(f"--concept: none of {words} is a single GPT-2 token")
    return ids


TRIAL_ROWS = 8  # evaluation sequences the steering trial is run on


@torch.no_grad()
def concept_probabilities(model, rows, concept_ids, steered, stride=1, positions=2048):
    """For each (layer, neuron, value) in `steered` (or None: no steering), the next-token
    probability of the concept's tokens, summed over them, averaged over every stride-th position
    of the rows with that neuron set (a stride above 1 spares lm_head and its softmax, most of a
    pass, while every token is still context). The rows are repeated once per entry and run as one
    batch (steering_rows gives each copy its own neuron), as many copies per forward pass as keep
    about `positions` x vocabulary logits alive."""
    inputs = rows[:, :-1]
    scored = len(range(stride - 1, inputs.size(1), stride)) * len(rows)
    per_pass, out = max(1, positions // scored), []
    for i in range(0, len(steered), per_pass):
        group = steered[i:i + per_pass]
        with steering_rows(model, [s for s in group for _ in range(len(rows))]):
            x = model.trunk(inputs.repeat(len(group), 1))[:, stride - 1::stride]
        logits = model.lm_head(x).float()
        p = (logits[..., concept_ids].logsumexp(-1) - logits.logsumexp(-1)).exp()
        out += p.view(len(group), -1).mean(1).tolist()
    return out


@torch.no_grad()
def concept_candidates(model, stats, concept_ids, trial, strength, candidates, spreads=None):
    """Neurons to steer toward a concept, best first: in each layer of `stats` (collect() with
    concept_marks()) the `candidates` best by each signal, each steered to strength(its max) on the
    `trial` rows and ranked by the concept's next-token probability there (concept_probabilities;
    a neuron can read or predict a concept without promoting it, and the signals do not compare
    layers). The candidates are tried together, a few to a forward pass as memory allows.
    spreads: writes()'s per-layer denominators, if the caller keeps them. Dicts of probability,
    layer, neuron, peak, the signals that proposed it and its score by each; none if none fires."""
    concept_ids = torch.as_tensor(concept_ids, device=trial.device)
    tried = []
    for l, s in stats.items():
        spread = spreads[l] if spreads is not None else None
        scores = {"reads": reads(s), "predicts": predicts(s), "writes": writes(model, l, concept_ids, spread).cpu()}
        proposed = {}
        for name, score in scores.items():
            for j in score.topk(min(candidates, len(score))).indices.tolist():
                proposed.setdefault(j, []).append(name)
        for j, signals in proposed.items():
            peak = s["values"][0, j].item()
            if peak > 0:
                tried.append(dict(layer=l, neuron=j, peak=peak, signals=signals,
                                  scores={name: score[j].item() for name, score in scores.items()}))
    probabilities = concept_probabilities(model, trial, concept_ids,
                                          [(c["layer"], c["neuron"], strength(c["peak"])) for c in tried])
    return sorted((dict(c, probability=p) for c, p in zip(tried, probabilities)), key=lambda c: -c["probability"])


def concept_search(model, tokens, ids, layers, strength, top_m=32, candidates=6, n_finalists=3, batch_size=16):
    """(stats, finalists) for the concept tokens ids: collect() with concept_marks(), then
    concept_candidates() on the first TRIAL_ROWS sequences as trial data, then pick_finalists()."""
    stats = collect(model, tokens, layers, top_m, batch_size, concept_marks(tokens, ids))
    if any(s['mark_count']['concept'] == 0 for s in stats.values()):
        die(f"--concept: no concept token ({', '.join(repr(decode([t])) for t in ids)}) in the {tokens.numel():,} "
            "evaluation tokens; search more of them with a larger --eval_tokens, or other text with --eval_data")
    trial = tokens[:TRIAL_ROWS].to(next(model.parameters()).device)
    found = concept_candidates(model, stats, ids, trial, strength, candidates)
    if not found:
        die("--concept: none of the candidate neurons fires on the evaluation data")
    return stats, pick_finalists(found, n_finalists)


def pick_finalists(found, n):
    """The n candidates to sample (found: best first by the trial): the best of each layer first,
    since the trial favours layers that push the next token directly over those that set a
    context, then the next best overall."""
    per_layer = [c for i, c in enumerate(found) if all(c['layer'] != d['layer'] for d in found[:i])]
    return (per_layer + [c for c in found if c not in per_layer])[:n]


def trial_strength(value, scale):
    """The strength concept candidates are tried at: the given --value or --scale, else (a sweep
    to come) each candidate's own max activation, scale 1."""
    if not math.isnan(value):
        return lambda peak: value
    return lambda peak: (1.0 if math.isnan(scale) else scale) * peak
