"""
A TopK LM in the browser (optional: pip install -r toolkit/requirements-explore.txt): steer text live
with a neuron or a concept named by words, read a neuron's top contexts and how it formed, and
find neurons by a token or by typed text. A local Gradio app, the Hugging Face Spaces convention.

    python -m toolkit.explore --out_dir=out-toy                  # prints http://127.0.0.1:7860
    python -m toolkit.explore --out_dir=out-toy-dense            # the dense twin, read the same way
    python -m toolkit.explore --out_dir=out-toy-dense --dictionary=out-toy-dense/sae/sae_layer0.pt
    python -m toolkit.explore --out_dir=out-toy --bench=True     # start, steering, search, suggestion times

The statistics every page reads (steer.py's and analysis.py's: top activations, firing, and the
activation mass per token id, from which any concept's reads and predicts signals follow without
another pass) are computed once per run and cached in OUT_DIR/analysis/explore_cache.pt. A
concept is searched as steer.py searches (its candidates from reads, predicts and writes, ranked
by the one-step trial); the app steers the trial's best at the strength asked for, without
steer.py's sweep; a button runs that sweep on a small sample (the page's prompt, 8 samples of 40
tokens) and offers the fluent strength it keeps, with its perplexity ratio. Steering is a forward
hook on the one shared model, so requests take turns: each gives exactly the text it gives alone.
"""
import html
import math
import os
import re
import threading
import time

import gradio as gr
import torch

from configurator import configure, die
from model import trained_alpha
from toolkit.analysis import neuron_blocks, neuron_table, semantic_clusters, top_token_ids
from toolkit.common import load_model, run_checkpoints, run_folder
from toolkit.cpu_fast import enable as cpu_fast_paths
from toolkit.data import EOT, atomic_write, decode, encode, encode_prompt, file_stamp
from toolkit.dictionary import attach_file
from toolkit.graph_page import graph_json, neuron_notes, page
from toolkit.neurons import (capture, collect, concept_stats, contexts_text, is_topk, logit_spread, parse_neuron, reads,
                             run_eval_tokens)
from toolkit.search import (TRIAL_ROWS, concept_candidates, concept_token_ids, concept_words, pick_finalists,
                            trial_strength)
from toolkit.sweep import SCALES, hit_pattern, pick_scale, steered_rows, sweep_finalists
from toolkit.pruning import prune, scores
from toolkit.trace import attribute

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run (its ckpt.pt)
host = '127.0.0.1'  # the address to serve on (0.0.0.0: every interface)
port = 7860  # the port to serve on
dictionary = ''  # an SAE or transcoder file from sae.py: its latents take the place of its layer's neurons
eval_data = ''  # val shards of this data dir, or a .txt file; '' = the run's data_dir
eval_tokens = 32768  # evaluation tokens (analysis.py's and steer.py's default)
top_m = 32  # top-activating positions kept per neuron
n_clusters = 64  # k-means clusters of the embedding, for semantic entropy
max_new_tokens_cap = 200  # the most new tokens a request may ask for
max_strength = 20.0  # the largest strength (scale of the neuron's maximum) a request may ask for
bench = False  # time start, a steering request, a concept search and a suggestion, print them, and exit
# -----------------------------------------------------------------------------


class Explorer:
    """The run, its evaluation tokens and cached statistics, and one method per page. Every use
    of the model holds the lock (a steering hook must not reach another request's forward)."""

    def __init__(self, run, dictionary_file='', data='', n_tokens=32768, m=32, clusters=64):
        self.model, self.ckpt = load_model(run, 'cpu')
        cpu_fast_paths(self.model)
        self.site = attach_file(self.model, dictionary_file) if dictionary_file else None
        n_layer = len(self.model.transformer.h)
        topk = [l for l in range(n_layer) if is_topk(self.model, l)]
        self.layers = [self.site] if self.site is not None else (topk or list(range(n_layer)))
        self.tokens = run_eval_tokens(data, self.ckpt, n_tokens, self.model.config.block_size)
        self.lock, self.concepts = threading.Lock(), {}
        folder = os.path.join(run_folder(run), 'analysis')
        stamp = file_stamp(os.path.join(run, 'ckpt.pt') if os.path.isdir(run) else run)
        key = dict(stamp=stamp, dictionary=dictionary_file and file_stamp(dictionary_file), eval_data=data,
                   n_tokens=self.tokens.numel(), top_m=m, n_clusters=clusters, holds='stats clusters history spreads')
        path = os.path.join(folder, 'explore_cache.pt' if not dictionary_file else
                            f"explore_cache_{os.path.basename(dictionary_file).removesuffix('.pt')}.pt")
        cached = torch.load(path, weights_only=True) if os.path.exists(path) else None
        self.cached = cached is not None and cached['key'] == key
        if not self.cached:
            cached = dict(key=key, stats=collect(self.model, self.tokens, self.layers, m, by_token=True),
                          clusters=semantic_clusters(self.model.transformer.wte.weight, self.tokens, clusters, 1337),
                          history=[] if dictionary_file else self.formation(run, m),
                          spreads={l: logit_spread(self.model, l) for l in self.layers})
            os.makedirs(folder, exist_ok=True)
            atomic_write(path, lambda f: torch.save(cached, f))
        self.stats, self.history, self.spreads = cached['stats'], cached['history'], cached['spreads']
        self.suggested = {}
        self.tables = {l: neuron_table(s, self.tokens, cached['clusters']) for l, s in self.stats.items()}

    def formation(self, run, m):
        """[(iter, {layer: top token ids (m, d_ff)})] at every checkpoint of the run, at its alpha."""
        out = []
        for it, path in run_checkpoints(run):
            model, ckpt = load_model(path, 'cpu')
            cpu_fast_paths(model)
            model.set_alpha(trained_alpha(ckpt))
            stats = collect(model, self.tokens, self.layers, m)
            out.append((it, {l: top_token_ids(s, self.tokens) for l, s in stats.items()}))
        return out

    # -- Steer ---------------------------------------------------------------------------------
    def target(self, text):
        """(layer, neuron, concept words or None, how it was found) from 'L:J' or words."""
        if re.fullmatch(r'\s*\d+\s*:\s*\d+\s*', text):
            l, j = parse_neuron(text.replace(' ', ''), self.model, flag='neuron')
            return l, j, None, f"neuron {l}:{j}"
        words = concept_words(text)
        if not words:
            die("give a neuron L:J or words naming a concept")
        key = tuple(sorted(w.lower() for w in words))
        if key not in self.concepts:
            ids = concept_token_ids(words)
            stats = {l: concept_stats(self.stats[l], ids) for l in self.layers}
            stats = {l: s for l, s in stats.items() if s['mark_count']['concept'] > 0}
            found = concept_candidates(self.model, stats, ids, self.tokens[:TRIAL_ROWS],
                                       trial_strength(math.nan, math.nan), 6, spreads=self.spreads) if stats else []
            if not found:
                die(f"no word of {words!r} occurs in the {self.tokens.numel():,} evaluation tokens "
                    "(start with a larger --eval_tokens, or other text with --eval_data)")
            best = pick_finalists(found, 1)[0]
            self.concepts[key] = (best['layer'], best['neuron'], '+'.join(best['signals']))
        l, j, signals = self.concepts[key]
        return l, j, words, f"neuron {l}:{j}, found by the search ({signals})"

    def steer(self, prompt, target, strength, n_tokens, seed):
        """Baseline and steered continuations of prompt from the same seed, sampled as one batch,
        with perplexities under the unsteered model: dict(baseline, steered, baseline_ppl,
        steered_ppl, neuron, value, found, words)."""
        strength, n_tokens, seed = number(strength, 'strength'), number(n_tokens, 'new tokens'), number(seed, 'seed')
        if not 0 <= strength <= max_strength:
            die(f"strength must be between 0 and {max_strength:g}, got {strength:g}")
        if not 1 <= n_tokens <= max_new_tokens_cap or n_tokens != int(n_tokens):
            die(f"new tokens must be a whole number from 1 to {max_new_tokens_cap}, got {n_tokens:g}")
        ids = self.prompt_ids(prompt)
        with self.lock:
            t, words, found = self.neuron_target(target)
            settings = dict(num_samples=1, max_new_tokens=int(n_tokens), temperature=0.8, top_k=200, seed=int(seed))
            base, steered = steered_rows(self.model, [(None, None), (t, strength)], [ids], None, settings)
        return dict(baseline=base['texts'][0][0], steered=steered['texts'][0][0], baseline_ppl=base['ppl'],
                    steered_ppl=steered['ppl'], neuron=f"{t['layer']}:{t['neuron']}", value=steered['value'],
                    found=found, words=words)

    def fluent_strength(self, prompt, target, seed):
        """steer.py's sweep for the target on a small sample (8 continuations of 40 tokens of the
        prompt, doubling past the grid up to --max_strength): the strength it keeps (the best hit rate
        within 2x the baseline perplexity; for a neuron, the strongest) as dict(scale, ratio,
        hit_rate, baseline_hit_rate, neuron)."""
        ids, seed = self.prompt_ids(prompt), int(number(seed, 'seed'))
        with self.lock:
            t, words, _ = self.neuron_target(target)
            key = (t['layer'], t['neuron'], tuple(words or ()), tuple(ids), seed)
            if key not in self.suggested:
                settings = dict(num_samples=8, max_new_tokens=40, temperature=0.8, top_k=200, seed=seed)
                base, (sweep,) = sweep_finalists(self.model, [t], list(SCALES), [ids], words and hit_pattern(words),
                                                 settings, refine=2, full_sweep=False, max_scale=max_strength)
                kept = pick_scale(sweep, base['ppl'])
                self.suggested[key] = dict(scale=kept['scale'], ratio=kept['ppl'] / base['ppl'],
                                           hit_rate=kept['hit_rate'], baseline_hit_rate=base['hit_rate'],
                                           neuron=f"{t['layer']}:{t['neuron']}")
        return self.suggested[key]

    def prompt_ids(self, prompt):
        ids = encode_prompt(prompt or '', flag='prompt')
        if len(ids) >= self.model.config.block_size:
            die(f"the prompt is {len(ids)} tokens; the context holds {self.model.config.block_size}")
        return ids

    def neuron_target(self, text):
        """(dict(layer, neuron, peak), concept words or None, how it was found) of target()."""
        l, j, words, found = self.target(text or '')
        peak = self.stats[l]['values'][0, j].item()
        if peak <= 0:
            die(f"neuron {l}:{j} never fires on the evaluation tokens, so it has no maximum to scale")
        return dict(layer=l, neuron=j, peak=peak), words, found

    # -- Neuron --------------------------------------------------------------------------------
    def neuron(self, spec):
        """HTML of neuron L:J: its top contexts, numbers and promoted tokens (the neuron page's
        rendering), and its top tokens at each checkpoint."""
        l, j = parse_neuron((spec or '').replace(' ', ''), self.model, flag='neuron')
        if l not in self.stats:
            die(f"layer {l} is not analysed here; the layers are {self.layers}")
        with self.lock:
            block = neuron_blocks(self.model, self.tokens, l, self.stats[l], self.tables[l], [j])[j]
        rows = []
        for it, ids in self.history:
            top = ids[l][:, j][ids[l][:, j] >= 0]
            counts = torch.bincount(top, minlength=1)
            best = counts.topk(min(5, int((counts > 0).sum()))) if len(top) else None
            rows.append(f"<tr><td>{it}</td><td>{len(top)}</td><td>" + (', '.join(
                f"{html.escape(repr(decode([t])))} ×{c}" for c, t in zip(best.values.tolist(), best.indices.tolist()))
                if best is not None else '(does not fire)') + "</td></tr>")
        formation = ("<h4>Formation: its top tokens at each checkpoint</h4><table><tr><th>step</th><th>firing of top "
                     f"{top_m}</th><th>top tokens</th></tr>{''.join(rows)}</table>") if rows else ''
        return f"<div>{block}</div>{formation}"

    # -- Search --------------------------------------------------------------------------------
    def by_token(self, word, n=10):
        """The n neurons that fire most selectively on the word's tokens (the search's reads signal)."""
        ids = concept_token_ids(concept_words(word or ''))
        found = []
        for l in self.layers:
            s = concept_stats(self.stats[l], ids)
            if s['mark_count']['concept'] == 0:
                die(f"{word!r} does not occur in the {self.tokens.numel():,} evaluation tokens")
            score = reads(s)
            for j in score.topk(n).indices.tolist():
                found.append((score[j].item(), l, j, self.tables[l]['freq'][j].item(), self.tables[l]['max'][j].item()))
        return [dict(neuron=f"{l}:{j}", reads=round(r, 3), fires=f"{100 * f:.2f}%", max=round(m, 3))
                for r, l, j, f, m in sorted(found, reverse=True)[:n]]

    # -- Trace ---------------------------------------------------------------------------------
    def trace(self, prompt, target=''):
        """The attribution graph of the prompt's next token (trace.py's, default thresholds) as
        (circuit-tracer's graph JSON, the page's HTML, the kept neurons 'L:J' by influence)."""
        if self.site is not None:
            die("tracing reads the model's own neurons: start the explorer without --dictionary")
        ids = self.prompt_ids(prompt)
        targets = None
        if (target or '').strip():
            targets = encode(target)
            if len(targets) != 1:
                die(f"the target {target!r} is {len(targets)} GPT-2 tokens; give one token")
        with self.lock:
            graph = attribute(self.model, torch.tensor(ids), targets)
            keep, edges, influence = prune(graph)
            replacement, completeness = scores(graph)
            kept = {i: n for i in keep.nonzero()[:, 0].tolist() if (n := graph['nodes'][i])[0] == 'neuron'}
            clerps, _ = neuron_notes(self.model, kept)
        contexts = {f"{l}_{j}_{p}": contexts_text(self.tokens, self.stats[l], j) for _, l, p, j in kept.values()
                    if l in self.stats}
        data = graph_json(graph, keep, edges, influence, prompt, 'explorer', len(self.model.transformer.h), clerps,
                          dict(replacement_score=replacement, completeness_score=completeness))
        ranked = sorted(kept, key=lambda i: -influence[i].item())
        return data, page(data, contexts), list(dict.fromkeys(f"{kept[i][1]}:{kept[i][3]}" for i in ranked))

    def by_text(self, text, layer, n=3):
        """Token by token, the n neurons of the layer most active on it, with their activations."""
        layer = int(number(layer, 'layer'))
        if layer not in self.stats:
            die(f"layer must be one of {self.layers}, got {layer}")
        ids = encode(text or '')[:self.model.config.block_size]
        if not ids:
            die("type some text to read")
        with self.lock, torch.no_grad(), capture(self.model, [layer]) as acts:
            self.model(torch.tensor([ids]))
        a = acts[layer][0]
        return [dict(token=decode([t]), neurons=', '.join(f"{layer}:{j} ({v:.2f})" for v, j in zip(*a[i].topk(n)) if v > 0))
                for i, t in enumerate(ids)]


def number(value, name):
    try:
        return float(value)
    except (TypeError, ValueError):
        die(f"{name} must be a number, got {value!r}")


def highlighted(text, words):
    """The text as HTML with the concept words marked and each document break shown as a rule."""
    text = html.escape(text)
    text = hit_pattern(words).sub(lambda m: f"<mark>{m.group(0)}</mark>", text) if words else text
    return text.replace(html.escape(decode([EOT])), "<hr class='eot' title='end of a document'>")


def shown(call, n_outputs=1):
    """A page handler that shows a bad input's one-line error on the page and keeps serving."""
    def handler(*args):
        try:
            return call(*args)
        except SystemExit as e:
            message = f"<p class='error'>{html.escape(str(e).removeprefix('error: '))}</p>"
            return message if n_outputs == 1 else (message,) + ('',) * (n_outputs - 1)
    return handler


def app(ex):
    """The Gradio page of an Explorer."""
    def steer_page(prompt, target, strength, n_tokens, seed):
        r = ex.steer(prompt, target, strength, n_tokens, seed)
        info = f"<p class='info'>{html.escape(r['found'])}, set to {r['value']:.3f}</p>"
        return (info, f"<h4>Baseline (unsteered)</h4><div id='baseline'>{highlighted(r['baseline'], r['words'])}</div>"
                      f"<p>perplexity {r['baseline_ppl']:.2f}</p>",
                f"<h4>Steered</h4><div id='steered'>{highlighted(r['steered'], r['words'])}</div>"
                f"<p>perplexity {r['steered_ppl']:.2f}</p>")

    def suggest_page(prompt, target, strength, seed):
        try:
            r = ex.fluent_strength(prompt, target, seed)
        except SystemExit as e:
            return strength, f"<p class='error'>{html.escape(str(e).removeprefix('error: '))}</p>"
        hits = (f", hit rate {r['baseline_hit_rate']:.2f} → {r['hit_rate']:.2f}" if r['hit_rate'] is not None else '')
        fluent = 'within' if r['ratio'] <= 2 else 'none within'
        return (r['scale'], f"<p id='suggested'>neuron {r['neuron']}: strength {r['scale']:g} "
                f"({fluent} 2x: perplexity {r['ratio']:.2f}x the baseline's{hits}; 8 samples of 40 tokens)</p>")

    def trace_page(prompt, target):
        try:
            data, html_page, neurons = ex.trace(prompt, target)
        except SystemExit as e:
            return f"<p class='error'>{html.escape(str(e).removeprefix('error: '))}</p>", gr.update(choices=[])
        frame = (f"<iframe id='graph-page' srcdoc='{html.escape(html_page, quote=True)}' "
                 "style='width:100%;height:640px;border:0'></iframe>")
        return frame, gr.update(choices=neurons, value=neurons[0] if neurons else None)

    def trace_steer_page(prompt, neuron, strength):
        r = ex.steer(prompt, neuron or '', strength, 40, 1337)
        return (f"<p>neuron {r['neuron']} set to {r['value']:.3f}</p><p><b>Baseline (unsteered)</b>: "
                f"{highlighted(r['baseline'], None)}</p><p><b>Steered</b>: {highlighted(r['steered'], None)}</p>")

    def table(rows):
        if not rows:
            return "<p>nothing</p>"
        head = ''.join(f"<th>{k}</th>" for k in rows[0])
        return f"<table><tr>{head}</tr>" + ''.join(
            "<tr>" + ''.join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows) + "</table>"

    kind = (f"dictionary at layer {ex.site}" if ex.site is not None else
            'TopK LM' if any(is_topk(ex.model, l) for l in ex.layers) else 'dense model')
    with gr.Blocks(title='TopK LM explorer') as demo:
        gr.Markdown(f"## TopK LM explorer: {html.escape(out_dir)} ({kind}, layers {ex.layers}, "
                    f"{ex.tokens.numel():,} evaluation tokens)")
        with gr.Tab('Steer'):
            with gr.Row():
                prompt = gr.Textbox(label='prompt', value='The story began', elem_id='prompt')
                target = gr.Textbox(label='neuron L:J or concept words', elem_id='target')
            with gr.Row():
                strength = gr.Number(label="strength (x the neuron's maximum)", value=2, minimum=0,
                                     maximum=max_strength, step=0.25, elem_id='strength')
                n_tokens = gr.Number(label='new tokens', value=60, minimum=1, maximum=max_new_tokens_cap, precision=0,
                                     elem_id='n_tokens')
                seed = gr.Number(label='seed', value=1337, precision=0, elem_id='seed')
            with gr.Row():
                go = gr.Button('Steer', elem_id='steer')
                suggest = gr.Button('Suggest a fluent strength', elem_id='suggest')
            info = gr.HTML(elem_id='info')
            with gr.Row(elem_id='steer-output'):
                baseline, steered = gr.HTML(), gr.HTML()
            go.click(shown(steer_page, 3), [prompt, target, strength, n_tokens, seed], [info, baseline, steered])
            suggest.click(suggest_page, [prompt, target, strength, seed], [strength, info])
        with gr.Tab('Neuron'):
            spec = gr.Textbox(label='neuron L:J', elem_id='neuron')
            show = gr.Button('Show', elem_id='show')
            page = gr.HTML(elem_id='page')
            show.click(shown(ex.neuron), [spec], [page])
        with gr.Tab('Trace'):
            with gr.Row():
                t_prompt = gr.Textbox(label='prompt', value='The story began', elem_id='trace_prompt')
                t_target = gr.Textbox(label="next token to explain (one token; empty: the likeliest)",
                                      elem_id='trace_target')
            trace_go = gr.Button('Trace', elem_id='trace')
            graph_frame = gr.HTML(elem_id='graph')
            with gr.Row():
                t_neuron = gr.Dropdown(label='a neuron of the graph, by influence', choices=[], elem_id='trace_neuron')
                t_strength = gr.Number(label="strength (x its maximum)", value=2, minimum=0, maximum=max_strength,
                                       step=0.25, elem_id='trace_strength')
                t_steer = gr.Button('Steer it', elem_id='trace_steer')
            t_out = gr.HTML(elem_id='trace_steered')
            trace_go.click(trace_page, [t_prompt, t_target], [graph_frame, t_neuron])
            t_steer.click(shown(trace_steer_page), [t_prompt, t_neuron, t_strength], [t_out])
        with gr.Tab('Search'):
            word = gr.Textbox(label='a token, e.g. rain', elem_id='word')
            find = gr.Button('Neurons that fire on it', elem_id='find')
            found = gr.HTML(elem_id='found')
            find.click(shown(lambda w: table(ex.by_token(w))), [word], [found])
            text = gr.Textbox(label='text to read token by token', elem_id='text')
            layer = gr.Dropdown(label='layer', choices=ex.layers, value=ex.layers[0], elem_id='layer')
            read = gr.Button('Read', elem_id='read')
            tokens = gr.HTML(elem_id='tokens')
            read.click(shown(lambda t, l: table(ex.by_text(t, l))), [text, layer], [tokens])
    return demo


def timed(call):
    t0 = time.time()
    out = call()
    return out, time.time() - t0


def main():
    configure(globals())
    if not os.path.exists(os.path.join(out_dir, 'ckpt.pt') if os.path.isdir(out_dir) else out_dir):
        die(f"no checkpoint in --out_dir={out_dir} (train one with train.py)")
    ex, start = timed(lambda: Explorer(out_dir, dictionary, eval_data, eval_tokens, top_m, n_clusters))
    print(f"ready in {start:.1f} s ({'cached statistics' if ex.cached else 'statistics computed and cached'})")
    if bench:
        target = f"{ex.layers[0]}:{int(ex.tables[ex.layers[0]]['freq'].argmax())}"
        _, s = timed(lambda: ex.steer('The story began', target, 2, 60, 1337))
        print(f"one steering request, 60 new tokens, baseline and steered: {s:.2f} s")
        _, c = timed(lambda: ex.target('rain weather storm'))
        print(f"a new concept's search ('rain weather storm'), statistics cached: {c:.2f} s")
        _, f = timed(lambda: ex.fluent_strength('The story began', 'rain weather storm', 1337))
        print(f"a fluent strength suggested for it (the sweep on 8 continuations of 40 tokens): {f:.2f} s")
        return
    demo = app(ex)
    demo.launch(server_name=host, server_port=port)


if __name__ == '__main__':
    main()
