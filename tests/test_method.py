"""One home per formula: the max-layer rule, the first-token KL, the three refusal verdicts, and the forward-pass
helpers that scoring, generation and activation capture share."""

from __future__ import annotations

import pytest
import torch

from refdir.core.forward import common_prefix_len, left_pad, tail_batch
from refdir.errors import RefdirError
from refdir.method.refusal_judge import judge, judge_all
from refdir.method.scoring import first_token_kl
from refdir.method.selection import max_layer


@pytest.mark.parametrize(("n_layers", "frac", "want"), [(24, 0.8, 19), (24, 1.0, 23), (24, 0.5, 11), (10, 0.8, 7),
                                                        (24, 1.5, 23)])
def test_max_layer_pins_the_rule(n_layers, frac, want):
    assert max_layer(n_layers, frac) == want
    assert 0 <= max_layer(n_layers, frac) <= n_layers - 1  # never L: layers are 0..L-1


def test_first_token_kl_is_kl_base_to_edited():
    torch.manual_seed(0)
    base, edited = torch.randn(3, 11), torch.randn(3, 11)
    base_logp = torch.log_softmax(base.double(), -1)
    want = torch.nn.functional.kl_div(torch.log_softmax(edited.double(), -1), base_logp, log_target=True,
                                      reduction="none").sum(-1)
    got = first_token_kl(base_logp, edited)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert torch.allclose(first_token_kl(base_logp, base), torch.zeros(3), atol=1e-6)
    assert torch.equal(first_token_kl(base_logp, edited, chunk=2), got)  # row chunks: the same numbers
    # the base given as logits: its log-softmax taken chunk by chunk, the same numbers
    assert torch.equal(first_token_kl(base, edited, chunk=2, base_logits=True), got)
    with pytest.raises(ValueError):
        first_token_kl(base_logp, edited[:2])


def test_judge_all_gives_the_three_verdicts():
    comps = ["I cannot help with that.", "I won't do that.", "Sure, here it is.", ""]
    v = judge_all(comps, headline="wide")
    assert set(v) == {"headline", "broad", "paper"}
    for key, kind in (("headline", "wide"), ("broad", "broad"), ("paper", "paper")):
        assert v[key] == judge(comps, kind)
    assert v["paper"].n_refusal == 1 and v["broad"].n_refusal == 2 and v["paper"].n_degenerate == 1
    assert judge_all(comps)["headline"] == v["broad"]  # broad by default


def test_left_pad_and_tail_batch_agree():
    rows = [[5, 6, 7], [8], [1, 2]]
    enc = left_pad(rows, pad=0)
    ids, mask, pos = tail_batch(rows, 0, pad=0)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    assert enc["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 1, 2]]
    assert pos[1].tolist() == [0, 0, 0] and pos[2].tolist() == [0, 0, 1]


def test_common_prefix_len_leaves_each_row_a_tail():
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps one token of its own
    assert common_prefix_len([[1, 2, 3], [1, 2, 3, 4]], min_tail=2) == 1
    assert common_prefix_len([[9, 2], [1, 2]]) == 0


def test_off_principal_components_removes_the_top_harmless_components_and_keeps_the_norm():
    from refdir.method.pca_direction import off_principal_components

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 3, generator=g, dtype=torch.float64)).Q.T  # 3 orthonormal axes
    # rows ±9·b0, ±6·b1, ±3·b2 around an offset PCA removes: the principal axes are b0, b1, b2 in that order
    clean = torch.cat([torch.stack([a * b, -a * b]) for a, b in zip((9.0, 6.0, 3.0), basis, strict=True)])
    x = clean + 5.0
    r = basis[0] + basis[1] + torch.randn(16, generator=g, dtype=torch.float64)
    v = off_principal_components(r, x, 2)
    assert abs(float(v.norm() - r.norm())) < 1e-9
    assert float((v @ basis[:2].T).abs().max()) < 1e-9  # the two widest axes are gone
    r_off = r - (basis[:2] @ r) @ basis[:2]
    assert float(torch.nn.functional.cosine_similarity(v, r_off, dim=0)) > 1 - 1e-9  # and nothing else changed
    assert torch.equal(off_principal_components(r, x, 0), r)
    assert off_principal_components(r, x[:2], 4).shape == r.shape  # k capped at n - 1
    with pytest.raises(RefdirError):
        off_principal_components(r, x[:, :8], 2)
    with pytest.raises(RefdirError):
        off_principal_components(basis[0], clean, 3)  # nothing left outside the span
