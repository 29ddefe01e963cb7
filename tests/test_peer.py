"""The plain PyTorch peer model of ``benchmarks/peer.py``: its data set and one training step."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch

from aitm_torchrec.config import load_config
from benchmarks import peer


def test_peer_model_trains_on_the_seed_layout(tiny_data):
    cfg = load_config(None)
    sizes = {c: 64 for c in peer.seed_layout(cfg)[2]}
    model, opt, ids, tags, sizes = peer.build(cfg, sizes)
    ds = peer.RowDataset(sorted((tiny_data / "train").glob("*.parquet")), ids, tags, ["clk", "buy"], sizes)
    assert len(ds) == 12000 and ds.tags.shape[1:] == (2, peer.MAX_TAGS)
    table = pq.read_table(tiny_data / "train", columns=["tag_brand_list"]).column(0).to_pylist()
    first = [t % 64 for t in table[0][:peer.MAX_TAGS]]
    assert list(ds.tags[0, 1, :len(first)]) == first and (ds.tags[0, 1, len(first):] == -1).all()
    x, g, y = next(iter(peer.loader(ds, 256, True)))
    before = [p.detach().clone() for p in model.parameters()]
    loss = peer.loss_fn(model(x, g), y)
    loss.backward()
    opt.step()
    assert model(x, g).shape == (256, 2) and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _small_model(tasks: int = 2, dim: int = 8):
    return peer.PeerAITM([10, 20], [30], tasks, dim=dim, bottom=(16, 8), tower=(8, 4))


def test_embeddings_are_one_xavier_uniform_table_with_field_offsets():
    torch.manual_seed(0)
    model = peer.PeerAITM([1000, 2000], [3000], 2, dim=128)
    w = model.embedding.weight.detach()
    assert w.shape == (6000, 128) and model.offsets.tolist() == [0, 1000, 3000]
    bound = (6 / (6000 + 128)) ** 0.5  # xavier uniform on a (rows, dim) table: sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert abs(float(w.std()) - bound / 3 ** 0.5) < 0.01 * bound  # U(-b, b) has std b / sqrt(3)
    # field 1's id 5 is row 1005; a tag field sums its tags' rows, -1 adds nothing
    ids, tags = torch.tensor([[0, 5]]), torch.tensor([[[2, 7, -1]]])
    emb = model.embed(ids, tags).view(3, 128)
    assert torch.equal(emb[1], w[1005]) and torch.allclose(emb[2], w[3002] + w[3007])


def test_dropout_acts_in_train_mode_only():
    model = _small_model()
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 8 and all(m.p == 0.2 for m in drops)  # 2 bottom + 2 tower layers, per task
    ids, tags = torch.randint(0, 10, (64, 2)), torch.randint(-1, 30, (64, 1, 4))
    model.train()
    assert not torch.equal(model(ids, tags), model(ids, tags))
    model.eval()
    assert torch.equal(model(ids, tags), model(ids, tags))


def test_adam_decays_every_parameter():
    cfg = load_config(None)
    model, opt, *_ = peer.build(cfg, {c: 16 for c in peer.seed_layout(cfg)[2]}, dim=8)
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert isinstance(opt, torch.optim.Adam) and in_groups == {id(p) for p in model.parameters()}
    assert all(g["weight_decay"] == 1e-6 and g["lr"] == 1e-3 for g in opt.param_groups)
    assert id(model.embedding.weight) in in_groups


def test_ait_on_a_hand_made_input():
    ait = peer.AIT(2)
    with torch.no_grad():
        for h in (ait.h1, ait.h2, ait.h3):
            h.bias.zero_()
        ait.h1.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # V swaps the two coordinates
        ait.h2.weight.copy_(torch.eye(2))                              # K = x
        ait.h3.weight.copy_(torch.eye(2))                              # Q = x
    transferred, own = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # scores K.Q / sqrt(2): 4 / 1.41421 = 2.82843 and 1 / 1.41421 = 0.70711;
    # softmax: w_transferred = 1 / (1 + e^-(2.82843 - 0.70711)) = 1 / (1 + e^-2.12132)
    #        = 1 / (1 + 0.11987) = 0.89296, w_own = 0.10704;
    # V: transferred (0, 2), own (1, 0); output = (0.10704 * 1, 0.89296 * 2) = (0.10704, 1.78591)
    out = ait(transferred, own)
    assert torch.allclose(out, torch.tensor([[0.10704, 1.78591]]), atol=1e-4)


def test_towers_follow_the_label_chain():
    """Task 0's output depends on its own bottom only; task 1's AIT sees task 0's bottom through g."""
    model = _small_model().eval()
    ids, tags = torch.randint(0, 10, (4, 2)), torch.randint(-1, 30, (4, 1, 3))
    before = model(ids, tags)
    with torch.no_grad():
        model.g[0].bias.add_(1.0)
    after = model(ids, tags)
    assert torch.equal(before[:, 0], after[:, 0]) and not torch.allclose(before[:, 1], after[:, 1])


def test_loss_is_the_mean_task_bce_plus_an_optional_calibration_term():
    logits = torch.tensor([[0.0, 2.0], [0.0, -2.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    bce = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), labels)  # mean over rows and tasks
    assert torch.allclose(peer.loss_fn(logits, labels), bce)
    # p_buy - p_click: row 0 sigmoid(2) - 0.5 = 0.38080, row 1 negative -> 0; mean 0.19040
    assert torch.allclose(peer.loss_fn(logits, labels, 1.0), bce + 0.19040, atol=1e-4)


def test_field_dims_are_the_distinct_ids_of_train_and_eval(tiny_data):
    """One table row per distinct raw id of each field (MTReclib: ``field_dims``, the count of a
    field's codes); two different (field, raw id) pairs never share a row."""
    cfg = load_config(None)
    id_cols, tag_cols, _ = peer.seed_layout(cfg)
    files = sorted((tiny_data / "train").glob("*.parquet")) + sorted((tiny_data / "eval").glob("*.parquet"))
    vocab = peer.Vocab(files, id_cols, tag_cols)
    table = pq.read_table(files, columns=id_cols + tag_cols)
    raw = {c: table.column(c).to_pylist() for c in id_cols}
    raw.update({c: [t for tags in table.column(c).to_pylist() for t in tags] for c in tag_cols})
    assert vocab.sizes == {c: len(set(v)) for c, v in raw.items()}
    assert vocab.sizes["pid"] < 10 < sum(vocab.sizes.values()) < sum(peer.seed_layout(cfg)[2].values())

    model, _, ids, tags, sizes = peer.build(cfg, vocab.sizes, dim=4)
    assert sizes == vocab.sizes and model.embedding.weight.shape == (sum(vocab.sizes.values()), 4)
    ds = peer.RowDataset(files, ids, tags, ["clk", "buy"], vocab=vocab)
    offsets = model.offsets.tolist()
    pairs = set()  # (column, raw id, table row) over every id and tag of every row
    for f, c in enumerate(id_cols):
        pairs |= {(c, r, offsets[f] + int(i)) for r, i in zip(raw[c], ds.ids[:, f])}
    for g, c in enumerate(tag_cols):
        rows = ds.tags[:, g]
        got = [offsets[len(id_cols) + g] + int(i) for i in rows[rows >= 0]]
        want = [t for tags in table.column(c).to_pylist() for t in tags[:peer.MAX_TAGS]]
        pairs |= set(zip([c] * len(want), want, got, strict=True))
    assert len({(c, r) for c, r, _ in pairs}) == len({row for *_, row in pairs}) == len(pairs)
    assert all(0 <= row < model.embedding.num_embeddings for *_, row in pairs)


def test_shuffled_batches_are_the_seeded_dataloaders():
    ds = peer.RowDataset.__new__(peer.RowDataset)
    ds.ids, ds.tags, ds.labels = torch.arange(1000).view(-1, 1), torch.zeros(1000, 1, 2), torch.zeros(1000, 2)
    dl = torch.utils.data.DataLoader(range(1000), 256, shuffle=True, generator=torch.Generator().manual_seed(3))
    ours = [x.flatten() for x, _, _ in peer.loader(ds, 256, True, 3)]
    assert [len(x) for x in ours] == [256, 256, 256, 232]
    assert all(torch.equal(a, b) for a, b in zip(ours, dl, strict=True))
    assert torch.equal(torch.cat([x.flatten() for x, _, _ in peer.loader(ds, 256, False)]), torch.arange(1000))
