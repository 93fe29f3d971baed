"""What the report shows: characters split into several byte-level BPE tokens are labelled
readably, and p-values that underflowed print as below the smallest shown value."""

from __future__ import annotations

import pandas as pd
import pytest
from scipy import stats

from moe_hooked import HookedMoETransformer
from moe_hooked.report import _table
from moe_hooked.viz.tokens import readable_str_tokens

TEXT = "机器学习是人工智能的一个分支。龘🙂 x"


@pytest.fixture(scope="module")
def model():
    return HookedMoETransformer.from_pretrained("moe-hooked/demo")


def test_pieces_of_a_character_show_it_once_and_keep_their_positions(model):
    ids = model.to_tokens(TEXT, prepend_bos=False)[0].tolist()
    raw = model.to_str_tokens(ids)
    assert sum("\ufffd" in piece for piece in raw) >= 5  # 龘 and 🙂 are split into byte pieces
    labels = readable_str_tokens(model, ids)
    assert len(labels) == len(ids) and not any("\ufffd" in label for label in labels)
    spelled, i = "", 0
    while i < len(ids):
        if labels[i] == raw[i]:
            spelled, i = spelled + raw[i], i + 1
            continue
        text, _, place = labels[i].rpartition(" ")
        n = int(place.split("/")[1])
        assert place == f"1/{n}" and labels[i + 1 : i + n] == [f"{j}/{n}" for j in range(2, n + 1)]
        assert text == model.tokenizer.decode(ids[i : i + n])  # the run's UTF-8 bytes spell the character
        spelled, i = spelled + text, i + n
    assert spelled == TEXT
    assert "龘 1/3" in labels and "🙂 1/4" in labels


def test_underflowed_p_values_print_below_the_floor():
    assert stats.binom.sf(10**6 - 1, 10**6, 0.1) == 0.0  # a real underflow of the specialization test
    html = _table(pd.DataFrame({"p_adjusted": [0.0, 1e-320, 0.0312345], "ratio": [0.0, 1.5, 2.0]}))
    assert html.count("<td>&lt; 1e-300</td>") == 2
    assert "<td>0.03123</td>" in html and "<td>0</td>" in html  # other columns keep their zeros


def test_routing_views_of_a_prompt_use_the_readable_labels(model):
    from moe_hooked.viz.routing import routing_cache

    cache, labels = routing_cache(model, TEXT)
    assert labels == readable_str_tokens(model, model.to_tokens(TEXT)[0])
    assert cache["topk_indices", model.cfg.moe_layers[0]].shape[1] == len(labels)
