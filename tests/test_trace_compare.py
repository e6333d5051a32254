"""trace_compare.py: the same held-out prompts traced by three routes (TopK neurons, the dense
twin's neurons, its transcoders), a row per graph and a table per route."""
import json

import pytest

from conftest import save_transcoders, transcoders_for
from toolkit.common import load_model
from toolkit.data import decode, read_shard, shard_paths
from toolkit.trace_compare import held_out_prompts


def test_prompts_are_held_out_sentences_less_their_last_word(tiny_runs):
    data = tiny_runs / 'data'
    prompts = held_out_prompts(data, 5, 16, 10_000, seed=0)
    text = decode(read_shard(shard_paths(data, 'val')[0])[:10_000].tolist())
    assert len(set(prompts)) == 5 and all(p.startswith(('Anna', 'Ben', 'Tom')) and p.endswith(' the') for p in prompts)
    assert all(p + ' ' in text for p in prompts)
    assert held_out_prompts(data, 5, 16, 10_000, seed=0) == prompts != held_out_prompts(data, 5, 16, 10_000, seed=1)


def test_too_few_sentences_is_one_line(tiny_runs):
    with pytest.raises(SystemExit, match="fewer than --n_prompts=5000"):
        held_out_prompts(tiny_runs / 'data', 5000, 16, 10_000, seed=0)


def test_each_route_gets_a_row_per_prompt_and_a_table_row(tiny_runs, tmp_path, run_main):
    dense, _ = load_model(str(tiny_runs / 'dense'), 'cpu')
    save_transcoders(dense, transcoders_for(dense, [0, 1]), tmp_path)
    out = tmp_path / 'rows.json'
    printed = run_main('toolkit.trace_compare', f'--topk={tiny_runs / "topk"}', f'--dense={tiny_runs / "dense"}',
                       f'--transcoders={tmp_path}', '--n_prompts=2', '--search_tokens=10000', f'--out={out}')
    rows = json.loads(out.read_text())
    assert [r['route'] for r in rows] == ['topk'] * 2 + ['dense'] * 2 + ['transcoders'] * 2
    assert [r['prompt'] for r in rows[:2]] == [r['prompt'] for r in rows[2:4]] == [r['prompt'] for r in rows[4:]]
    by = {r['route']: r for r in rows}
    assert by['dense']['errors'] == 0 and by['dense']['replacement'] == pytest.approx(1.0)  # every neuron a node
    assert by['topk']['errors'] > 0 and by['transcoders']['errors'] > 0 and by['topk']['replacement'] < 1
    assert all(f"| {route} | " in printed for route in ('topk', 'dense', 'transcoders'))


def test_a_route_without_its_runs_is_one_line(tiny_runs, run_main):
    with pytest.raises(SystemExit, match="--routes=dense needs --dense"):
        run_main('toolkit.trace_compare', f'--topk={tiny_runs / "topk"}', '--routes=topk,dense')
