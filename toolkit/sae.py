"""
The post-hoc route the paper argues against, measured beside a TopK LM: a TopK sparse autoencoder
(or a transcoder) trained on the dense twin's MLP after the fact, with the same dictionary budget
as the TopK LM's neurons (n_latents = d_ff, the same k), at each of its TopK sites. dictionary.py
has the dictionaries; this script trains them, by default with EleutherAI sparsify
(sparsify_train.py, toolkit/requirements-interop.txt; --trainer=own: dictionary.py's own trainer, which
needs nothing more but trains weaker dictionaries, RESULTS.md says by how much), keeps them in
OUT_DIR/sae/, and compares the routes: CE cost of splicing them in, FVU, entropies, stability
across seeds and checkpoints, and single-feature steering.

    python -m toolkit.sae --out_dir=out-toy-dense --compare=out-toy                 # train, then compare
    python -m toolkit.sae --out_dir=out-toy-dense --compare=out-toy --kind=sae --layer=1
    python -m toolkit.analysis --out_dir=out-toy-dense --dictionary=out-toy-dense/sae/sae_layer1.pt --layer=1
"""
import json
import math
import os

import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from torch.nn import functional as F

from configurator import at_least, configure, die
from model import topk_layers
from toolkit.analysis import analyse, mean_over_firing, semantic_clusters
from toolkit.common import load_model, resolve_device, run_checkpoints
from toolkit.cpu_fast import enable as cpu_fast_paths
from toolkit.data import atomic_write, file_stamp
from toolkit.dictionary import (attached, initial_coders, load_dictionary, mean_ce, model_shape, near_initialisation,
                                reconstruction, save_dictionary, shared_fraction, splice_costs, top_token_overlap,
                                train_dictionaries)
from toolkit.neurons import run_eval_tokens
from toolkit.search import concept_words
from toolkit.sweep import steer_concept

try:  # optional (toolkit/requirements-interop.txt): --trainer=sparsify
    from toolkit import sparsify_train
except ModuleNotFoundError as e:
    sparsify_train, missing = None, e.name

# -----------------------------------------------------------------------------
out_dir = 'out-dense'  # the dense twin (topk = 0) whose MLPs the dictionaries read; they go to OUT_DIR/sae/
compare = ''  # the TopK run: its k, its TopK layers (the sites) and its checkpoints
kind = 'both'  # 'sae', 'transcoder' or 'both'
layer = -1  # one site only; -1 = every layer the TopK run makes sparse
n_tokens = 1_000_000  # training tokens per dictionary (activations streamed from the train shards)
batch_size = 4096  # tokens per step
trainer = 'sparsify'  # 'sparsify' (EleutherAI sparsify, its defaults) or 'own' (dictionary.py's, Adam + AuxK)
lr = 0.0  # learning rate; 0 = the trainer's rule (own: 2e-4, sparsify: 5e-3, over sqrt(n_latents / 2^14))
aux_coef = 1 / 32  # weight of the AuxK loss (own trainer)
dead_tokens = 100_000  # a latent that has not fired in this many training tokens is dead (AuxK, own trainer)
seed = 0  # initialisation and data order
retrain = False  # retrain dictionaries that OUT_DIR/sae/ already holds with the same settings
stability = True  # also train a second seed, and a dictionary on an earlier checkpoint
early = 0.6  # the earlier checkpoint: the snapshot nearest this fraction of training
concept = ''  # words naming a concept: compare single-feature steering (steer.py's search) per route
eval_tokens = 32768  # fixed evaluation tokens (the run's val shards)
top_m = 32  # top-activating positions per feature, for the entropies
n_clusters = 64  # k-means clusters of the reference embedding (the TopK run's final wte)
device = 'auto'
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# measurements (dictionary.py has those of a dictionary alone)


def feature_summary(tables):
    """Mean L0 (active features per token), dead fraction and entropies of analysis tables."""
    return dict(l0=tables['freq'].sum().item(), dead_fraction=tables['dead'].float().mean().item(),
                token_entropy=mean_over_firing(tables['h_tok']), semantic_entropy=mean_over_firing(tables['h_sem']))


def steering_result(model, tokens, layers, words, top_m):
    """steer.py's concept search and strength sweep over `layers` of model, with its defaults
    (sweep.py's steer_concept)."""
    best, base, _, kept = steer_concept(model, tokens, words, layers, top_m=top_m)
    return dict(layer=best['layer'], feature=best['neuron'], signals=best['signals'], scale=kept['scale'],
                baseline_hit_rate=base['hit_rate'], steered_hit_rate=kept['hit_rate'],
                baseline_ppl=base['ppl'], steered_ppl=kept['ppl'])


def plot_routes(path, result):
    """Mean token and semantic entropy of each route's features against its CE cost over the dense twin."""
    routes = result['routes']
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ('token_entropy', 'semantic_entropy'), ('token entropy', 'semantic entropy')):
        for i, (name, r) in enumerate(routes.items()):
            ys = [v[key] for v in r['layers'].values() if v[key] is not None]
            ax.scatter([r['ce_cost']] * len(ys), ys, color=f'C{i}', alpha=0.4, s=15)
            ax.scatter([r['ce_cost']], [np.mean(ys)], color=f'C{i}', s=90, marker='D', label=name)
        ax.set_xlabel('CE cost over the dense twin (nats; post-hoc: all sites spliced)')
        ax.set_ylabel(f'mean {title} per feature (bits)')
        ax.set_title(f'{title}: layers (dots), mean (diamond)')
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=80))
    plt.close(fig)


def snapshot_near(run, fraction):
    """(iter, path) of the run's checkpoint nearest `fraction` of its training."""
    points = run_checkpoints(run)
    return min(points, key=lambda p: abs(p[0] - fraction * points[-1][0]))


def obtain_dictionaries(checkpoints, sites, wanted, k, settings, folder, main_seed, retrain, dev):
    """Every wanted (kind, init seed, checkpoint name) dictionary at every site, from its file in
    folder when one was trained with the same settings on the same checkpoint file (its size and
    modification time), else (or with retrain) trained, one pass per checkpoint, and
    saved. checkpoints: {name: (iter, path)}. Returns {(kind, seed, name, layer): coder} and
    {(kind, seed, name): training info}."""
    coders, training = {}, {}
    for name, (it, source) in checkpoints.items():
        expected = dict(settings, k=k, source_iter=it, source_stamp=file_stamp(source))
        path = lambda kd, s, l: os.path.join(folder, f"{kd}_layer{l}" + (f"_seed{s}" if s != main_seed else "") +
                                             (f"_iter{it}" if name != 'final' else "") + ".pt")
        todo = []
        for kd, s in sorted({(kd, s) for kd, s, n in wanted if n == name}):
            for l in sites:
                if os.path.exists(path(kd, s, l)) and not retrain:
                    coder, meta = load_dictionary(path(kd, s, l), dev)
                    if {key: meta.get(key) for key in expected} == expected and meta['init_seed'] == s:
                        coders[kd, s, name, l], training[kd, s, name] = coder, meta['training']
                        continue
                    print(f"{path(kd, s, l)} was trained with other settings: training it again")
                todo.append((kd, s))
        todo = sorted(set(todo))
        if not todo:
            continue
        model, ckpt = load_model(source, dev)
        cpu_fast_paths(model)
        train = sparsify_train.train_dictionaries if settings['trainer'] == 'sparsify' else train_dictionaries
        trained, seconds, tokens = train(model, sites, todo, ckpt['config']['data_dir'], k, settings,
                                                      f"{' + '.join(f'{kd} seed {s}' for kd, s in todo)}, iter {it}")
        for (kd, s, l), coder in trained.items():
            info = dict(tokens=tokens, seconds=seconds[kd, s], dictionaries=len(sites))
            meta = dict(expected, kind=kd, layer=l, d_in=coder.decoder.weight.size(0), model_args=model_shape(model),
                        n_latents=coder.decoder.weight.size(1), init_seed=s, source=source, training=info)
            save_dictionary(path(kd, s, l), coder, meta)
            coders[kd, s, name, l], training[kd, s, name] = coder, info
    return coders, training


# -----------------------------------------------------------------------------
# the command line: main() and its steps, which read the flags above


def checked_flags():
    if not compare:
        die("give --compare=OUT_DIR of the TopK run whose budget and sites the dictionaries share")
    if trainer not in ('sparsify', 'own'):
        die(f"--trainer must be sparsify or own, got {trainer!r}")
    if trainer == 'sparsify' and sparsify_train is None:
        die(f"--trainer=sparsify needs EleutherAI sparsify and transformers (no module {missing!r}): "
            "pip install -r toolkit/requirements-interop.txt, or give --trainer=own")
    if kind not in ('sae', 'transcoder', 'both'):
        die(f"--kind must be sae, transcoder or both, got {kind!r}")
    at_least(1, n_tokens=n_tokens, batch_size=batch_size, dead_tokens=dead_tokens, eval_tokens=eval_tokens,
             top_m=top_m, n_clusters=n_clusters)
    if lr < 0:
        die(f"--lr must be >= 0 (0: the rule), got {lr}")
    if not 0 < early < 1:
        die(f"--early must be in (0, 1), got {early}")


def load_twins(dev):
    """The dense run and the TopK run, checked to be twins, and the sites: the TopK run's sparse
    layers (or --layer alone)."""
    dense, dense_ckpt = load_model(out_dir, dev)
    topk_model, topk_ckpt = load_model(compare, dev)
    cpu_fast_paths(dense)
    cpu_fast_paths(topk_model)
    cfg = topk_model.config
    if dense.config.topk or not cfg.topk:
        die(f"--out_dir must be a dense run (topk = 0) and --compare a TopK run; their topk are "
            f"{dense.config.topk} and {cfg.topk}")
    differ = [k for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')
              if getattr(cfg, k) != getattr(dense.config, k)]
    if differ:
        die(f"--compare={compare} and --out_dir={out_dir} are not twins: they differ in {', '.join(differ)}")
    sites = topk_layers(cfg.n_layer, cfg.topk, cfg.n_nontopk)
    if layer != -1:
        if layer not in sites:
            die(f"--layer must be one of the TopK run's sparse layers {sites}, got {layer}")
        sites = [layer]
    return (dense, dense_ckpt), (topk_model, topk_ckpt), sites


def planned(kinds, dense_ckpt, topk_ckpt):
    """The checkpoints the dictionaries read ({name: (iter, path)}) and the dictionaries wanted:
    each kind at the final checkpoint, and with --stability an SAE of a second seed and one of
    the earlier checkpoint."""
    wanted = [(kd, seed, 'final') for kd in kinds]
    checkpoints = {'final': (dense_ckpt['iter_num'], os.path.join(out_dir, 'ckpt.pt'))}
    if stability and 'sae' in kinds:
        wanted += [('sae', seed + 1, 'final'), ('sae', seed, 'early')]
    if stability:
        checkpoints['early'] = snapshot_near(out_dir, early)
        if checkpoints['early'][0] == dense_ckpt['iter_num'] or snapshot_near(compare, early)[0] == topk_ckpt['iter_num']:
            die(f"--stability needs an earlier checkpoint (a ckpt_*.pt near {early:g} of training) in both "
                f"{out_dir} and {compare}: train with --ckpt_interval, or give --stability=False")
    return checkpoints, wanted


def route_results(dense, topk_model, coders, training, tokens, ce_dense, ce_topk, tables_of):
    """CE cost, FVU and feature numbers per route and site: ({route: summary}, {'topk' or kind: tables})."""
    route_tables = {'topk': tables_of(topk_model)}
    out = {'TopK LM neurons': dict(ce_cost=ce_topk - ce_dense, layers={
               l: feature_summary(t) for l, t in route_tables['topk'].items()}),
           'dense twin neurons': dict(ce_cost=0.0, layers={l: feature_summary(t) for l, t in tables_of(dense).items()})}
    for kd, group in coders.items():
        costs, fvu = splice_costs(dense, group, tokens, ce_dense), reconstruction(dense, group, tokens)
        route_tables[kd] = tables_of(dense, group)
        out[f'dense + {kd}'] = dict(ce_cost=costs['all']['ce'] - ce_dense, all_sites=costs['all'], training=training[kd],
                                    layers={l: dict(feature_summary(route_tables[kd][l]), fvu=fvu[l], **costs[l])
                                            for l in group})
    return out, route_tables


def stability_of(sae_final, sae_other_seed, sae_early, checkpoints, topk_model, topk_ckpt, route_tables, tables_of, dev):
    """Is it the same dictionary again? SAEs of two seeds, and of two checkpoints, matched one to
    one; the TopK LM's neurons at two checkpoints, neuron j against neuron j."""
    sites, cfg = list(sae_final), topk_model.config
    rebuild = sparsify_train.initial_coders if trainer == 'sparsify' else initial_coders
    # on dev: sparsify draws its starting coders on the device it trains on
    initial = rebuild(cfg.n_embd, sae_final[sites[0]].encoder.out_features, cfg.topk, 'sae', seed, sites, dev)
    early_iter, early_path = checkpoints['early']
    early_tables = tables_of(cpu_fast_paths(load_model(early_path, dev)[0]), sae_early)
    topk_early_iter, topk_early_path = snapshot_near(compare, early)
    topk_early = cpu_fast_paths(load_model(topk_early_path, dev)[0])
    topk_tables, topk_early_tables, sae_tables = route_tables['topk'], tables_of(topk_early), route_tables['sae']
    c = dict(dense_iters=[early_iter, checkpoints['final'][0]], topk_iters=[topk_early_iter, topk_ckpt['iter_num']],
             sae={}, topk={})
    for l in sites:
        shared, partner = shared_fraction(sae_early[l].decoder.weight, sae_final[l].decoder.weight)
        c['sae'][l] = dict(shared=shared, top_token_overlap=top_token_overlap(
            early_tables[l]['top_ids'], sae_tables[l]['top_ids'], partner))
        before, after = (m.transformer.h[l].mlp.c_proj.weight for m in (topk_early, topk_model))
        same = np.arange(before.size(1))  # neuron j is neuron j: no matching
        c['topk'][l] = dict(shared=(F.cosine_similarity(before, after, dim=0) > 0.7).float().mean().item(),
                            top_token_overlap=top_token_overlap(topk_early_tables[l]['top_ids'],
                                                                topk_tables[l]['top_ids'], same))
    return dict(seeds={l: shared_fraction(sae_final[l].decoder.weight, sae_other_seed[l].decoder.weight)[0] for l in sites},
                near_initialisation={l: near_initialisation(sae_final[l], initial[l]) for l in sites}, checkpoints=c)


def steering_of(dense, topk_model, coders, tokens, sites):
    """The concept steered with each route's features: TopK neurons, dense neurons, each dictionary's latents."""
    words = concept_words(concept)
    out = {'concept': concept, 'TopK LM neurons': steering_result(topk_model, tokens, sites, words, top_m),
           'dense twin neurons': steering_result(dense, tokens, sites, words, top_m)}
    for kd, group in coders.items():
        with attached(dense, group):
            out[f'dense + {kd}'] = steering_result(dense, tokens, sites, words, top_m)
    return out


def main():
    configure(globals())
    checked_flags()
    dev = resolve_device(device)
    (dense, dense_ckpt), (topk_model, topk_ckpt), sites = load_twins(dev)
    cfg = topk_model.config
    kinds = ['sae', 'transcoder'] if kind == 'both' else [kind]
    checkpoints, wanted = planned(kinds, dense_ckpt, topk_ckpt)
    settings = dict(trainer=trainer, n_tokens=n_tokens, batch_size=batch_size, lr=lr, seed=seed,
                    **(dict(aux_coef=aux_coef, dead_tokens=dead_tokens) if trainer == 'own' else {}))
    folder = os.path.join(out_dir, 'sae')
    coders, training = obtain_dictionaries(checkpoints, sites, wanted, cfg.topk, settings, folder, seed, retrain, dev)
    group = lambda kd, name='final', s=seed: {l: coders[kd, s, name, l] for l in sites}  # one coder per site
    final = {kd: group(kd) for kd in kinds}

    tokens = run_eval_tokens('', dense_ckpt, eval_tokens, cfg.block_size)
    cluster_of = semantic_clusters(topk_ckpt['model']['transformer.wte.weight'], tokens, n_clusters, 1337)  # as entropy.py

    def tables_of(model, attach=None):
        with attached(model, attach or {}):
            return analyse(model, tokens, sites, top_m, cluster_of)[1]

    ce_dense, ce_topk = mean_ce(dense, tokens), mean_ce(topk_model, tokens)
    result = dict(eval_tokens=tokens.numel(), sites=sites, k=cfg.topk, n_latents=4 * cfg.n_embd,
                  dense=dict(ce=ce_dense, ppl=math.exp(ce_dense)), topk=dict(ce=ce_topk, ppl=math.exp(ce_topk)),
                  routes={}, stability={}, steering={})
    result['routes'], route_tables = route_results(dense, topk_model, final,
                                                   {kd: training[kd, seed, 'final'] for kd in kinds}, tokens,
                                                   ce_dense, ce_topk, tables_of)
    if stability and 'sae' in kinds:
        result['stability'] = stability_of(final['sae'], group('sae', s=seed + 1), group('sae', 'early'), checkpoints,
                                           topk_model, topk_ckpt, route_tables, tables_of, dev)
    if concept:
        result['steering'] = steering_of(dense, topk_model, final, tokens, sites)
    report(result)
    atomic_write(os.path.join(folder, 'comparison.json'), lambda f: f.write(json.dumps(result, indent=1).encode()))
    plot_routes(os.path.join(folder, 'comparison.png'), result)
    print(f"wrote {folder}/comparison.json and comparison.png")


def report(result):
    f = lambda v, p=3: '-' if v is None else f"{v:.{p}f}"
    print(f"\n{result['eval_tokens']:,} evaluation tokens; dictionaries of {result['n_latents']} latents, k = {result['k']}, "
          f"at layers {result['sites']}")
    print(f"dense twin: CE {f(result['dense']['ce'])} (ppl {f(result['dense']['ppl'], 2)}); "
          f"TopK LM: CE {f(result['topk']['ce'])} (ppl {f(result['topk']['ppl'], 2)})")
    print(f"{'route':<22}{'layer':>6}{'CE':>8}{'ppl':>8}{'recov.':>8}{'FVU':>7}{'L0':>7}{'dead':>7}{'H_tok':>7}{'H_sem':>7}")
    for name, r in result['routes'].items():
        for l, v in r['layers'].items():
            print(f"{name:<22}{l:>6}{f(v.get('ce')):>8}{f(v.get('ppl'), 2):>8}{f(v.get('loss_recovered')):>8}"
                  f"{f(v.get('fvu')):>7}{f(v['l0'], 1):>7}{f(v['dead_fraction'], 2):>7}{f(v['token_entropy'], 2):>7}"
                  f"{f(v['semantic_entropy'], 2):>7}")
        if 'all_sites' in r:
            a = r['all_sites']
            print(f"{name:<22}{'all':>6}{f(a['ce']):>8}{f(a['ppl'], 2):>8}{f(a['loss_recovered']):>8}   "
                  f"(training: {r['training']['tokens']:,} extra tokens, {r['training']['seconds']:.0f} s for "
                  f"its {r['training']['dictionaries']} dictionaries)")
    s = result['stability']
    if s:
        print("shared across seeds (SAE, cosine > 0.7 after matching): " +
              ", ".join(f"layer {l} {f(v, 2)}" for l, v in s['seeds'].items()))
        print("SAE latents still within cosine 0.7 of their initial direction: " +
              ", ".join(f"layer {l} {f(v, 2)}" for l, v in s['near_initialisation'].items()))
        c = s['checkpoints']
        print(f"shared across checkpoints (dense iter {c['dense_iters'][0]} -> {c['dense_iters'][1]}, SAE matched; "
              f"TopK iter {c['topk_iters'][0]} -> {c['topk_iters'][1]}, neuron j = neuron j):")
        for l in c['sae']:
            print(f"  layer {l}: SAE {f(c['sae'][l]['shared'], 2)} (top-token overlap {f(c['sae'][l]['top_token_overlap'], 2)}), "
                  f"TopK {f(c['topk'][l]['shared'], 2)} (top-token overlap {f(c['topk'][l]['top_token_overlap'], 2)})")
    for name, v in result['steering'].items():
        if name != 'concept':
            print(f"steering '{result['steering']['concept']}' with {name}: " + (
                  f"{v['layer']}:{v['feature']} ({'+'.join(v['signals'])}), scale {v['scale']:g}, hit rate "
                  f"{f(v['baseline_hit_rate'], 2)} -> {f(v['steered_hit_rate'], 2)}, ppl {f(v['baseline_ppl'], 2)} -> "
                  f"{f(v['steered_ppl'], 2)}"))


if __name__ == '__main__':
    main()
