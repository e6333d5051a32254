"""
The paper's ablations, with error bars over seeds, on one short real-English configuration:

    python -m toolkit.ablate                    # 8 arms x 3 seeds of config/train_real_cpu.py at 160 steps
    python -m toolkit.ablate --arms=dense,k16 --seeds=1337,1338
    python -m toolkit.ablate --n_layer=8 --arms=nontopk0,nontopk2,nontopk2-lr0.5,nontopk2-lr2

Every arm x seed is a train.py run into OUT_DIR/ARM-sSEED (kept: a second call trains only what is
missing), evaluated here on the same validation tokens. Its evaluation.json and train.log are all
the tables need: kept without the checkpoints, they rebuild the tables as they were. Within a seed every arm sees the same
training tokens, since train.py's batches follow from (seed, iteration). The arms (ARMS) change one
thing each against k16, the TopK LM of k 16 (of 512 in the default configuration), n_nontopk 1 and
linear annealing, set by flags whatever the configuration says: the dense twin, n_nontopk 0 and 2,
k 8 and 32, and cosine and step annealing. An arm's name followed by -lrF (nontopk2-lr0.5) is that
arm with the configuration's learning rate and min_lr times F, so that a verdict can be checked
against the learning rate; --n_layer sets the depth of every arm.

Per run: validation perplexity over eval_tokens, and for every block the mean token and semantic
entropy of its neurons that fire and its dead fraction (analysis.py has the definitions). The
table gives mean ± standard deviation over seeds of the perplexity and of the mean token entropy
over the arm's TopK layers (the dense twin: over k16's TopK layers), and says for each of the
paper's claims whether it holds here, is reversed, or lies inside the noise: a difference within
2 standard errors, the errors from the per-seed (paired) differences. Three more tables say why an
arm differs: per layer the token entropy and dead fraction; the loss by how frequent the target
token is in the train shards; and the training loss as it went (a gap that opens early and closes
is a matter of speed, one that stays is not). Writes OUT_DIR/ablation.json, ablation.md (the
tables, also printed) and ablation.png (perplexity against mean token entropy).
"""
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch

from configurator import configure, die, read_config
from model import topk_layers
from toolkit.analysis import analyse, mean_over_firing, semantic_clusters
from toolkit.common import load_checkpoint, load_model
from toolkit.cpu_fast import enable as cpu_fast_paths
from toolkit.data import atomic_write, file_stamp, read_shard, shard_paths
from toolkit.dictionary import token_losses
from toolkit.neurons import load_eval_tokens

# -----------------------------------------------------------------------------
out_dir = 'out-ablate'  # one folder per run, and the table and plot
config = 'config/train_real_cpu.py'  # the configuration every arm starts from
max_iters = 160  # steps per run (RESULTS.md gives the CPU time of a study)
warmup_iters = 20
seeds = '1337,1338,1339'
arms = 'all'  # comma-separated names of ARMS (each may end in -lrF: learning rate times F), or 'all'
n_layer = 0  # blocks in every arm; 0 keeps the configuration's
jobs = 2  # runs at a time, one thread each
eval_tokens = 131072  # validation tokens for the perplexity
entropy_tokens = 32768  # of them, the ones the entropies are measured on (entropy.py's default)
top_m = 32  # top-activating positions per neuron
n_clusters = 64  # k-means clusters for semantic entropy
# -----------------------------------------------------------------------------

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'train.py')  # the repository's root
ARMS = {  # name: (train.py flags beyond the configuration's, what it tests)
    'dense': (['--topk=0'], 'the dense twin'),
    'k16': ([], 'the TopK LM: k 16, n_nontopk 1, linear annealing'),
    'nontopk0': (['--n_nontopk=0'], 'every block TopK'),
    'nontopk2': (['--n_nontopk=2'], 'two dense blocks at the end'),
    'k8': (['--topk=8'], 'half the k'),
    'k32': (['--topk=32'], 'double the k'),
    'cosine': (['--annealing_schedule=cosine'], 'cosine annealing'),
    'step': (['--annealing_schedule=step'], 'TopK from the first step'),
}
# target tokens by their frequency rank in the train shards: where in the vocabulary the loss differs
RANKS = ((0, 100), (100, 1000), (1000, 10000), (10000, None))
# (claim, arm a, arm b, measure, the sign of a - b that the claim predicts)
CLAIMS = [
    ("annealing from dense trains better than switching TopK on at once", 'k16', 'step', 'ppl', -1),
    ("a dense tail of n_nontopk = 2 beats none", 'nontopk2', 'nontopk0', 'ppl', -1),
    ("lower k costs perplexity (k 8 against k 16)", 'k8', 'k16', 'ppl', +1),
    ("lower k gives more specific neurons (k 8 against k 16)", 'k8', 'k16', 'entropy', -1),
    ("higher k gives better perplexity (k 32 against k 16)", 'k32', 'k16', 'ppl', -1),
    ("higher k gives less specific neurons (k 32 against k 16)", 'k32', 'k16', 'entropy', +1),
    ("a TopK LM costs perplexity against its dense twin", 'k16', 'dense', 'ppl', +1),
    ("cosine annealing against linear (the paper leaves it open)", 'cosine', 'k16', 'ppl', 0),
]


def parse_arm(name):
    """(name in ARMS, learning-rate factor) of an arm's name: 'nontopk2-lr0.5' is (nontopk2, 0.5)."""
    m = re.fullmatch(r'(.+)-lr(\d+(?:\.\d+)?)', name)
    base, factor = (m[1], float(m[2])) if m else (name, 1.0)
    if base not in ARMS or factor <= 0:
        die(f"--arms: unknown arm {name!r} (the arms: {', '.join(ARMS)}, each may end in -lrF with F > 0)")
    return base, factor


def describe(arm):
    base, factor = parse_arm(arm)
    return ARMS[base][1] + (f', learning rate x{factor:g}' if factor != 1 else '')


def arm_flags(arm, seed):
    """train.py's flags beyond the configuration file for one arm and seed; k16's settings first, so
    that every arm differs from it in its own flags alone, whatever the file says."""
    base, factor = parse_arm(arm)
    flags = [f'--seed={seed}', f'--max_iters={max_iters}', f'--lr_decay_iters={max_iters}',
             f'--warmup_iters={warmup_iters}', '--topk=16', '--n_nontopk=1', '--annealing_schedule=linear']
    if n_layer:
        flags.append(f'--n_layer={n_layer}')
    if factor != 1:  # min_lr scales too, so that the schedule keeps its shape
        file = read_config(config)
        flags += [f"--learning_rate={file['learning_rate'] * factor!r}", f"--min_lr={file['min_lr'] * factor!r}"]
    return flags + ARMS[base][0]


def trained(arm, seed, run):
    """Whether run holds a finished run of this arm and seed: its ckpt.pt, or without it the record
    its evaluation left (evaluation.json, with train.log: all the tables need, so that a study's
    records can be kept and its tables rebuilt without the checkpoints). A run that stopped early is
    trained again; one made with other flags is refused, not replaced (the configuration file's own
    values are not compared)."""
    path, record = os.path.join(run, 'ckpt.pt'), os.path.join(run, 'evaluation.json')
    if os.path.isfile(path):
        ckpt = load_checkpoint(path)
        config, iters = ckpt['config'], ckpt['iter_num']
    elif os.path.isfile(record):
        with open(record) as f:
            kept = json.load(f)
        if 'config' not in kept:  # a record older than the records that stand for their run
            return False
        config, iters = kept['config'], kept['iter_num']
    else:
        return False
    wanted = dict(f[2:].split('=', 1) for f in arm_flags(arm, seed))  # later flags win, as in train.py
    for k, v in wanted.items():
        if str(config.get(k)) != v:
            die(f"{run} holds a run with {k}={config.get(k)}, not the {v} of arm {arm}, seed {seed}: "
                "give another --out_dir, or remove that run")
    return iters == max_iters


def train(arm, seed, run):
    """train.py for one arm and seed, one thread, its output in run/train.log."""
    flags = [config, *arm_flags(arm, seed), f'--out_dir={run}', f'--eval_interval={max_iters}', '--ckpt_interval=0',
             '--overwrite=True']
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, 'train.log'), 'w') as log:
        done = subprocess.run([sys.executable, TRAIN_PY, *flags], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if done.returncode != 0:
        die(f"train.py failed for arm {arm}, seed {seed}: see {run}/train.log")


def frequency_rank(data):
    """Every token id's rank by its count in the train shards (0 = the most frequent)."""
    counts = sum(np.bincount(read_shard(p), minlength=2**16) for p in shard_paths(data, 'train'))
    rank = np.empty(len(counts), dtype=np.int64)
    rank[np.argsort(-counts, kind='stable')] = np.arange(len(counts))
    return torch.from_numpy(rank)


def evaluate(run):
    """The run's numbers, cached in run/evaluation.json against its ckpt.pt (size, time); without a
    ckpt.pt, the record there stands for the run if it was made with these settings."""
    path, ckpt_path = os.path.join(run, 'evaluation.json'), os.path.join(run, 'ckpt.pt')
    settings = dict(eval_tokens=eval_tokens, entropy_tokens=entropy_tokens, top_m=top_m, n_clusters=n_clusters)
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get('settings') == settings and (not os.path.isfile(ckpt_path) or cached.get('stamp') == file_stamp(ckpt_path)):
            return cached
        if not os.path.isfile(ckpt_path):
            die(f"{run}/evaluation.json was made with {cached.get('settings')}, not {settings}, and without "
                f"{run}/ckpt.pt it cannot be made again: give those settings, or remove {run} to train it again")
    model, ckpt = load_model(run)
    cpu_fast_paths(model)
    data, block = ckpt['config']['data_dir'], model.config.block_size
    rows = load_eval_tokens(data, eval_tokens, block + 1)
    losses, rank = token_losses(model, rows), frequency_rank(data)[rows[:, 1:].flatten()]
    ce = losses.mean().item()
    by_rank = {}
    for lo, hi in RANKS:
        where = (rank >= lo) & (rank < hi) if hi else rank >= lo
        by_rank[f"{lo}-{hi - 1 if hi else ''}"] = [losses[where].mean().item(), where.float().mean().item()]  # CE, share
    tokens = load_eval_tokens(data, entropy_tokens, block)
    cluster_of = semantic_clusters(model.transformer.wte.weight.detach(), tokens, n_clusters, 1337)
    layers = list(range(model.config.n_layer))
    _, tables = analyse(model, tokens, layers, top_m, cluster_of)
    result = dict(stamp=file_stamp(ckpt_path), settings=settings, config=ckpt['config'], iter_num=ckpt['iter_num'],
                  val_loss=ce, ppl=math.exp(ce), ce_by_rank=by_rank,
                  topk_layers=topk_layers(model.config.n_layer, model.config.topk, model.config.n_nontopk),
                  layers=[dict(token_entropy=mean_over_firing(t['h_tok']), semantic_entropy=mean_over_firing(t['h_sem']),
                               dead_fraction=t['dead'].float().mean().item()) for t in tables.values()])
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=1).encode()))
    return result


def logged_losses(run):
    """{iteration: loss} of the batches train.py logged in run/train.log ({} without one). One batch
    each, so noisy, but within a seed every arm logs the same batches: differences are paired."""
    path = os.path.join(run, 'train.log')
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {int(m[1]): float(m[2]) for m in re.finditer(r'^iter (\d+): loss ([\d.]+)', f.read(), re.M)}


def one_run(arm, seed):
    run = os.path.join(out_dir, f'{arm}-s{seed}')
    if not trained(arm, seed, run):
        train(arm, seed, run)
    result = {**evaluate(run), 'train_loss': logged_losses(run)}
    print(f"{arm} seed {seed}: val ppl {result['ppl']:.2f}", flush=True)
    return result


def token_entropy(layer):
    """A layer's mean token entropy over its neurons that fire; nan if none fires (JSON null)."""
    return math.nan if layer['token_entropy'] is None else layer['token_entropy']


def entropy_of(result, layers):
    return float(np.nanmean([token_entropy(result['layers'][l]) for l in layers]))


def summarise(results, names, seed_list):
    """{arm: {measure: [per seed]}}: ppl, entropy over the arm's TopK layers (dense: k16's) and
    entropy_shared over the layers TopK in every arm (all but the last 2)."""
    n_layer = len(next(iter(results.values()))['layers'])
    default_layers, shared = topk_layers(n_layer, 1, 1), topk_layers(n_layer, 1, 2)
    return {arm: {'ppl': [results[arm, s]['ppl'] for s in seed_list],
                  'entropy': [entropy_of(results[arm, s], results[arm, s]['topk_layers'] or default_layers) for s in seed_list],
                  'entropy_shared': [entropy_of(results[arm, s], shared) for s in seed_list],
                  'layers': [results[arm, s]['layers'] for s in seed_list],
                  'ce_by_rank': [results[arm, s]['ce_by_rank'] for s in seed_list],
                  'train_loss': [results[arm, s]['train_loss'] for s in seed_list],
                  'topk_layers': results[arm, seed_list[0]]['topk_layers']}
            for arm in names}


def verdict(a, b, sign):
    """(mean of a - b, its standard error, what it says) from paired per-seed values."""
    d = np.array(a) - np.array(b)
    mean, se = d.mean(), d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float('nan')
    if not abs(mean) >= 2 * se:  # also when se is nan (one seed): no evidence either way
        return mean, se, 'inside the noise'
    if sign == 0:
        return mean, se, 'lower' if mean < 0 else 'higher'
    return mean, se, 'holds' if np.sign(mean) == sign else 'reversed'


def table(summary, seed_list):
    lines = ["| arm | what it changes | val perplexity | mean token entropy (bits), the arm's TopK layers "
             "| the same, layers TopK in every arm |", "| --- | --- | --- | --- | --- |"]
    pm = lambda v, f: f"{np.mean(v):{f}} ± {np.std(v, ddof=1):{f}}"
    for arm, s in summary.items():
        lines.append(f"| {arm} | {describe(arm)} | {pm(s['ppl'], '.2f')} | {pm(s['entropy'], '.3f')} | "
                     f"{pm(s['entropy_shared'], '.3f')} |")
    lines += ["", f"mean ± standard deviation over {len(seed_list)} seeds ({', '.join(map(str, seed_list))})", "",
              "| claim | a − b | difference (± 1 s.e.) | verdict |", "| --- | --- | --- | --- |"]
    for claim, a, b, measure, sign in CLAIMS:
        if a in summary and b in summary:
            mean, se, says = verdict(summary[a][measure], summary[b][measure], sign)
            lines.append(f"| {claim} | {measure} {a} − {b} | {mean:+.3f} ± {se:.3f} | {says} |")
    first = next(iter(summary))
    n_layer, shares = len(summary[first]['layers'][0]), summary[first]['ce_by_rank'][0]
    lines += ["", "Per layer, mean over seeds: token entropy of the neurons that fire (bits) and, in brackets, "
              "the dead fraction; * marks a TopK layer", "",
              "| arm | " + " | ".join(f"layer {l}" for l in range(n_layer)) + " |", "| --- |" + " --- |" * n_layer]
    for arm, s in summary.items():
        cells = [f"{np.mean([token_entropy(r[l]) for r in s['layers']]):.2f} "
                 f"({np.mean([r[l]['dead_fraction'] for r in s['layers']]):.2f}){'*' if l in s['topk_layers'] else ''}"
                 for l in range(n_layer)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Where the loss differs: mean validation CE (nats) by the target token's frequency rank in the "
              "train shards, mean over seeds (the share of positions under each rank range)", "",
              "| arm | " + " | ".join(f"ranks {b} ({share:.0%})" for b, (_, share) in shares.items()) + " | all |",
              "| --- |" + " --- |" * (len(shares) + 1)]
    for arm, s in summary.items():
        lines.append(f"| {arm} | " + " | ".join(f"{np.mean([r[b][0] for r in s['ce_by_rank']]):.3f}" for b in shares)
                     + f" | {np.mean(np.log(s['ppl'])):.3f} |")
    fifths = [(max_iters * i // 5 + 1, max_iters * (i + 1) // 5) for i in range(5)]
    lines += ["", "The training loss as it went: the mean of the batch losses train.py logged in each fifth of "
              "the run, mean over seeds (within a seed every arm logs the same batches)", "",
              "| arm | " + " | ".join(f"iterations {lo}-{hi}" for lo, hi in fifths) + " |", "| --- |" + " --- |" * 5]
    within = lambda log, lo, hi: np.mean([v for it, v in log.items() if lo <= it <= hi] or [math.nan])
    for arm, s in summary.items():
        cells = [np.mean([within(log, lo, hi) for log in s['train_loss']]) for lo, hi in fifths]
        lines.append(f"| {arm} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path, summary):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm, s in summary.items():
        ax.errorbar(np.mean(s['entropy']), np.mean(s['ppl']), xerr=np.std(s['entropy'], ddof=1),
                    yerr=np.std(s['ppl'], ddof=1), fmt='o', capsize=3, label=arm)
        ax.annotate(arm, (np.mean(s['entropy']), np.mean(s['ppl'])), textcoords='offset points', xytext=(5, 4), fontsize=8)
    ax.set_xlabel('mean token entropy over the TopK layers (bits)')
    ax.set_ylabel('validation perplexity')
    ax.set_title('ablations: mean ± s.d. over seeds')
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=90))
    plt.close(fig)


def main():
    configure(globals())
    names = list(ARMS) if arms == 'all' else arms.split(',')
    for name in names:
        parse_arm(name)
    try:
        seed_list = [int(s) for s in seeds.split(',')]
    except ValueError:
        die(f"--seeds must be comma-separated integers, got {seeds!r}")
    if jobs < 1 or max_iters < 1 or n_layer < 0:
        die(f"--jobs and --max_iters must be positive and --n_layer at least 0, got {jobs}, {max_iters} and {n_layer}")
    if not os.path.isfile(config):
        die(f"--config={config} not found")
    if any(parse_arm(a)[1] != 1 for a in names) and not {'learning_rate', 'min_lr'} <= set(read_config(config)):
        die(f"--config={config} must set learning_rate and min_lr for an arm ending in -lrF")
    torch.set_num_threads(1)  # the evaluations run beside the training runs
    os.makedirs(out_dir, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {(a, s): pool.submit(one_run, a, s) for s in seed_list for a in names}
        for done in concurrent.futures.as_completed(futures.values()):
            if done.exception() is not None:  # say so now, not after the runs still queued
                pool.shutdown(cancel_futures=True)
                done.result()
        results = {key: f.result() for key, f in futures.items()}
    summary = summarise(results, names, seed_list)
    text = table(summary, seed_list)
    atomic_write(os.path.join(out_dir, 'ablation.md'), lambda f: f.write(text.encode()))
    atomic_write(os.path.join(out_dir, 'ablation.json'), lambda f: f.write(json.dumps(
        {f'{a}-s{s}': r for (a, s), r in results.items()}, indent=1).encode()))
    plot(os.path.join(out_dir, 'ablation.png'), summary)
    print(text + f"wrote {out_dir}/ablation.md, ablation.json, ablation.png")


if __name__ == '__main__':
    main()
