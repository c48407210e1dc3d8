"""titan_v4.model.indexer_loss and the indexer's training inside attention.py: the KL and its
gradient against a dense fp64 re-derivation from the weights, the recall, the isolation of the two
losses (every parameter, both ways) and what each phase attends."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny_model import close, randomize_, tiny_args
from titan_v4.model.attention import Attention
from titan_v4.model.attn_kinds import CSA
from titan_v4.model.compressor import Indexer
from titan_v4.model.indexer_loss import indexer_kl
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.model.rope import apply_rope, rope_table

PHASES = ["frozen", "dense", "warmup", "sparse"]


def rms(v, weight, eps):
    return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps) * weight


def dense_teacher_and_student(attn: Attention, x, cos, sin, picks):
    """fp64 loops from the weights: per query t the attention probabilities A[h, t, s] of every
    visible compressed entry (an explicit softmax over window keys, compressed entries and the sink
    column), and the indexer scores I[t, s]. picks [B, S, K] (the layer's selection) or None (the
    dense phases: every visible entry). Returns a list of (b, t, entries, A summed over heads, I)."""
    b, s, _ = x.shape
    h, d, eps = attn.n_heads, attn.head_dim, attn.norm_eps
    idx = attn.indexer
    q_latent = rms(x @ attn.wq_a.weight.T, attn.q_norm.weight, eps)
    q = apply_rope(rms((q_latent @ attn.wq_b.weight.T).view(b, s, h, d), 1.0, eps), cos, sin)
    kv = apply_rope(rms(x @ attn.wkv.weight.T, attn.kv_norm.weight, eps), cos, sin)
    pool = attn.compressor(x, cos, sin)
    # The indexer, written out: q_I = rope(wq_b(q_latent)), w = weights_proj(x) / sqrt(H_I), keys
    # from its own compressor; I = sum_h w relu(q_I . k) / sqrt(d_I).
    qi = apply_rope((q_latent @ idx.wq_b.weight.T).view(b, s, idx.n_heads, idx.head_dim), cos, sin)
    wi = (x @ idx.weights_proj.weight.T) / math.sqrt(idx.n_heads)
    ki = idx.compressor(x, cos, sin)
    rows = []
    for bi in range(b):
        for t in range(s):
            n_vis = (t + 1) // attn.ratio
            entries = list(range(n_vis)) if picks is None else sorted(e for e in picks[bi, t].tolist() if 0 <= e < n_vis)
            if not entries:
                continue
            local = list(range(max(0, t - attn.window_size + 1), t + 1))
            keys = torch.cat([kv[bi, local], pool[bi, entries]])  # what the attention attends
            logits = torch.cat([q[bi, t] @ keys.T / math.sqrt(d), attn.attn_sink[:, None].double()], dim=1)
            probs = logits.softmax(dim=1)[:, len(local) : len(local) + len(entries)]  # [H, n]
            scores = torch.stack([(wi[bi, t] * F.relu(qi[bi, t] @ ki[bi, e]) / math.sqrt(idx.head_dim)).sum() for e in entries])
            rows.append((bi, t, entries, probs.sum(0), scores))
    return rows


def oracle_kl(rows, n_queries: int):
    """KL(normalize(sum_h A) || softmax(I)) summed over the rows (the queries with an entry) and divided
    by every query of the batch (those without an entry count 0), fp64."""
    total = 0.0
    for *_, mass, scores in rows:
        p = mass / mass.sum()
        total = total + (p * (p.log() - torch.log_softmax(scores, 0))).sum()
    return total / n_queries


def make_layer(phase: str, seed: int = 8):
    a = tiny_args(indexer_phase=phase, index_topk=3)
    attn = Attention(a, CSA).double()
    randomize_(attn, seed=seed)
    s = 26
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :s].double()
    x = torch.randn(2, s, a.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return attn, x, cos, sin


def indexer_params(module):
    return {n: p for n, p in module.named_parameters() if ".indexer." in f".{n}"}


@pytest.mark.parametrize("phase", ["sparse", "dense"])
def test_layer_kl_and_gradient_match_dense_loop(phase):
    """The loss the layer attaches (value and gradient w.r.t. every indexer parameter) against the
    dense fp64 loop; the KL runs over the selected entries (sparse) or every visible one (dense)."""
    attn, x, cos, sin = make_layer(phase)
    params = indexer_params(attn)
    out = attn(x, cos, sin)
    # The attached loss reaches the indexer through out's backward; a zero upstream gradient keeps
    # only the indexer loss (weight 1, scale 1).
    grads = torch.autograd.grad(out, list(params.values()), torch.zeros_like(out))
    loss_value = attn.indexer_loss.sums[0] / attn.indexer_loss.count

    picks = None
    if phase == "sparse":
        with torch.no_grad():
            q_latent = attn.q_norm(attn.wq_a(x))
            picks = attn.indexer.select(attn.indexer(x, q_latent, cos, sin))
    expected = oracle_kl(dense_teacher_and_student(attn, x, cos, sin, picks), n_queries=x.shape[0] * x.shape[1])
    expected_grads = torch.autograd.grad(expected, list(params.values()))
    assert loss_value.item() == pytest.approx(expected.item(), rel=1e-5)  # recorded in fp32
    for (name, _), g, e in zip(params.items(), grads, expected_grads):
        assert g.abs().sum() > 0, name
        close(g, e, kind="grad")


def test_recall_is_the_share_of_dense_mass_on_the_topk():
    """Sparse phase: per query, the selected entries' share of the head-summed mass over every visible
    entry, the per-head probabilities taken with the sparse attention's own denominators."""
    attn, x, cos, sin = make_layer("sparse")
    attn(x, cos, sin)
    recall = (attn.indexer_loss.sums[1] / attn.indexer_loss.count).item()
    with torch.no_grad():
        q_latent = attn.q_norm(attn.wq_a(x))
        picks = attn.indexer.select(attn.indexer(x, q_latent, cos, sin))
    shares = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            n_vis = (t + 1) // attn.ratio
            if n_vis:
                selected = [e for e in picks[b, t].tolist() if 0 <= e < n_vis]
                shares.append(_share_with_sparse_denominator(attn, x, cos, sin, b, t, selected, list(range(n_vis))))
    assert recall == pytest.approx(sum(shares) / len(shares), rel=1e-5)
    assert 0 < recall < 1


def _share_with_sparse_denominator(attn, x, cos, sin, b, t, selected, visible):
    """sum_h p[h, selected] / sum_h p[h, visible] with p = exp(logit - log(Z_sparse)) per head."""
    s = x.shape[1]
    h, d, eps = attn.n_heads, attn.head_dim, attn.norm_eps
    q_latent = rms(x @ attn.wq_a.weight.T, attn.q_norm.weight, eps)
    q = apply_rope(rms((q_latent @ attn.wq_b.weight.T).view(x.shape[0], s, h, d), 1.0, eps), cos, sin)[b, t]
    kv = apply_rope(rms(x @ attn.wkv.weight.T, attn.kv_norm.weight, eps), cos, sin)[b]
    pool = attn.compressor(x, cos, sin)[b]
    local = kv[max(0, t - attn.window_size + 1) : t + 1]
    z = torch.cat([q @ local.T, q @ pool[selected].T], 1).div(math.sqrt(d)).exp().sum(1) + attn.attn_sink.double().exp()
    mass = lambda entries: ((q @ pool[entries].T / math.sqrt(d)).exp() / z[:, None]).sum()  # noqa: E731
    return (mass(selected) / mass(visible)).item()


def test_indexer_kl_hand_case():
    """Two entries, teacher (0.75, 0.25), student logits (0, 0): KL = sum p log(p / 0.5)."""
    log_mass = torch.tensor([[[math.log(3.0), 0.0, float("-inf")]]], dtype=torch.float64)
    student = torch.zeros(1, 1, 3, dtype=torch.float64, requires_grad=True)
    loss, recall = indexer_kl(student, log_mass, torch.tensor([[math.log(8.0)]], dtype=torch.float64), topk=1, listed_are_topk=True)
    assert loss.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)
    assert recall.item() == pytest.approx(4 / 8, rel=1e-12)  # listed mass 3 + 1 of visible 8
    (grad,) = torch.autograd.grad(loss, student)
    # d KL / d logit = softmax - p on the valid entries; 0 on the invisible one.
    assert grad.flatten().tolist() == pytest.approx([0.5 - 0.75, 0.5 - 0.25, 0.0], abs=1e-12)
    # Dense phases: the recall takes the student's top-1 (entry 0 or 1 tie at 0: both carry <= 0.75).
    _, recall_dense = indexer_kl(student.detach() + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), log_mass, log_mass.logsumexp(-1), topk=1, listed_are_topk=False)
    assert recall_dense.item() == pytest.approx(0.75, rel=1e-12)


def test_query_without_entries_counts_zero():
    """The loss is a mean over every query (one without an entry adds 0), the recall over the queries
    with an entry."""
    log_mass = torch.tensor([[[float("-inf")] * 2, [0.0, 0.0]]], dtype=torch.float64)
    student = torch.tensor([[[float("-inf")] * 2, [1.0, -1.0]]], dtype=torch.float64, requires_grad=True)
    loss, recall = indexer_kl(student, log_mass, torch.tensor([[float("-inf"), math.log(2.0)]], dtype=torch.float64), topk=2, listed_are_topk=True)
    q = torch.softmax(torch.tensor([1.0, -1.0], dtype=torch.float64), 0)
    assert loss.item() == pytest.approx((0.5 * (torch.log(0.5 / q))).sum().item() / 2, rel=1e-12)
    assert recall.item() == pytest.approx(1.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.all(grad[0, 0] == 0) and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------------
# Isolation: the LM loss never trains the indexer, the indexer loss never trains anything else.
# ---------------------------------------------------------------------------------------------------


def model_grads(phase: str, lm_weight: float, indexer_weight: float):
    a = tiny_args(indexer_phase=phase, indexer_loss_weight=indexer_weight, seq_balance_loss_weight=0.0)
    model = DeepSeekV4Model(a).double()
    model.init_weights()
    randomize_(model, seed=2)
    tokens = torch.randint(0, a.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    logits, mtp_logits = model(tokens)  # (logits, *mtp_logits) with one MTP depth
    lm = F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + F.cross_entropy(mtp_logits.flatten(0, 1), tokens.flatten())
    (lm * lm_weight).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def is_indexer(name: str) -> bool:
    return ".indexer." in name


@pytest.mark.parametrize("phase", ["dense", "sparse"])
def test_lm_loss_gives_the_indexer_no_gradient(phase):
    grads = model_grads(phase, lm_weight=1.0, indexer_weight=0.0)
    assert any(is_indexer(n) for n in grads)
    for name, grad in grads.items():
        if is_indexer(name):
            assert grad is None or torch.all(grad == 0), name
        else:
            assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("phase", ["dense", "sparse"])
def test_indexer_loss_gives_nothing_else_a_gradient(phase):
    # LM weight 0: the backward still runs through the model (carrying each layer's attached KL).
    grads = model_grads(phase, lm_weight=0.0, indexer_weight=1.0)
    for name, grad in grads.items():
        if is_indexer(name):
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None or torch.all(grad == 0), name


def test_frozen_indexer_builds_no_graph():
    grads = model_grads("frozen", lm_weight=1.0, indexer_weight=1.0)
    assert all(grads[n] is None for n in grads if is_indexer(n))


# ---------------------------------------------------------------------------------------------------
# Phases: what CSA attends, what is recorded.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
def test_phase_attention_and_records(phase):
    """Dense phases attend every visible entry (the same as a layer with a selection of all of them);
    frozen and sparse the top-k; every phase but frozen records its loss once per forward."""
    attn, x, cos, sin = make_layer(phase)
    out = attn(x, cos, sin)
    ref = make_layer("sparse")[0]
    ref.indexer.topk = 10**6  # a top-k of everything = every visible entry
    every = ref(x, cos, sin)
    topk = make_layer("frozen")[0](x, cos, sin)
    assert torch.allclose(out, every if phase in ("dense", "warmup") else topk, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(every, topk)  # the selection matters at these sizes
    assert attn.indexer_loss.count.item() == (0 if phase == "frozen" else 1)
    with torch.no_grad():  # no loss without a graph (evaluation)
        attn(x, cos, sin)
    assert attn.indexer_loss.count.item() == (0 if phase == "frozen" else 1)


def test_indexer_inputs_are_detached():
    a = tiny_args(indexer_phase="sparse")
    idx = Indexer(a).double()
    x = torch.randn(1, 12, a.dim, dtype=torch.float64, requires_grad=True)
    q_latent = torch.randn(1, 12, a.q_lora_rank, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :12].double()
    queries = idx(x, q_latent, cos, sin)
    total = sum(t.sum() for t in queries)
    assert torch.autograd.grad(total, [x, q_latent], allow_unused=True) == (None, None)
