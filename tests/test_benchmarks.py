"""The ``python -m benchmarks`` command line: ``data`` and ``quality`` end to end at tiny sizes,
``all``'s table and plots, and docs/benchmarks.md covering every subcommand and flag."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import all as all_benchmarks
from benchmarks import run
from tests.conftest import tiny_config_dict


def test_bench_data_smoke(tmp_path):
    """``python -m benchmarks data`` runs and reports its numbers (no timing is asserted)."""
    out = run.main(["data", "--rows", "3000", "--data", str(tmp_path / "bench"), "--row-group-size", "1000",
                    "--files", "2", "--repeats", "1", "--train-steps", "0"])
    assert out["rows"] == 3000 and out["rows_per_s"] > 0 and out["rows_per_s_per_core"] > 0


@pytest.mark.slow
def test_bench_eval_memory_smoke():
    """``python -m benchmarks eval_memory`` on 2 ranks: both forms' figures, their AUCs close."""
    out = run.main(["eval_memory", "--rows", "20000", "--chunk-rows", "4096", "--world-size", "2"])
    assert set(out["ranks"]) == {0, 1} and all(set(r) == {"rows", "binned", "exact"} for r in out["ranks"].values())
    assert sum(r["rows"] for r in out["ranks"].values()) == 20000
    for t, diff in out["auc"]["binned_minus_exact"].items():
        assert abs(diff) <= out["auc"]["binned_error_bound"][t] + 1e-6


@pytest.mark.slow
def test_bench_eval_memory_through_the_trainers_eval(tiny_data, tmp_path):
    """``eval_memory --input``: the set listed twice goes through ``train.evaluate`` on 2 ranks
    after a short training, binned and exact; the two AUCs agree and are a trained model's."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tmp_path / "unused")))
    out = run.main(["eval_memory", "--input", str(tiny_data / "eval"), "--repeat", "2", "--config", str(config),
                    "--train-steps", "40", "--exact-max-rows", "100000", "--world-size", "2",
                    "train_config.sparse_optimizer.learning_rate=0.2", "train_config.dense_optimizer.learning_rate=0.01"])
    assert out["through"] == "aitm_torchrec.train.evaluate" and out["rows"] == 2 * 4000
    assert set(out["ranks"]) == {0, 1} and all(set(r) == {"rows", "binned", "exact"} for r in out["ranks"].values())
    assert sum(r["rows"] for r in out["ranks"].values()) == 2 * 4000  # each row once, dealt over the ranks
    for t, diff in out["auc"]["binned_minus_exact"].items():
        assert abs(diff) <= 1e-3, (t, diff)
    assert out["auc"]["exact"]["ctr"] > 0.58, "the restored model is the trained one"


@pytest.mark.slow
def test_bench_train_alternates_fp32_and_the_configs_precision_and_another_config(tiny_data, tmp_path):
    """``train --alternate-fp32 1``: one fp32 run, then one at the config's precision (auto here:
    what this machine resolves it to), each run's figures and the ratio of their rates.
    ``--alternate-config F --alternate-pairs 1``: one run of the config, then one of F (here in
    fp32, so its resolved precision tells the runs apart)."""
    from aitm_torchrec.precision import resolve_for_job

    raw = tiny_config_dict(tiny_data, tmp_path / "unused")
    raw["train_config"]["mixed_precision"] = "auto"
    config, other = tmp_path / "tiny.yaml", tmp_path / "tiny_cross_fp32.yaml"
    config.write_text(yaml.safe_dump(raw))
    raw["train_config"]["mixed_precision"] = "none"
    raw["model_config"]["backbone"]["cross"] = {"num_layers": 2}
    other.write_text(yaml.safe_dump(raw))
    out = run.main(["train", "--config", str(config), "--data", str(tiny_data), "--steps", "4", "--no-big-tables",
                    "--bare-steps", "0", "--alternate-fp32", "1", "--alternate-config", str(other),
                    "--alternate-pairs", "1"])
    auto = resolve_for_job("auto", "cpu").resolved
    for key, resolved, ratio in (("precision_ab", ["none", auto], "ratio_to_fp32"),
                                 ("config_ab", [auto, "none"], "ratio_to_config")):
        ab = out[key]
        assert [r["resolved"] for r in ab["runs"]] == resolved
        assert all(r["examples_per_s"] > 0 for r in ab["runs"])
        assert ab[ratio] == pytest.approx(ab["runs"][1]["examples_per_s"] / ab["runs"][0]["examples_per_s"], abs=1e-3)
    assert out["config_ab"]["configs"] == [str(config), str(other)]


@pytest.mark.slow
def test_bench_quality_end_to_end_tiny(tmp_path, tiny_data):
    small = ["data_config.batch_size=256", "model_config.backbone.mlp.hidden_units=[32]"] + [
        f"feature_config.features.{i}.hash_bucket_size=500" for i in (1, 3, 4, 5, 6, 15, 16)]
    out = tmp_path / "q"
    result = run.main(["quality", "--rows", "3000", "--eval-rows", "1000", "--seeds", "1",
                       "--models", "AITM,SharedBottom", "--sequential-dependence", "0.5",
                       "--data-root", str(tmp_path / "data"), "--out", str(out), *small])
    summary = {(e["model"], e["data"]): e for e in result["summary"]}
    assert set(summary) == {("AITM", "2step"), ("SharedBottom", "2step"), ("AITM", "2step_seq"),
                            ("SharedBottom", "2step_seq")}
    for e in summary.values():
        assert e["seeds"] == [1] and set(e["tasks"]) == {"ctr", "cvr"}
        for v in e["tasks"].values():
            assert 0 < v["auc"] < 1 and v["gap"] == pytest.approx(v["oracle"] - v["auc"], abs=1e-3)
    saved = json.loads(Path(out).with_suffix(".json").read_text())
    assert len(saved["runs"]) == 4
    assert "| AITM |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bench_all_table_skips_missing_subcommands_and_renders(tmp_path):
    calls = []

    def fake_main(argv):
        calls.append(argv)
        return {"peer": {"speed": {k: {"table_rows_total": 10, "peer_examples_per_s": 100, "ours_examples_per_s": 500,
                                       "ratio": 5.0} for k in ("seed_tables", "big_tables")}}}.get(argv[0], {"x": 1})

    args = argparse.Namespace(out=str(tmp_path / "b"), only=None, quick=True, render_only=False)
    results = all_benchmarks.cmd(args, available={"peer", "serve"}, run=fake_main)
    assert [c[0] for c in calls] == ["peer", "serve"]  # train/data/quality/score/export absent here: skipped
    assert set(results) == {"machine", "command", "peer", "serve"}
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| seed_tables | 10 | 100 | 500 | 5.0 |" in md and "## serve" in md
    assert (tmp_path / "b" / "speed.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "b" / "serve.json").read_text()) == {"x": 1}


DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def test_every_subcommand_has_its_section_in_the_benchmarks_page():
    # (tests/test_docs.py checks every flag and link of docs/)
    text = DOC.read_text()
    sub = next(a for a in run.parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        assert f"### `{name}`" in text, name


def _family_report() -> dict:
    from benchmarks.family import PEER, report

    def rec(preset, setting, seed, clk, buy):
        return {"preset": preset, "setting": setting, "seed": seed, "auc": {"ctr": clk, "cvr": buy},
                "oracle": {"ctr": 0.8, "cvr": 0.9}}

    # "a" wins set x by a little and loses set y by a lot; "b" is never far from the best.
    runs = [rec("x", "a", 1, 0.75, 0.80), rec("x", "a", 2, 0.77, 0.80), rec("x", "b", 1, 0.75, 0.79),
            rec("y", "a", 1, 0.70, 0.70), rec("y", "b", 1, 0.74, 0.78), rec("y", PEER, 1, 0.76, 0.75)]
    rep = report({str(i): r for i, r in enumerate(runs)})
    x = rep["presets"]["x"]
    assert x["ctr"]["auc"]["a"] == 0.76 and x["ctr"]["best"] == "a" and x["ctr"]["regret"]["b"] == 0.01
    assert x["cvr"]["regret"] == {"a": 0.0, "b": 0.01} and x["cvr"]["to_oracle"]["a"] == 0.1
    y = rep["presets"]["y"]
    assert y["cvr"]["best"] == "b" and y["cvr"]["regret"]["a"] == 0.08 and y["ctr"]["auc"][PEER] == 0.76
    assert PEER not in y["ctr"]["regret"]  # the peer is reported, never chosen
    assert rep["worst_regret"] == {"a": 0.08, "b": 0.01} and rep["choice"] == "b"
    return rep


def test_family_report_regrets_and_the_worst_case_choice():
    _family_report()


def test_family_sets_are_keyed_by_their_eval_split(tmp_path, monkeypatch):
    """Another --eval-rows gets its own generated set, and a set whose _SUCCESS records other row
    counts is refused by name instead of judging the settings on a split nobody asked for."""
    import shutil

    from benchmarks import family

    small = family.ensure_preset(tmp_path, "head-heavy", 2000, 300, "clk,buy")
    assert small.name == "family_head-heavy_clk_buy_2000_eval300"
    assert json.loads((small / "_SUCCESS").read_text())["eval_rows"] == 300
    assert family.ensure_preset(tmp_path, "head-heavy", 2000, 300, "clk,buy") == small  # made once, found again
    shutil.copytree(small, tmp_path / "family_head-heavy_clk_buy_2000_eval400")
    with pytest.raises(ValueError, match=r"_eval400/_SUCCESS: the set holds 2000 training and 300 eval rows"):
        family.ensure_preset(tmp_path, "head-heavy", 2000, 400, "clk,buy")
    monkeypatch.setattr(family, "EVAL_ROWS", 300)  # the default split keeps the plain name
    assert family.ensure_preset(tmp_path, "head-heavy", 2000, 300, "clk,buy").name == "family_head-heavy_clk_buy_2000"


def test_quality_sets_are_keyed_by_their_eval_split_and_speed_sets_taken_as_found(tmp_path, monkeypatch):
    """The quality and peer sets get the family's keying and refusal (``common.generated``); the
    speed benchmarks train on the set ``--data`` names, whatever its row counts."""
    import shutil

    from benchmarks import common, quality

    made = quality.ensure_data(tmp_path, 2000, 300, "clk,buy")
    assert made.name == "quality_clk_buy_2000_d0_s0_eval300"
    assert json.loads((made / "_SUCCESS").read_text())["train_rows"] == 2000
    shutil.copytree(made, tmp_path / "quality_clk_buy_2000_d0_s0_eval400")
    with pytest.raises(ValueError, match=r"eval400/_SUCCESS: the set holds 2000 training and 300 eval rows, "
                                         r"not the 2000 and 400 asked for"):
        quality.ensure_data(tmp_path, 2000, 400, "clk,buy")
    monkeypatch.setattr(quality, "EVAL_ROWS", 300)
    assert quality.ensure_data(tmp_path, 2000, 300, "clk,buy").name == "quality_clk_buy_2000_d0_s0"
    assert common.generated_set(made, 1_000_000, False, 8192, 1) == made / "train"
    (made / "_SUCCESS").write_text("")  # what Spark writes: still taken as found, refused where counts matter
    assert common.generated_set(made, 1_000_000, False, 8192, 1) == made / "train"
    with pytest.raises(ValueError, match=r"eval300/_SUCCESS: records no row counts"):
        common.generated(made, 2000, 300, [])


def test_family_plot_draws_one_bar_per_setting_preset_and_task(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.family import PEER, plot

    drawn = {}
    monkeypatch.setattr(plt, "close", lambda fig: drawn.update(fig=fig))  # keep the figure to read its bars
    plot(_family_report(), ["x", "y"], ["a", "b", PEER], tmp_path / "family.png", "t")
    assert (tmp_path / "family.png").stat().st_size > 0
    ctr, cvr = drawn["fig"].axes
    heights = [round(bar.get_height(), 4) for bar in ctr.patches]  # per setting, the presets in order
    assert heights[:4] == [0.04, 0.1, 0.05, 0.06]  # "a": x 0.8 - 0.76, y 0.8 - 0.70; "b": 0.75, 0.74
    assert heights[5] == 0.04 and len(cvr.patches) == 6  # the peer on y: 0.8 - 0.76 (none on x)


def test_family_from_reports_and_plots_runs_kept_in_several_files(tmp_path):
    """``family --from FILE:SETTING=LABEL`` trains nothing: it gathers kept runs under new labels
    (the peer's seeds from two files under one label), only the seeds and rows asked for, and
    refuses a spec that names nothing or runs of another data set (another oracle)."""
    from benchmarks.family import PEER

    def rec(preset, setting, seed, clk, oracle=0.8):
        return {"preset": preset, "setting": setting, "seed": seed, "auc": {"ctr": clk, "cvr": clk + 0.05},
                "oracle": {"ctr": oracle, "cvr": 0.9}}

    def kept(name, runs, rows=2000):
        path = tmp_path / name
        path.write_text(json.dumps({f"{r['preset']}@{r['setting']}@{r['seed']}@{rows}": r for r in runs}))
        return str(path)

    seed = kept("seed.json", [rec("dense", "s", 1, 0.70), rec("sparse", "s", 1, 0.60), rec("dense", "other", 1, 0.1)])
    best = kept("best.json", [rec("dense", "b", 1, 0.74), rec("dense", "b", 2, 0.76), rec("dense", "b", 4, 0.10),
                              rec("sparse", "b", 1, 0.66), rec("sparse", "b", 2, 0.68)])
    peer_a = kept("peer_a.json", [rec("dense", PEER, 1, 0.72), rec("sparse", PEER, 1, 0.64)])
    peer_b = kept("peer_b.json", [rec("dense", PEER, 2, 0.74)])
    big = kept("big.json", [rec("dense", "s", 1, 0.99)], rows=4000)

    def family(*specs, seeds="1,2", extra=()):
        args = ["family", "--rows", "2000", "--presets", "dense,sparse", "--seeds", seeds, *extra]
        for spec in specs:
            args += ["--from", spec]
        return run.main(args)

    png = tmp_path / "family.png"
    rep = family(f"{peer_a}:{PEER}", f"{seed}:s=seed config", f"{best}:b=best config", f"{peer_b}:{PEER}",
                 extra=["--plot", str(png)])
    x, y = rep["presets"]["dense"]["ctr"], rep["presets"]["sparse"]["ctr"]
    assert x["auc"] == {"seed config": 0.70, "best config": 0.75, PEER: 0.73}  # seed 4 of "b" left out
    assert x["seeds"] == {"seed config": 1, "best config": 2, PEER: 2} and y["auc"][PEER] == 0.64
    assert x["best"] == "best config" and y["regret"]["seed config"] == 0.07 and rep["choice"] == "best config"
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit, match="keeps no runs of 'b'; it keeps other, s"):
        family(f"{seed}:b")
    with pytest.raises(SystemExit, match="keeps no run of 's' on these presets, seeds 1,2 and 2000 rows"):
        family(f"{big}:s")
    other = kept("other.json", [rec("dense", "s", 1, 0.70, oracle=0.81)])
    with pytest.raises(SystemExit, match=r"its dense runs have another oracle AUC than those of --from .*best.json:b"):
        family(f"{best}:b", f"{other}:s")
    again = kept("again.json", [rec("dense", "s", 1, 0.71)])
    with pytest.raises(SystemExit, match=r"dense seed 1 is already in 's'"):
        family(f"{seed}:s", f"{again}:s", seeds="1")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"s": ["train_config.seed=1"]}))  # a settings file, not its results
    with pytest.raises(SystemExit, match=r"settings.json is not a results file of `benchmarks family`"):
        family(f"{settings}:s")
    with pytest.raises(SystemExit, match="takes neither --settings nor --out"):
        family(f"{seed}:s", extra=["--out", str(tmp_path / "o.json")])


def test_gemm_roofline_measures_the_model_shapes_in_fp32_and_bf16(tiny_config):
    import torch

    from aitm_torchrec.config import load_config
    from benchmarks.roofline import gemm_seconds, linear_gemms

    gemms = linear_gemms(load_config(tiny_config), 64)
    flops32, s32 = gemm_seconds(gemms, passes=1, inner=1)
    flops16, s16 = gemm_seconds(gemms, passes=1, inner=1, dtype=torch.bfloat16)
    # the same GEMMs (3 per Linear), whatever the dtype
    assert flops16 == flops32 == sum(3 * 2.0 * rows * k * n for _, rows, k, n in gemms)
    assert s32 > 0 and s16 > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gemm_roofline_on_cuda_times_the_device_and_reduces_there(tiny_config):
    """On a CUDA rank the roofline runs its GEMMs on the GPU and its sum travels on the GPU
    (NCCL reduces CUDA tensors only); one NCCL rank."""
    import torch.distributed as dist

    from aitm_torchrec.config import load_config
    from benchmarks.roofline import gemm_seconds, linear_gemms, world_gemm_flops_per_s

    gemms = linear_gemms(load_config(tiny_config), 64)
    flops, seconds = gemm_seconds(gemms, passes=1, inner=1, device="cuda")
    assert flops == sum(3 * 2.0 * rows * k * n for _, rows, k, n in gemms) and seconds > 0
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        assert world_gemm_flops_per_s(gemms, torch.bfloat16, torch.device("cuda", 0)) > 0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("low_rank", [0, 4])
def test_roofline_counts_the_cross_networks_kernels(tiny_config, low_rank):
    """backbone.cross: 2 layers over the model input (width D) add 2 GEMMs of D x D per row, or
    with low_rank r 2 x (D x r and r x D), to the Linears of the config without it."""
    from aitm_torchrec.config import load_config
    from benchmarks.roofline import linear_gemms

    plain = linear_gemms(load_config(tiny_config), 8)
    crossed = linear_gemms(load_config(tiny_config, [f"model_config.backbone.cross={{num_layers: 2, low_rank: {low_rank}}}"]), 8)
    extra = [g for g in crossed if ".cross." in g[0]]
    d = load_config(tiny_config).schema.input_dim
    shapes = [(8, d, d)] * 2 if not low_rank else [(8, d, low_rank), (8, low_rank, d)] * 2
    assert [g[1:] for g in extra] == shapes
    assert len(crossed) - len(extra) == len(plain)  # the Linears are still every one counted


def test_bench_serve_runs_each_export_in_each_precision(tiny_data, tmp_path):
    """``serve --precision auto,none`` on a tiny config with a cross network: every export
    measured in each precision at every batch size, keyed ``<export> <precision>``; auto packs the
    artefact's Linears (and cross layers) where this machine resolves it to bf16, none packs nothing."""
    from aitm_torchrec.precision import resolve_for_job
    from benchmarks.serve import BATCHES

    raw = tiny_config_dict(tiny_data, tmp_path / "unused")
    raw["train_config"]["mixed_precision"] = "auto"
    raw["model_config"]["backbone"]["cross"] = {"num_layers": 2}
    config = tmp_path / "tiny_cross.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = run.main(["serve", "--config", str(config), "--data", str(tmp_path / "rows"), "--iters", "3",
                    "--train-steps", "1", "--quants", "int8", "--precision", "auto,none"])
    assert set(out["quant"]) == {"none auto", "int8 auto", "none none", "int8 none"}
    # 2 backbone + 2 x 2 tower + 1 transfer + 3 AIT + 2 output Linears, 2 cross layers
    bf16 = resolve_for_job("auto", "cpu").resolved == "bf16" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for key, entry in out["quant"].items():
        assert entry["packed_bf16_layers"] == (14 if bf16 and key.endswith("auto") else 0), key
        for b in BATCHES:
            assert entry[f"batch_{b}"]["end_to_end_ms"]["p50"] > 0 and entry[f"batch_{b}"]["model_candidates_per_s"] > 0
    assert out["quant"]["none none"]["max_abs_diff_vs_fp32"] == 0.0
    assert 0 < out["quant"]["int8 none"]["max_abs_diff_vs_fp32"] < 0.05  # int8 tables against fp32 ones
    with pytest.raises(SystemExit):
        run.main(["serve", "--precision", "auto,fp16"])
