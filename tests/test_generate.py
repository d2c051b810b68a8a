"""KV-cache decoding equals full recomputation token for token; batching with left padding changes nothing."""
import torch

from model import load_model
from model.generate import generate_ids


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in (11, 4, 7)]


def test_kv_cache_equals_recompute(tiny_hf_dir):
    m = load_model(tiny_hf_dir)
    kw = dict(max_new_tokens=20, stop_ids={2}, pad_id=0)
    assert generate_ids(m, _prompts(), **kw) == generate_ids(m, _prompts(), use_cache=False, **kw)


def test_left_padded_batch_equals_one_by_one(tiny_hf_dir):
    m = load_model(tiny_hf_dir)
    kw = dict(max_new_tokens=15, stop_ids={2}, pad_id=0)
    batched = generate_ids(m, _prompts(), **kw)
    assert batched == [generate_ids(m, [p], **kw)[0] for p in _prompts()]
    assert all(len(x) == 15 for x in batched)  # random tiny model: no stop token within 15 steps here


def test_stops_at_stop_token(tiny_hf_dir):
    m = load_model(tiny_hf_dir)
    free = generate_ids(m, _prompts()[:1], max_new_tokens=10, stop_ids={-1}, pad_id=0)[0]
    stop = free[4]  # make the 5th generated token a stop token
    cut = generate_ids(m, _prompts()[:1], max_new_tokens=10, stop_ids={stop}, pad_id=0)[0]
    assert cut == free[:free.index(stop)]


def test_sampling_is_seeded(tiny_hf_dir):
    m = load_model(tiny_hf_dir)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate_ids(m, _prompts(), max_new_tokens=8, stop_ids={2}, pad_id=0, temperature=1.0,
                            top_p=0.9, generator=g)

    assert run(1) == run(1) and run(1) != run(2)
