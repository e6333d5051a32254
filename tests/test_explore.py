"""explore.py: the app's pages as calls (steering, the concept search from cached statistics, a
neuron's page, search), requests at once, bad input, and the page itself in headless Chromium,
on conftest's tiny TopK run."""
import math
import shutil
import socket
import threading

import pytest
import torch

from conftest import WORDS, import_or_skip  # the check comes before the optional imports
import_or_skip(("gradio", "playwright"), "toolkit/requirements-explore.txt")

from playwright.sync_api import sync_playwright  # noqa: E402 (after the check that it is installed)

from toolkit import explore  # noqa: E402
from toolkit.data import encode  # noqa: E402
from toolkit.common import save_checkpoint
from toolkit.dictionary import SparseCoder, model_shape, save_dictionary  # noqa: E402
from toolkit.search import concept_search, concept_token_ids, trial_strength  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's; browser downloads are not possible here


PLANTED = (0, 16)  # a neuron of layer 0 that fires, made to write ' job' (the tiny run's own ones are weak)


@pytest.fixture(scope="module")
def run(tiny_runs, tmp_path_factory):
    """A copy of the tiny TopK run with the PLANTED neuron (the explorer writes its cache into the
    run's analysis/)."""
    folder = tmp_path_factory.mktemp('explore') / 'topk'
    shutil.copytree(tiny_runs / 'topk', folder)
    ckpt = torch.load(folder / 'ckpt.pt', weights_only=True)
    l, j = PLANTED
    job = ckpt['model']['lm_head.weight'][encode(' job')[0]]
    ckpt['model'][f'transformer.h.{l}.mlp.c_proj.weight'][:, j] = 50 * job / job.norm()
    ckpt['model']['transformer.ln_f.weight'] *= 50  # the tiny model's logits are flat: let a push show
    save_checkpoint(ckpt, str(folder / 'ckpt.pt'))
    return folder


@pytest.fixture(scope="module")
def ex(run):
    return explore.Explorer(str(run), n_tokens=1024)


@pytest.fixture(scope="module")
def a(ex):
    assert ex.stats[PLANTED[0]]['values'][0, PLANTED[1]] > 0  # it fires
    return f"{PLANTED[0]}:{PLANTED[1]}"


@pytest.fixture(scope="module")
def b(ex):
    """The neuron of layer 1 that fires most often."""
    return f"1:{int(ex.tables[1]['freq'].argmax())}"


def test_statistics_are_computed_once_then_read_from_the_cache(run, ex):
    again = explore.Explorer(str(run), n_tokens=1024)
    assert again.cached and (run / 'analysis' / 'explore_cache.pt').exists()
    for l in ex.layers:
        assert torch.equal(again.stats[l]['values'], ex.stats[l]['values'])
        assert torch.equal(again.tables[l]['h_tok'].nan_to_num(-1), ex.tables[l]['h_tok'].nan_to_num(-1))
    assert [it for it, _ in again.history] == [0, 4, 8]  # formation: every checkpoint of the series


def test_a_steered_continuation_differs_from_its_baseline_and_repeats_exactly(ex, a, b):
    r = ex.steer('Anna saw the', a, 20, 12, 7)
    assert r['baseline'] != r['steered'] and r['neuron'] == a
    assert r['value'] == pytest.approx(20 * ex.stats[0]['values'][0, int(a[2:])].item())
    assert ex.steer('Anna saw the', a, 20, 12, 7) == r
    assert ex.steer('Anna saw the', b, 4, 12, 7)['baseline'] == r['baseline']  # the same seed, unsteered


def test_a_concept_finds_the_neuron_steer_pys_search_ranks_first(ex):
    words = WORDS['work'][:3]
    ids = concept_token_ids(words)
    _, finalists = concept_search(ex.model, ex.tokens, ids, ex.layers, trial_strength(math.nan, math.nan), 32, 6, 1)
    l, j, found_words, how = ex.target(' '.join(words))
    assert (l, j) == (finalists[0]['layer'], finalists[0]['neuron']) and found_words == words
    r = ex.steer('Anna saw the', ' '.join(words), 3, 12, 7)
    assert r['neuron'] == f"{l}:{j}" and 'found by the search' in r['found']


def test_requests_at_once_each_give_the_text_they_give_alone(ex, a, b):
    requests = [('Anna saw the', a, 20, 16, 1), ('Tom said', b, 20, 16, 2), ('Ben saw', a, 0, 16, 3)]
    alone = [ex.steer(*r) for r in requests]
    together = [None] * len(requests)

    def go(i):
        together[i] = ex.steer(*requests[i])
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_a_suggested_strength_is_the_sweeps_fluent_pick(ex, a):
    r = ex.fluent_strength('Anna saw the', a, 7)
    assert r['neuron'] == a and r['hit_rate'] is None  # a neuron, no concept: the strongest fluent strength
    assert r['ratio'] <= 2 and r['scale'] > 0
    assert ex.fluent_strength('Anna saw the', a, 7) is r  # kept: asking again costs nothing


def test_document_breaks_show_as_breaks_and_concept_words_are_marked():
    page = explore.highlighted('a job.<|endoftext|>Next <b>', ['job'])
    assert page == "a <mark>job</mark>.<hr class='eot' title='end of a document'>Next &lt;b&gt;"


def test_a_trace_lists_the_graphs_neurons_and_each_can_be_steered(ex, a):
    data, page, neurons = ex.trace('Anna saw the', ' job')
    assert data['metadata']['prompt_tokens'][-1] == ' the' and '<svg id="graph">' in page
    logit, = [n for n in data['nodes'] if n['feature_type'] == 'logit']
    assert logit['feature'] == encode(' job')[0]
    assert neurons and all(ex.steer('Anna saw the', n, 2, 4, 1)['neuron'] == n for n in neurons[:2])
    with pytest.raises(SystemExit, match="give one token"):
        ex.trace('Anna saw the', ' job market')


def test_a_neuron_page_shows_its_contexts_and_its_formation(ex):
    j = int(ex.tables[1]['freq'].argmax())
    page = ex.neuron(f'1:{j}')
    assert f'neuron 1:{j}' in page and 'class="c"' in page and 'promotes' in page
    assert page.count('<tr><td>') == 3  # a row per checkpoint


def test_search_by_token_and_by_typed_text(ex):
    found = ex.by_token('job')
    assert len(found) == 10 and found == sorted(found, key=lambda r: -r['reads'])
    rows = ex.by_text('Anna saw the job', 0)
    assert [r['token'] for r in rows] == ['Anna', ' saw', ' the', ' job'] and all(r['neurons'] for r in rows)


def test_a_dense_twin_and_a_dictionary_are_read_the_same_way(tiny_runs, tmp_path):
    dense = tmp_path / 'dense'
    shutil.copytree(tiny_runs / 'dense', dense)
    twin = explore.Explorer(str(dense), n_tokens=1024)
    assert twin.layers == [0, 1, 2]  # no TopK block: every block's neurons
    assert twin.by_token('job') and 'neuron 2:' in twin.neuron('2:0')
    model = twin.model
    coder = SparseCoder(32, 64, 4)
    save_dictionary(dense / 'sae_layer1.pt', coder, dict(kind='sae', layer=1, d_in=32, n_latents=64, k=4,
                                                           model_args=model_shape(model)))
    latents = explore.Explorer(str(dense), str(dense / 'sae_layer1.pt'), n_tokens=1024)
    assert latents.layers == [1] and latents.stats[1]['values'].shape[1] == 64  # the latents, not the neurons
    assert (dense / 'analysis' / 'explore_cache_sae_layer1.pt').exists() and not latents.history
    j = int(latents.tables[1]['freq'].argmax())
    r = latents.steer('Anna saw the', f'1:{j}', 3, 8, 1)
    assert r['neuron'] == f'1:{j}' and r['baseline'] == twin.steer('Anna saw the', '1:0', 0, 8, 1)['baseline']


@pytest.mark.parametrize("call, message", [
    (lambda ex: ex.steer('Anna', '0:999', 2, 10, 1), "neuron 999 out of range"),
    (lambda ex: ex.steer('Anna', '7:1', 2, 10, 1), "layer 7 out of range"),
    (lambda ex: ex.steer('', '0:3', 2, 10, 1), "prompt is empty"),
    (lambda ex: ex.steer('job ' * 40, '0:3', 2, 10, 1), "the context holds 32"),
    (lambda ex: ex.steer('Anna', 'qqqqzzzzxxxx', 2, 10, 1), "is a single GPT-2 token"),
    (lambda ex: ex.steer('Anna', '0:3', 'strong', 10, 1), "strength must be a number"),
    (lambda ex: ex.steer('Anna', '0:3', 1e6, 10, 1), "strength must be between 0 and 20"),
    (lambda ex: ex.steer('Anna', '0:3', 2, 10 ** 6, 1), "new tokens must be a whole number from 1 to 200"),
    (lambda ex: ex.neuron('x'), "expects LAYER:NEURON"),
    (lambda ex: ex.by_text('', 0), "type some text"),
])
def test_bad_input_is_a_one_line_message_on_the_page(ex, call, message):
    page = explore.shown(call)(ex)
    assert message in page and page.count('\n') == 0 and "class='error'" in page


def test_a_run_folder_without_a_checkpoint_is_refused_at_start(run_main, tmp_path):
    with pytest.raises(SystemExit, match=f"no checkpoint in --out_dir={tmp_path}"):
        run_main('toolkit.explore', f'--out_dir={tmp_path}')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_the_page_steers_in_a_real_browser(ex, a):
    demo, port = explore.app(ex), free_port()
    demo.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
            page = browser.new_page()
            page.goto(f'http://127.0.0.1:{port}/')
            page.fill('#prompt textarea', 'Anna saw the')
            page.fill('#target textarea', a)
            page.fill('#strength input', '20')
            page.fill('#n_tokens input', '12')
            page.fill('#seed input', '7')
            page.click('#steer')
            page.wait_for_selector('#steered', timeout=60_000)
            baseline, steered = page.inner_text('#baseline'), page.inner_text('#steered')
            labels = page.inner_text('#steer-output')
            page.click('#suggest')
            page.wait_for_selector('#suggested', timeout=60_000)
            suggested, offered = page.inner_text('#suggested'), page.input_value('#strength input')
            page.fill('#target textarea', '0:999')
            page.click('#steer')
            page.wait_for_selector('.error', timeout=60_000)
            error = page.inner_text('.error')
            page.get_by_role('tab', name='Trace').click()
            page.fill('#trace_prompt textarea', 'Anna saw the')
            page.click('#trace')
            graph = page.frame_locator('#graph-page')
            graph.locator('circle.node').first.wait_for(timeout=60_000)
            drawn = graph.locator('circle.node').count()
            page.click('#trace_steer')
            page.wait_for_selector('#trace_steered b', timeout=60_000)
            traced_steer = page.inner_text('#trace_steered')
            browser.close()
    finally:
        demo.close()
    expected = ex.steer('Anna saw the', a, 20, 12, 7)
    assert baseline and steered and baseline != steered
    assert (baseline, steered) == (expected['baseline'], expected['steered'])
    assert 'neuron 999 out of range' in error
    assert labels.index('Baseline (unsteered)') < labels.index('Steered')
    fluent = ex.fluent_strength('Anna saw the', a, 7)
    assert float(offered) == fluent['scale'] and f"strength {fluent['scale']:g}" in suggested
    data, _, neurons = ex.trace('Anna saw the')
    assert drawn == len(data['nodes']) and f"neuron {neurons[0]} set to" in traced_steer
