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
