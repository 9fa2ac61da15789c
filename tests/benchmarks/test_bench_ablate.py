"""`mixcon.benchmarks.ablate`: config variants trained and scored, paired by seed."""

from __future__ import annotations

import json

import pytest

from mixcon.cli import main
from mixcon.config import MixConConfig


def test_ablate_benchmark_pairs_variants_by_seed(small_corpus, tmp_path):
    argv = ["bench", "ablate", "--set", "d_model=16", "--corpus", str(small_corpus), "--real-len", "8", "--steps", "2",
            "--batch-size", "3", "--eval-windows", "5", "--seeds", "3,4", "--variant", "no-control",
            "--variant", "again:conba_control=false", "--variant", "pure:attn_per_block=0,conba_delay=1",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "out" / "ablate.json").read_text())
    runs = {(r["variant"], r["seed"]): r for r in payload["runs"]}
    assert list(runs) == [(v, s) for s in (3, 4) for v in ("base", "no-control", "again", "pure")]
    assert payload["variants"]["pure"] == {"attn_per_block": 0, "conba_delay": 1}
    assert runs["pure", 3]["layout"] == "CCCC/DMDM | CCCC/DMDM" and runs["base", 3]["layout"] == "CCAC/DMDM | CCAC/DMDM"
    for seed in (3, 4):  # a built-in and the same change spelled out: the same runs
        assert runs["no-control", seed]["bits_per_byte"] == runs["again", seed]["bits_per_byte"]
    assert runs["base", 3]["bits_per_byte"] != runs["base", 4]["bits_per_byte"]
    assert runs["base", 3]["bits_per_byte"] != runs["no-control", 3]["bits_per_byte"]
    assert all(6 < r["bits_per_byte"] < 10 for r in runs.values())  # barely trained: near log2(259) = 8.0
    rows = {r["variant"]: r for r in payload["rows"]}
    for name, row in rows.items():
        bits = [runs[name, s]["bits_per_byte"] for s in (3, 4)]
        deltas = [runs[name, s]["bits_per_byte"] - runs["base", s]["bits_per_byte"] for s in (3, 4)]
        assert row["seeds"] == 2 and row["bits_per_byte"] == pytest.approx(sum(bits) / 2)
        assert row["std"] == pytest.approx(abs(bits[0] - bits[1]) / 2**0.5)
        assert row["delta"] == pytest.approx(sum(deltas) / 2)
        assert row["delta_std"] == pytest.approx(abs(deltas[0] - deltas[1]) / 2**0.5)
    assert rows["base"]["delta"] == 0 and rows["base"]["delta_std"] == 0
    assert rows["pure"]["params"] > rows["base"]["params"] > rows["base"]["active_params"]
    assert (tmp_path / "out" / "ablate.png").stat().st_size > 0


def test_ablate_benchmark_runs_the_builtins_that_change_the_model():
    from mixcon.benchmarks import ablate

    tiny = MixConConfig.preset("tiny")
    builtin = ablate.builtin_variants(tiny)
    assert all(f"\n  {name} " in ablate.__doc__ for name in builtin)  # the --help lists every built-in
    changing = [name for name, fields in builtin.items() if ablate.changes_model(tiny, tiny.replace(**fields))]
    assert changing == [name for name in builtin if name != "no-noise"]  # tiny trains without noise
    noisy = tiny.replace(conba_process_noise=0.1, conba_observation_noise=0.05, moe_pattern="DMMD")
    builtin = ablate.builtin_variants(noisy)
    assert all(ablate.changes_model(noisy, noisy.replace(**fields)) for fields in builtin.values())
    mamba2 = noisy.replace(**builtin["mamba2-mixer"])  # every Conba extra off: DESIGN §2's Mamba-2 mixer
    assert (mamba2.conba_control, mamba2.conba_delay, mamba2.conba_selective, mamba2.conba_state_scaling,
            mamba2.conba_process_noise, mamba2.conba_observation_noise) == (False, 0, "linear", False, 0.0, 0.0)
    assert {f for _, f in noisy.replace(**builtin["dense-ffn"]).layout()} == {"mlp"}  # a moe_pattern too
    transformer = tiny.replace(attn_per_block=4)
    assert [n for n, f in builtin.items() if ablate.changes_model(transformer, transformer.replace(**f))] == [
        "dense-ffn", "conba-twin"]  # its Conba switches and its own layout change nothing
    with pytest.raises(ValueError, match="changes nothing in the model"):
        ablate.variant_configs(transformer, {"no-delay": {"conba_delay": 0}})
    assert ablate.changes_model(transformer, transformer.replace(conba_delay=0, d_model=48))  # one real change


@pytest.mark.parametrize("argv,message", [
    (["--variant", "no-such"], "not a built-in variant"),
    (["--variant", "base:d_model=8"], "needs a name other than 'base'"),
    (["--variant", ":d_model=48"], "needs a name other than 'base'"),
    (["--variant", "w:widht=3"], "unknown config field 'widht'"),
    (["--variant", "w:d_model"], "expected KEY=VALUE"),
    (["--variant", "h:n_heads=3"], r"--variant h: MixConConfig\.n_kv_heads=2 is invalid"),
    (["--variant", "same:d_model=32"], "changes nothing"),
    (["--variant", "no-delay", "--variant", "no-delay"], "each name once"),
    (["--seeds", "1,1"], "each seed once"),
])
def test_ablate_benchmark_rejects_bad_arguments(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=f"^mixcon bench ablate: .*{message}"):  # (--out: a run that is not
        main(["bench", "ablate", "--steps", "1", "--out", str(tmp_path), *argv])  # refused writes there)


def test_ablate_benchmark_resumes_an_interrupted_sweep_exactly(small_corpus, tmp_path, monkeypatch):
    from mixcon.benchmarks import bytes_lm

    argv = ["bench", "ablate", "--set", "d_model=16", "--corpus", str(small_corpus), "--real-len", "8", "--steps", "2",
            "--batch-size", "3", "--eval-windows", "5", "--variant", "no-control", "--variant", "dense-ffn"]
    assert main([*argv, "--seeds", "0,1", "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "ablate.json").read_text())

    trained, interrupt = [], True
    train_and_score = bytes_lm.train_and_score

    def counted(config, *args, **kwargs):  # and, while `interrupt`, Ctrl-C in the fifth run
        if interrupt and len(trained) == 4:
            raise KeyboardInterrupt
        trained.append(kwargs["seed"])
        return train_and_score(config, *args, **kwargs)

    monkeypatch.setattr(bytes_lm, "train_and_score", counted)
    out = ["--out", str(tmp_path / "cut")]
    assert main([*argv, "--seeds", "0,1", *out]) == 130  # Ctrl-C: the command stops quietly
    partial = json.loads((tmp_path / "cut" / "ablate.json").read_text())
    assert [(r["variant"], r["seed"]) for r in partial["runs"]] == [
        ("base", 0), ("no-control", 0), ("dense-ffn", 0), ("base", 1)]
    assert not (tmp_path / "cut" / "ablate.png").exists()

    with pytest.raises(SystemExit, match=r"--resume: .* was written with other steps"):
        main([*argv, "--seeds", "0,1", *out, "--resume", "--steps", "3"])
    other = tmp_path / "other.txt"
    other.write_text(small_corpus.read_text().replace("king", "kong"))  # as many bytes, other text
    with pytest.raises(SystemExit, match=r"--resume: .* was written with other corpus_sha256"):
        main([*argv[:5], str(other), *argv[6:], "--seeds", "0,1", *out, "--resume"])
    trained, interrupt = [], False
    assert main([*argv, "--seeds", "0,1", *out, "--resume"]) == 0
    assert trained == [1, 1]  # only the two runs the interruption left
    resumed = json.loads((tmp_path / "cut" / "ablate.json").read_text())
    strip = [{k: v for k, v in r.items() if k != "train_s"} for r in whole["runs"]]
    assert [{k: v for k, v in r.items() if k != "train_s"} for r in resumed["runs"]] == strip
    assert (tmp_path / "cut" / "ablate.png").stat().st_size > 0
    trained = []  # one of the seeds again: reused, and the other seed's runs stay in the results
    assert main([*argv, "--seeds", "1", *out, "--resume"]) == 0 and trained == []
    again = json.loads((tmp_path / "cut" / "ablate.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in again["runs"]) == sorted((r["variant"], r["seed"])
                                                                           for r in whole["runs"])
    assert again["seeds"] == [0, 1] and again["rows"] == resumed["rows"]


def test_ablate_summary_of_one_seed_has_no_spread_and_a_variant_without_its_base_seed_no_delta():
    from mixcon.benchmarks import ablate

    def run(variant, seed, bits):
        return dict(variant=variant, seed=seed, bits_per_byte=bits, layout="C", params=2, active_params=1,
                    train_s=1.0)

    rows = {r["variant"]: r for r in ablate.summarize([run("base", 0, 8.0), run("v", 0, 7.5), run("w", 1, 7.0)])}
    assert (rows["base"]["std"], rows["base"]["delta"], rows["base"]["delta_std"]) == (None, 0.0, None)
    assert (rows["v"]["bits_per_byte"], rows["v"]["delta"], rows["v"]["seeds"]) == (7.5, -0.5, 1)
    assert rows["w"]["delta"] is None  # seed 1 has no base run to pair with
